"""Fixtures of the chaos tests: the seed, clusters that clean up after themselves, and
node logs printed when a test fails.

Environment (docs/chaos.md):

* `KMSD_CHAOS_SEED`: the seed of the short tests (default: a fresh one, printed).
* `KMSD_CHAOS_SECONDS`: run the soak test for that long (skipped when unset).
* `KMSD_CHAOS_SEEDS`: comma-separated seeds for the soak, one run each.
* `KMSD_CHAOS_NODES`: cluster size of the soak (3 or 5; default 3).
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cluster import ChaosCluster  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: real kmsd clusters under injected faults")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"chaos_report_{report.when}", report)
    return report


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    value = int(os.environ.get("KMSD_CHAOS_SEED") or random.SystemRandom().randrange(1, 10**9))
    print(f"\n[chaos] {request.node.name}: seed {value} (rerun: KMSD_CHAOS_SEED={value})")
    return value


@pytest.fixture
def make_cluster(
    request: pytest.FixtureRequest, tmp_path: Path, seed: int
) -> Iterator[Callable[..., ChaosCluster]]:
    """`make_cluster(size=3, **options)`: a started cluster under this test's tmp dir."""
    made: list[ChaosCluster] = []

    def make(size: int = 3, start: bool = True, **options: Any) -> ChaosCluster:
        cluster = ChaosCluster(tmp_path / f"cluster-{len(made) + 1}", size, seed=seed, **options)
        made.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.close()
    failed = any(
        getattr(getattr(request.node, f"chaos_report_{when}", None), "failed", False)
        for when in ("setup", "call")
    )
    if failed:
        for cluster in made:
            print(f"\n======== chaos logs (seed {seed}) ========\n{cluster.logs_report()}")
