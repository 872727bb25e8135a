"""The checker on chaos-sized histories: thousands of operations over tens of keys.

The histories come from simulating a linearizable key store: each operation takes
effect at a random instant inside a random interval, several clients overlap, and a
few operations time out (some of those take effect much later, some never).
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, replace

import pytest

from kmsd.checker import KeyStoreModel, KVModel, Operation, check

CLIENTS = 8
# The budget a chaos run can afford; the checks below finish far inside it.
BUDGET_S = 10.0

_TRANSITIONS: dict[str, dict[str, tuple[str, str]]] = {
    # op -> {state: (output, next state)}, written out independently of the model.
    "enable": {
        "Enabled": ("ok", "Enabled"),
        "Disabled": ("ok", "Enabled"),
        "PendingDeletion": ("KMSInvalidStateException", "PendingDeletion"),
    },
    "disable": {
        "Enabled": ("ok", "Disabled"),
        "Disabled": ("ok", "Disabled"),
        "PendingDeletion": ("KMSInvalidStateException", "PendingDeletion"),
    },
    "schedule_deletion": {
        "Enabled": ("ok", "PendingDeletion"),
        "Disabled": ("ok", "PendingDeletion"),
        "PendingDeletion": ("KMSInvalidStateException", "PendingDeletion"),
    },
    "cancel_deletion": {
        "Enabled": ("KMSInvalidStateException", "Enabled"),
        "Disabled": ("KMSInvalidStateException", "Disabled"),
        "PendingDeletion": ("ok", "Disabled"),
    },
    "describe": {s: (s, s) for s in ("Enabled", "Disabled", "PendingDeletion")},
    "encrypt_allowed": {
        "Enabled": ("ok", "Enabled"),
        "Disabled": ("DisabledException", "Disabled"),
        "PendingDeletion": ("KMSInvalidStateException", "PendingDeletion"),
    },
}
_WEIGHTS = {
    "describe": 30,
    "encrypt_allowed": 30,
    "enable": 12,
    "disable": 12,
    "schedule_deletion": 5,
    "cancel_deletion": 8,
}


@dataclass
class _InFlight:
    client_id: int
    op: str
    args: tuple[object, ...]
    call: int
    output: object = None


def _apply_keystore(store: dict[str, str], flight: _InFlight, next_id: list[int]) -> object:
    if flight.op == "create":
        key_id = f"key-{next_id[0]:04d}"
        next_id[0] += 1
        store[key_id] = "Enabled"
        return key_id
    key_id = str(flight.args[0])
    if key_id not in store:
        return "NotFound" if flight.op == "describe" else "NotFoundException"
    output, store[key_id] = _TRANSITIONS[flight.op][store[key_id]]
    return output


def simulate_keystore(
    seed: int, n_ops: int = 5000, n_keys: int = 50, indeterminate: float = 0.02
) -> list[Operation]:
    """A history of a linearizable key store under `CLIENTS` concurrent clients."""
    rng = random.Random(seed)
    store: dict[str, str] = {}
    next_id = [0]
    known: list[str] = []  # ids whose create has returned: what clients can name
    history: list[Operation] = []
    creates = 0
    # Events: (time, sequence, kind, slot, flight); kinds: call, effect, return.
    events: list[tuple[int, int, str, int, _InFlight | None]] = []
    sequence = 0
    generation = [0] * CLIENTS

    def push(at: int, kind: str, slot: int, flight: _InFlight | None) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, (at, sequence, kind, slot, flight))

    for slot in range(CLIENTS):
        push(rng.randrange(50), "call", slot, None)
    issued = 0
    while events:
        now, _, kind, slot, flight = heapq.heappop(events)
        if kind == "call":
            if issued >= n_ops:
                continue
            issued += 1
            client_id = slot + CLIENTS * generation[slot]
            want_create = creates < n_keys and (not known or rng.random() < 1.5 * n_keys / n_ops)
            if want_create:
                creates += 1
                flight = _InFlight(client_id, "create", (), now)
            else:
                op = rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()))[0]
                key_id = rng.choice(known) if known and rng.random() > 0.01 else "key-missing"
                flight = _InFlight(client_id, op, (key_id,), now)
            if rng.random() < indeterminate:
                # A timeout: the effect lands much later or never; the client gives up
                # and continues under a new id, as a Jepsen process does after :info.
                if rng.random() < 0.5:
                    push(now + rng.randrange(1, 3000), "effect", slot, flight)
                history.append(Operation(client_id, flight.op, flight.args, now, None, None, None))
                generation[slot] += 1
                push(now + 200 + rng.randrange(1, 20), "call", slot, None)
            else:
                push(now + rng.randrange(1, 60), "effect", slot, flight)
        elif kind == "effect":
            assert flight is not None
            flight.output = _apply_keystore(store, flight, next_id)
            if flight.client_id == slot + CLIENTS * generation[slot]:
                push(now + rng.randrange(1, 60), "return", slot, flight)
        else:
            assert flight is not None
            history.append(
                Operation(
                    flight.client_id, flight.op, flight.args, flight.call, now, flight.output, True
                )
            )
            if flight.op == "create":
                known.append(str(flight.output))
            push(now + rng.randrange(0, 10), "call", slot, None)
    return history


def simulate_kv(seed: int, n_ops: int = 5000, n_keys: int = 50) -> list[Operation]:
    """A history of a linearizable map of registers under `CLIENTS` concurrent clients."""
    rng = random.Random(seed)
    values: dict[int, int] = {}
    history: list[Operation] = []
    pending: list[tuple[int, int, int, str, tuple[object, ...], int]] = []
    clock = [rng.randrange(50) for _ in range(CLIENTS)]
    for _ in range(n_ops):
        slot = min(range(CLIENTS), key=clock.__getitem__)
        call = clock[slot]
        effect = call + rng.randrange(1, 60)
        ret = effect + rng.randrange(1, 60)
        key = rng.randrange(n_keys)
        roll = rng.random()
        if roll < 0.5:
            pending.append((effect, ret, slot, "get", (key,), call))
        elif roll < 0.85:
            pending.append((effect, ret, slot, "put", (key, rng.randrange(5)), call))
        else:
            pending.append(
                (effect, ret, slot, "cas", (key, rng.randrange(5), rng.randrange(5)), call)
            )
        clock[slot] = ret + rng.randrange(0, 10)
    # Apply in effect order; every effect lies inside its own interval.
    for _effect, ret, slot, op, args, call in sorted(pending):
        key = int(str(args[0]))
        current = values.get(key)
        output: object
        if op == "get":
            output = current
        elif op == "put":
            values[key] = int(str(args[1]))
            output = "ok"
        else:
            output = current == args[1]
            if output:
                values[key] = int(str(args[2]))
        history.append(Operation(slot, op, args, call, ret, output, True))
    return history


def _inject_not_found(history: list[Operation]) -> tuple[list[Operation], int]:
    """A describe that says a key whose create had returned does not exist."""
    created = {o.output: o.ret for o in history if o.op == "create" and o.ok}
    for index, o in enumerate(history):
        if o.op != "describe" or not o.ok or o.output == "NotFound":
            continue
        created_at = created.get(o.args[0])
        if created_at is not None and created_at < o.call:
            bad = list(history)
            bad[index] = replace(o, output="NotFound")
            return bad, index
    raise AssertionError("no describe to corrupt")


def _inject_pending_deletion(history: list[Operation]) -> tuple[list[Operation], int]:
    """A describe that sees PendingDeletion before anyone asked to delete the key."""
    first_schedule: dict[object, int] = {}
    for o in history:
        if o.op == "schedule_deletion":
            first_schedule[o.args[0]] = min(first_schedule.get(o.args[0], o.call), o.call)
    for index, o in enumerate(history):
        if o.op == "describe" and o.ok and o.output in ("Enabled", "Disabled"):
            scheduled = first_schedule.get(o.args[0])
            if o.ret is not None and (scheduled is None or scheduled > o.ret):
                bad = list(history)
                bad[index] = replace(o, output="PendingDeletion")
                return bad, index
    raise AssertionError("no describe to corrupt")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_keystore_history_of_5000_ops_checks_in_seconds(seed: int) -> None:
    history = simulate_keystore(seed)
    assert len(history) == 5000
    assert len({o.output for o in history if o.op == "create" and o.ok}) >= 45
    assert sum(o.indeterminate for o in history) >= 50
    started = time.monotonic()
    result = check(history, KeyStoreModel(), timeout_s=BUDGET_S)
    elapsed = time.monotonic() - started
    assert result.ok is True, result.explanation
    assert elapsed < BUDGET_S / 2
    assert 45 <= len(result.partitions) <= 52


@pytest.mark.parametrize("inject", [_inject_not_found, _inject_pending_deletion])
def test_keystore_history_with_one_anomaly_is_caught(inject: object) -> None:
    assert callable(inject)
    history, index = inject(simulate_keystore(7))
    result = check(history, KeyStoreModel(), timeout_s=BUDGET_S)
    assert result.ok is False
    [bad] = result.counterexamples
    assert bad.key == history[index].args[0]
    assert bad.blocking == history[index]
    assert all(p.ok for p in result.partitions if p is not bad)
    assert "cannot place" in result.explanation


def test_kv_history_of_5000_ops_checks_in_seconds_and_a_stale_read_is_caught() -> None:
    history = simulate_kv(11)
    result = check(history, KVModel(), timeout_s=BUDGET_S)
    assert result.ok is True, result.explanation
    assert result.elapsed_s < BUDGET_S / 2
    # A get of a value nobody ever wrote to that key cannot be placed anywhere.
    index = next(i for i, o in enumerate(history) if o.op == "get")
    corrupted = list(history)
    corrupted[index] = replace(history[index], output=99)
    result = check(corrupted, KVModel(), timeout_s=BUDGET_S)
    assert result.ok is False
    assert [p.key for p in result.counterexamples] == [history[index].args[0]]


def test_unpartitioned_check_agrees_on_a_smaller_history() -> None:
    history = simulate_keystore(5, n_ops=1000, n_keys=10)
    partitioned = check(history, KeyStoreModel(), timeout_s=BUDGET_S)
    whole = check(history, KeyStoreModel(partitioned=False), timeout_s=BUDGET_S)
    assert partitioned.ok is True and whole.ok is True
    assert len(whole.partitions) == 1


def test_timeout_gives_an_undecided_verdict() -> None:
    # Twenty concurrent writes and an impossible read: every subset of writes must be
    # tried before the read can be rejected, which no budget of a fraction of a
    # second covers.
    history = [Operation(i, "put", ("k", i), 0, 1000, "ok", True) for i in range(20)]
    history.append(Operation(99, "get", ("k",), 2000, 2001, 999, True))
    started = time.monotonic()
    result = check(history, KVModel(), timeout_s=0.2)
    assert result.ok is None
    assert time.monotonic() - started < 2.0
    assert result.partitions[0].ok is None
    assert "timed out" in result.explanation
    # The same shape, small enough to finish, is rejected.
    assert check(history[:8] + history[-1:], KVModel()).ok is False


def test_a_violation_is_found_even_when_another_partition_times_out() -> None:
    history = [Operation(i, "put", ("big", i), 0, 1000, "ok", True) for i in range(22)]
    history.append(Operation(99, "get", ("big",), 2000, 2001, 999, True))
    history.append(Operation(0, "put", ("small", 1), 0, 10, "ok", True))
    history.append(Operation(1, "get", ("small",), 20, 30, None, True))
    result = check(history, KVModel(), timeout_s=0.3)
    assert result.ok is False
    assert {p.key: p.ok for p in result.partitions} == {"big": None, "small": False}
