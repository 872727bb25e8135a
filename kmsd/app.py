"""One kmsd node: seal, key store, command log, scheduler and gRPC server, started and
stopped together.

Start-up order matters: the log is recovered (snapshot + WAL replay) before the
server accepts a request, so no request ever sees a half-rebuilt store. A fatal
log error (fsync failure, corruption found later) stops the node: it never
keeps serving on state it cannot persist.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from kmsd.api.server import SERVICE_NAME, build_server
from kmsd.clock import Clock, SystemClock
from kmsd.config import Config
from kmsd.crypto.seal import FileSeal
from kmsd.fsm.store import KeyStore
from kmsd.log.single_node import SingleNodeLog
from kmsd.service.context import Kms
from kmsd.service.names import Names
from kmsd.service.scheduler import Scheduler

log = logging.getLogger(__name__)


class DataDirLocked(Exception):
    """Another kmsd process is using this data directory."""


def _lock_data_dir(data_dir: Path) -> int:
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        os.close(fd)
        raise DataDirLocked(f"{data_dir} is in use by another kmsd process") from error
    return fd


class Node:
    """A running single-zone kmsd node."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config
        self._clock = clock or SystemClock()
        self._rng = rng
        self._stopped = asyncio.Event()
        self._fatal: BaseException | None = None
        self._lock_fd = -1
        self._server: grpc.aio.Server | None = None
        self._scheduler_task: asyncio.Task[None] | None = None
        self.port = 0
        self.kms: Kms | None = None
        self.scheduler: Scheduler | None = None

    async def start(self) -> None:
        config = self.config
        self._lock_fd = _lock_data_dir(config.data_dir)
        seal = FileSeal.load_or_create(config.seal_path)
        store = KeyStore()
        command_log = SingleNodeLog(
            config.data_dir / "log",
            store,
            snapshot_every=config.snapshot_every,
            on_fatal=self._on_fatal,
        )
        await command_log.start()
        if command_log.tail_repair is not None:
            log.warning("the log's torn tail was repaired: %s", command_log.tail_repair)
        self.kms = Kms(
            store=store,
            log=command_log,
            seal=seal,
            names=Names(region=config.region, account=config.account),
            clock=self._clock,
            rng=self._rng,
        )
        self._server, self.port, health_servicer = build_server(self.kms, config.listen)
        await self._server.start()
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.scheduler = Scheduler(self.kms, config.scheduler_interval_seconds)
        self._scheduler_task = asyncio.create_task(self.scheduler.run_forever())
        log.info(
            "kmsd node serving on %s:%d (seal fingerprint %s, %d keys, applied index %d)",
            config.listen.rpartition(":")[0],
            self.port,
            seal.fingerprint,
            len(store.keys()),
            store.applied_index,
        )

    def _on_fatal(self, error: BaseException) -> None:
        log.critical("stopping: the command log failed: %s", error)
        self._fatal = error
        self._stopped.set()

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait(self) -> int:
        """Waits until asked to stop or a fatal error; stops; returns the exit status."""
        await self._stopped.wait()
        await self.stop()
        return 1 if self._fatal is not None else 0

    async def stop(self) -> None:
        if self._scheduler_task is not None:
            self._scheduler_task.cancel()
            self._scheduler_task = None
        if self._server is not None:
            await self._server.stop(grace=2.0)
            self._server = None
        if self.kms is not None:
            await self.kms.log.stop()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
