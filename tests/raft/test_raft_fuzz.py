"""Bad peer input: malformed, out-of-term, oversized and unknown-sender messages never raise,
are dropped (and counted) when malformed, and never break the cluster's invariants."""

from __future__ import annotations

import dataclasses
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raft_helpers import Net, Node
from simnet import Cluster

from kmsd.raft import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Role,
    Snapshot,
    SnapshotMeta,
)
from kmsd.raft.validate import check_message

HUGE = [2**63, 2**64 - 1, 2**64, 2**80]
ints = st.one_of(st.integers(-3, 12), st.sampled_from(HUGE), st.integers(-(2**70), 2**70))
node_ids = st.one_of(st.integers(-1, 5), st.sampled_from([99, 2**64, 2**65]))
types = st.one_of(st.sampled_from(list(MessageType)), st.integers(-1, 20))

entry_strategy = st.builds(
    Entry,
    index=ints,
    term=ints,
    type=st.one_of(st.sampled_from(list(EntryType)), st.integers(-1, 5)),
    data=st.one_of(
        st.binary(max_size=12), st.just(ConfChange(ConfChangeType.ADD_VOTER, 7).encode())
    ),
)


@st.composite
def consecutive_entries(draw: st.DrawFn) -> tuple[Entry, ...]:
    """Mostly well-formed runs of entries (so deeper paths are reached)."""
    start = draw(st.integers(0, 10))
    terms = sorted(draw(st.lists(st.integers(1, 6), max_size=5)))
    return tuple(Entry(start + 1 + i, t, EntryType.NORMAL, b"x") for i, t in enumerate(terms))


conf_strategy = st.builds(
    ConfState,
    voters=st.frozensets(node_ids, max_size=4),
    learners=st.frozensets(node_ids, max_size=2),
)
snapshot_strategy = st.builds(
    Snapshot,
    meta=st.builds(SnapshotMeta, index=ints, term=ints, conf=conf_strategy),
    data=st.binary(max_size=8),
)


@st.composite
def messages(draw: st.DrawFn, dst: int) -> Message:
    return Message(
        type=draw(types),  # type: ignore[arg-type]
        src=draw(node_ids),
        dst=draw(st.one_of(st.just(dst), node_ids)),
        term=draw(st.one_of(st.integers(0, 6), ints)),
        log_term=draw(st.one_of(st.integers(0, 6), ints)),
        index=draw(st.one_of(st.integers(0, 12), ints)),
        entries=draw(
            st.one_of(
                st.just(()), consecutive_entries(), st.lists(entry_strategy, max_size=3).map(tuple)
            )
        ),
        commit=draw(st.one_of(st.integers(0, 12), ints)),
        reject=draw(st.one_of(st.booleans(), st.sampled_from([0, 1]))),  # type: ignore[arg-type]
        reject_hint=draw(st.one_of(st.integers(0, 12), ints)),
        snapshot=draw(st.one_of(st.none(), snapshot_strategy)),
        context=draw(st.one_of(st.binary(max_size=10), st.just(b"transfer"))),
    )


def node_in_role(role: str) -> tuple[Net, Node]:
    net = Net.of(3)
    if role == "leader":
        return net, net.elect(1)
    net.elect(1)
    if role == "follower":
        return net, net[2]
    node = net[3]
    node.tick(30)  # cut off: it campaigns
    node.drain()
    if role == "candidate":
        node.raw.step(
            Message(MessageType.PRE_VOTE_RESP, 1, 3, node.term + 1)
        )  # pre-vote won: it is a candidate now
        node.drain()
    return net, node


def check_local_invariants(node: Node, before_term: int) -> None:
    status = node.raw.status()
    assert status.applied <= status.commit <= node.storage.last_index()
    assert status.term >= before_term
    assert node.storage.hard_state.commit <= node.storage.last_index()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    role=st.sampled_from(["leader", "follower", "pre_candidate", "candidate"]),
    data=st.data(),
)
def test_arbitrary_messages_never_raise(role: str, data: st.DataObject) -> None:
    _, node = node_in_role(role)
    for m in data.draw(st.lists(messages(node.id), min_size=1, max_size=8)):
        term = node.term
        dropped = node.raw.status().dropped_messages
        hard = node.raw.hard_state()
        node.raw.step(m)
        if check_message(m, node.id) is not None:
            assert node.raw.status().dropped_messages == dropped + 1
            assert node.raw.hard_state() == hard
        node.drain()
        check_local_invariants(node, term)
        node.tick()
        node.drain()


@settings(max_examples=60, deadline=None)
@given(m=messages(2))
def test_stale_messages_change_nothing(m: Message) -> None:
    net = Net.of(3)
    net.elect(1)
    follower = net[2]
    for _ in range(12):  # raise its term well above 1 by a few elections elsewhere
        follower.raw.step(Message(MessageType.VOTE, 3, 2, follower.term + 1, index=99, log_term=99))
        follower.tick(10)
    follower.drain()
    stale = dataclasses.replace(m, dst=2, src=3, term=min(m.term, follower.term - 1) % 2**64)
    if stale.term >= follower.term:
        return
    before = (follower.raw.hard_state(), follower.raw.soft_state(), follower.storage.last_index())
    follower.raw.step(stale)
    follower.drain()
    after = (follower.raw.hard_state(), follower.raw.soft_state(), follower.storage.last_index())
    assert after == before


def corrupt(m: Message, rng: random.Random, receiver_term: int) -> Message:
    """A copy of an in-flight message that the receiver must ignore or drop."""
    choice = rng.randrange(7)
    if choice == 0 and receiver_term > 0:
        return dataclasses.replace(m, term=rng.randrange(receiver_term))  # stale
    if choice == 1:
        return dataclasses.replace(m, term=-1)
    if choice == 2:
        return dataclasses.replace(m, index=2**64 + rng.randrange(9))
    if choice == 3:
        return dataclasses.replace(m, src=m.dst)
    if choice == 4 and m.type == MessageType.APPEND and m.entries:
        shuffled = tuple(reversed(m.entries)) + (Entry(1, m.term + 1, EntryType.NORMAL),)
        return dataclasses.replace(m, entries=shuffled)
    if choice == 5:
        kind = rng.choice(
            [
                MessageType.APPEND_RESP,
                MessageType.HEARTBEAT_RESP,
                MessageType.READ_INDEX_RESP,
                MessageType.TIMEOUT_NOW,
            ]
        )
        return dataclasses.replace(m, type=kind, src=999)  # unknown sender
    return dataclasses.replace(m, type=77)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), size=st.sampled_from([3, 5]), rate=st.floats(0.05, 0.5))
def test_corrupted_traffic_never_breaks_a_cluster(seed: int, size: int, rate: float) -> None:
    cluster = Cluster(size, seed)
    rng = random.Random(seed ^ 0x5EED)
    try:
        for _ in range(800):
            cluster.random_step()
            if cluster.net and rng.random() < rate:
                original = rng.choice(cluster.net)
                dst = cluster.nodes.get(original.dst)
                if dst is not None and dst.raw is not None:
                    dst.raw.step(corrupt(original, rng, dst.raw.term))
                    cluster.checker.observe(dst)
        cluster.heal_all()
        cluster.check_liveness(800)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{cluster.describe()}") from error
    assert any(n.raw and n.raw.soft_state().role == Role.LEADER for n in cluster.nodes.values())
