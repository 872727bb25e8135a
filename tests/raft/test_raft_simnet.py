"""Thousands of random schedules on the simulated network (simnet.py).

Every event (delivery, drop, duplicate, reorder, partition, link cut, pause,
crash/restart, proposal, read, conf change, snapshot+compaction, leadership
transfer, driver step) is followed by the safety checks of replication.md §3.4.
After the chaos, the network heals and every member restarts: a leader must be
elected and a new proposal commit within a bounded number of ticks, and every
member must converge to the same applied state.

Environment:
  KMSD_RAFT_SEEDS=N   schedules per cluster shape and variant (default: see DEFAULTS)
  KMSD_RAFT_STEPS=N   random events per schedule (default 1500)
  KMSD_RAFT_SEED=S    replay one seed (with KMSD_RAFT_SIZE and KMSD_RAFT_VARIANT)
"""

from __future__ import annotations

import os

import pytest
from raft_checker import InvariantViolation
from simnet import Cluster

STEPS = int(os.environ.get("KMSD_RAFT_STEPS", "1500"))
BATCH = 50
LIVENESS_TICKS = 300  # 30 election timeouts: measured worst case is well under 60

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "no_prevote_no_checkquorum": {"pre_vote": False, "check_quorum": False},
    "tight": {"election_tick": 5, "heartbeat_tick": 2, "max_inflight": 1, "max_size": 16},
}
# (variant, cluster size) -> schedules in the default run
DEFAULTS = {
    ("default", 3): 1200,
    ("default", 5): 500,
    ("no_prevote_no_checkquorum", 3): 300,
    ("tight", 3): 300,
    ("tight", 5): 150,
}


def schedules(variant: str, size: int) -> int:
    override = os.environ.get("KMSD_RAFT_SEEDS")
    return int(override) if override else DEFAULTS[(variant, size)]


def run_schedule(seed: int, size: int, variant: str) -> Cluster:
    options = VARIANTS[variant]
    cluster = Cluster(size, seed, **options)  # type: ignore[arg-type]
    try:
        cluster.run_random(STEPS)
        cluster.heal_all()
        election_tick = int(options.get("election_tick", 10))  # type: ignore[call-overload]
        cluster.check_liveness(LIVENESS_TICKS * election_tick // 10)
        cluster.check_convergence()
    except (InvariantViolation, AssertionError) as error:
        replay = (
            f"KMSD_RAFT_SEED={seed} KMSD_RAFT_SIZE={size} KMSD_RAFT_VARIANT={variant} "
            ".venv/bin/pytest tests/raft/test_raft_simnet.py -k replay"
        )
        raise AssertionError(f"{error}\n{cluster.describe()}\nreplay: {replay}") from error
    return cluster


CASES = [
    (variant, size, batch)
    for (variant, size) in DEFAULTS
    for batch in range((schedules(variant, size) + BATCH - 1) // BATCH)
]


@pytest.mark.parametrize(("variant", "size", "batch"), CASES)
def test_random_schedules(variant: str, size: int, batch: int) -> None:
    total = schedules(variant, size)
    base = 1_000_000 * list(VARIANTS).index(variant) + 10_000 * size
    for seed in range(base + batch * BATCH, base + min(total, (batch + 1) * BATCH)):
        run_schedule(seed, size, variant)


if "KMSD_RAFT_SEED" in os.environ:

    def test_replay() -> None:
        cluster = run_schedule(
            int(os.environ["KMSD_RAFT_SEED"]),
            int(os.environ.get("KMSD_RAFT_SIZE", "3")),
            os.environ.get("KMSD_RAFT_VARIANT", "default"),
        )
        print(cluster.describe())


def test_the_schedules_reach_the_interesting_paths() -> None:
    """Guards the harness itself: the random mix must keep exercising every feature."""
    totals: dict[str, int] = {}
    checks = {"leaders": 0, "commits": 0, "reads": 0}
    for seed in range(60):
        cluster = run_schedule(seed, 3, "default")
        for key, value in cluster.stats.items():
            totals[key] = totals.get(key, 0) + value
        checks["leaders"] += cluster.checker.leader_changes
        checks["commits"] += cluster.checker.commits
        checks["reads"] += cluster.checker.reads_served
    for key in (
        "crash",
        "snapshot_installed",
        "timeout_now_delivered",
        "conf_applied_ADD_LEARNER",
        "conf_proposed_ADD_VOTER",
    ):
        assert totals.get(key, 0) > 0, f"no {key} in 60 schedules: {totals}"
    assert checks["leaders"] > 60 and checks["commits"] > 600 and checks["reads"] > 60


@pytest.mark.parametrize("seed", range(20))
def test_whole_cluster_power_loss(seed: int) -> None:
    """PySyncObj #202 / NATS: every node loses power at once, mid-write; all restart.
    Committed entries survive and terms never go back."""
    cluster = Cluster(3, 50_000 + seed)
    cluster.run_random(600)
    cluster.heal_all()
    cluster.check_liveness(LIVENESS_TICKS)
    committed = dict(cluster.checker.committed)
    terms = {n.id: n.storage.hard_state.term for n in cluster.nodes.values()}
    for _ in range(3):
        for node in cluster.up():
            cluster.crash(node)
        for node in cluster.nodes.values():
            if not node.removed:
                cluster.restart(node)
        cluster.check_liveness(LIVENESS_TICKS)
    cluster.check_convergence()
    for index, record in committed.items():
        assert cluster.checker.committed[index] == record
    for node in cluster.up():
        assert node.storage.hard_state.term >= terms.get(node.id, 0)
