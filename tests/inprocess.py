"""An in-process kmsd (real store, real log on disk, real seal) driven by a fake clock."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kmsd.clock import FakeClock
from kmsd.config import AuthConfig
from kmsd.crypto.seal import FileSeal
from kmsd.fsm.store import KeyStore
from kmsd.log.single_node import SingleNodeLog
from kmsd.service.context import Kms
from kmsd.service.names import Names

NAMES = Names(region="us-east-1", account="111122223333")


async def open_kms(
    data_dir: Path,
    clock: FakeClock,
    *,
    snapshot_every: int = 10_000,
    rng: Callable[[int], bytes] = os.urandom,
    auth: AuthConfig | None = None,
) -> Kms:
    data_dir.mkdir(parents=True, exist_ok=True)
    store = KeyStore()
    log = SingleNodeLog(data_dir / "log", store, snapshot_every=snapshot_every)
    await log.start()
    seal = FileSeal.load_or_create(data_dir / "root.key")
    return Kms(
        store=store,
        log=log,
        seal=seal,
        names=NAMES,
        clock=clock,
        rng=rng,
        auth=auth or AuthConfig(),
    )
