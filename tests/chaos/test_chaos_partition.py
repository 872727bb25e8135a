"""Chaos: network partitions through the proxy on the Raft links.

* the leader isolated (a black hole: connections stall, TCP stays up);
* a follower isolated with connection resets (gRPC reconnects with backoff);
* a one-way cut: the leader's messages to one follower are lost, the follower's
  messages (and forwarded proposals) still reach the leader;
* on 5 nodes, a minority/majority split with the leader in the minority, then in the
  majority.

The minority side must refuse (UNAVAILABLE) or stall, never answer from stale state:
the linearizability check over every client's history decides.
"""

from __future__ import annotations

import random

from checks import chaos_run, pace
from cluster import ChaosCluster
from proxy import Mode
from workload import Workload


def test_chaos_partition_isolated_leader(make_cluster, seed):
    def faults(cluster: ChaosCluster, rng: random.Random, workload: Workload) -> None:
        leader = cluster.wait_leader()
        cluster.isolate(leader)
        others = [n for n in cluster.nodes if n != leader]
        new = cluster.wait_leader(timeout=10, among=others)
        cluster.note(f"node {new} leads the majority; node {leader} is cut off")
        pace(rng.uniform(1.5, 3.0))
        cluster.heal_network()
        pace(rng.uniform(1.0, 1.5))

        follower = rng.choice([n for n in cluster.nodes if n != cluster.wait_leader()])
        cluster.isolate(follower, Mode.RESET)
        pace(rng.uniform(1.5, 2.5))
        cluster.heal_network()
        pace(rng.uniform(1.0, 1.5))

        leader = cluster.wait_leader()
        follower = rng.choice([n for n in cluster.nodes if n != leader])
        cluster.block(leader, follower)
        pace(rng.uniform(2.0, 3.0))
        cluster.heal_network()
        pace(0.5)

    chaos_run(make_cluster, seed, faults)


def test_chaos_partition_split_five_nodes(make_cluster, seed):
    def faults(cluster: ChaosCluster, rng: random.Random, workload: Workload) -> None:
        leader = cluster.wait_leader()
        others = [n for n in cluster.nodes if n != leader]
        rng.shuffle(others)
        minority, majority = [leader, others[0]], others[1:]
        cluster.partition([minority, majority])
        new = cluster.wait_leader(timeout=10, among=majority)
        cluster.note(f"node {new} leads the majority {majority}; minority {minority}")
        pace(rng.uniform(2.0, 3.0))
        cluster.heal_network()
        pace(rng.uniform(1.0, 1.5))

        leader = cluster.wait_leader()
        others = [n for n in cluster.nodes if n != leader]
        rng.shuffle(others)
        majority, minority = [leader, *others[:2]], others[2:]
        cluster.partition([majority, minority])
        pace(rng.uniform(2.0, 3.0))
        cluster.heal_network()
        pace(0.5)

    chaos_run(make_cluster, seed, faults, size=5, workload_options={"direct_clients": 5})
