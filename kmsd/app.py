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
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2

from kmsd.api.audit import AuditHook
from kmsd.api.cluster import ClusterServicer
from kmsd.api.server import CLUSTER_SERVICE_NAME, SERVICE_NAME, build_server
from kmsd.audit.logged import LoggedAudit
from kmsd.audit.writer import AuditWriter
from kmsd.auth.throttle import RateLimiter
from kmsd.auth.tls import PeerTls, ServerTls
from kmsd.clock import Clock, SystemClock
from kmsd.config import Config
from kmsd.crypto.seal import FileSeal
from kmsd.fsm.store import KeyStore
from kmsd.log.raft_disk import Member
from kmsd.log.raft_log import RaftLog, RaftSettings
from kmsd.log.single_node import SingleNodeLog
from kmsd.service.context import Kms
from kmsd.service.names import Names
from kmsd.service.scheduler import Scheduler
from kmsd.transport.grpc_transport import GrpcTransport

if TYPE_CHECKING:
    from kmsd.crypto.pkcs11_seal import Pkcs11Seal

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


def _load_shared_seal(path: Path) -> FileSeal:
    if not path.exists():
        raise SealMissing(
            f"the seal file {path} does not exist: a cluster's nodes share one root key;"
            " create it once with `kmsd init --seal FILE` and copy it to every node"
        )
    return FileSeal.load(path)


class SealMissing(Exception):
    """A cluster node was started without the cluster's root key."""


def open_seal(config: Config) -> FileSeal | Pkcs11Seal:
    """The seal `[seal].type` names. Raises ValueError (Pkcs11SealError) or SealMissing
    with a message naming what to fix."""
    if config.seal.type == "pkcs11":
        from kmsd.crypto.pkcs11_seal import Pkcs11Seal, read_pin

        return Pkcs11Seal.open(
            module=config.seal.module,
            token_label=config.seal.token_label,
            key_label=config.seal.key_label,
            pin=read_pin(config.seal_pin_file, config.seal.pin_env),
            create_key=config.seal.create_key,
        )
    # A cluster's nodes must share one root key: never make a new one for a node.
    if config.clustered:
        return _load_shared_seal(config.seal_path)
    return FileSeal.load_or_create(config.seal_path)


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
        self.command_log: SingleNodeLog | RaftLog | None = None
        self.transport: GrpcTransport | None = None
        self.scheduler: Scheduler | None = None
        self.audit: AuditWriter | None = None
        self._health: health.aio.HealthServicer | None = None
        # Mutual TLS of the client port and of the Raft peer port; None in plaintext mode.
        self.server_tls: ServerTls | None = None
        self.peer_tls: PeerTls | None = None

    async def start(self) -> None:
        config = self.config
        self._lock_fd = _lock_data_dir(config.data_dir)
        # Before anything else: a node whose certificate files are unusable does not start.
        self.server_tls = ServerTls.from_config(config)
        if self.server_tls is None:
            log.warning(
                "plaintext: no authentication, loopback only (listening on %s%s without TLS;"
                " every caller is 'anonymous')",
                config.listen,
                f" and {config.peer_listen}" if config.clustered else "",
            )
        if config.audit.enabled:
            # Before anything serves: a node that cannot audit does not start.
            self.audit = AuditWriter(
                config.audit_dir,
                config.node_id,
                clock=self._clock,
                max_file_bytes=config.audit.max_file_bytes,
                fsync=config.audit.fsync,
                on_availability=self._on_audit_availability,
            )
            await self.audit.start()
        seal = open_seal(config)
        store = KeyStore()
        names = Names(region=config.region, account=config.account)
        logged = None
        if self.audit is not None:
            # Before the log starts: replaying it writes records a crash left unwritten.
            logged = LoggedAudit(self.audit, config.node_id, names.key_arn)
            store.observer = logged.applied
        command_log = self._command_log(store, logged)
        await command_log.start()
        if command_log.tail_repair is not None:
            log.warning("the log's torn tail was repaired: %s", command_log.tail_repair)
        self.command_log = command_log
        self.kms = Kms(
            store=store,
            log=command_log,
            seal=seal,
            names=names,
            clock=self._clock,
            rng=self._rng,
            max_staleness_s=config.raft.max_staleness_ms / 1000,
            auth=config.auth,
            limiter=RateLimiter(config.limits.requests_per_second, config.limits.burst),
            logged_audit=logged,
        )
        if not config.auth.enabled:
            log.warning("[auth].enabled = false: authorization is OFF, anyone may do anything")
        hook = None if self.audit is None else AuditHook(self.audit, self.kms.names, store)
        cluster = ClusterServicer(
            command_log, config.node_id, config.listen, hook, authorizer=self.kms.authorizer
        )
        self._server, self.port, health_servicer = build_server(
            self.kms, config.listen, cluster, hook, tls=self.server_tls
        )
        self._health = health_servicer
        await self._server.start()
        for service in ("", SERVICE_NAME, CLUSTER_SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.scheduler = Scheduler(self.kms, config.scheduler_interval_seconds)
        self._scheduler_task = asyncio.create_task(self.scheduler.run_forever())
        log.info(
            "kmsd node %d serving on %s:%d%s (seal fingerprint %s, %d keys, applied index %d)",
            config.node_id,
            config.listen.rpartition(":")[0],
            self.port,
            f", Raft peers on {config.peer_listen}" if config.clustered else "",
            seal.fingerprint,
            len(store.keys()),
            store.applied_index,
        )

    def _command_log(self, store: KeyStore, logged: LoggedAudit | None) -> SingleNodeLog | RaftLog:
        config = self.config
        settle = None if logged is None else logged.settle
        if not config.clustered:
            single = SingleNodeLog(
                config.data_dir / "log",
                store,
                snapshot_every=config.snapshot_every,
                on_fatal=self._on_fatal,
                before_compaction=settle,
            )
            return single
        members = [Member(m.id, m.peer_address, m.client_address) for m in config.members]
        self.peer_tls = PeerTls.from_config(config)
        self.transport = GrpcTransport(
            config.node_id, config.peer_listen, config.cluster_id, self.peer_tls
        )
        return RaftLog(
            config.node_id,
            config.data_dir / "raft",
            store,
            self.transport,
            # A joining node only learns where its peers are; founders bootstrap the log.
            founders=[] if config.join else members,
            known_members=members if config.join else [],
            settings=RaftSettings(
                tick_seconds=config.raft.tick_ms / 1000,
                election_ticks=config.raft.election_ticks,
                heartbeat_ticks=config.raft.heartbeat_ticks,
                snapshot_every=config.snapshot_every,
                request_timeout_s=config.raft.request_timeout_seconds,
            ),
            on_fatal=self._on_fatal,
            before_compaction=settle,
        )

    def _on_audit_availability(self, available: bool) -> None:
        # While the audit log cannot be written every request is refused: say so.
        if self._health is not None:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if available
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in ("", SERVICE_NAME, CLUSTER_SERVICE_NAME):
                asyncio.ensure_future(self._health.set(service, status))

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
        if self.audit is not None:
            await self.audit.stop()
        if self.kms is not None:
            await self.kms.log.stop()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
