"""Properties: any history produced by a sequential execution whose operations'
intervals are widened around their real effect is linearizable, and the checker's
witness is a legal order; partitioning never changes a verdict."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import replace
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd.checker import UNKNOWN, CheckResult, KeyStoreModel, KVModel, Model, Operation, check

S = TypeVar("S", bound=Hashable)

SPACING = 10  # time between two consecutive effects of the sequential execution
WIDEN = st.integers(0, 25 * SPACING)


def assert_witness_is_legal(result: CheckResult, model: Model[S]) -> None:
    """Replays each partition's witness: outputs must match and real time must hold."""
    for partition in result.partitions:
        order = partition.linearization
        assert sorted(map(id, order)) == sorted(map(id, partition.operations))
        state = model.init()
        for position, o in enumerate(order):
            output = UNKNOWN if o.indeterminate else o.output
            legal, state = model.step(state, o.op, o.args, output)
            assert legal, o
            # No later operation in the order returned before this one was called.
            assert all(later.ret_or_inf >= o.call for later in order[position + 1 :])


@st.composite
def widened(
    draw: st.DrawFn, effects: list[tuple[str, tuple[object, ...], object]]
) -> list[Operation]:
    """Gives each effect an interval around its instant; some become indeterminate,
    and some never-applied operations are added as timeouts or definite failures."""
    history: list[Operation] = []
    for index, (name, args, output) in enumerate(effects):
        at = (index + 1) * SPACING
        call = max(0, at - draw(WIDEN))
        # A create whose answer was lost has an id nobody learned, so no later operation
        # could name it: only creates that never took effect time out (added below).
        if name != "create" and draw(st.integers(0, 9)) == 0:
            history.append(Operation(index, name, args, call, None, None, None))
        else:
            history.append(Operation(index, name, args, call, at + draw(WIDEN), output, True))
    horizon = (len(effects) + 2) * SPACING
    for n, (name, args, _) in enumerate(
        draw(st.lists(st.sampled_from(effects), max_size=3)) if effects else []
    ):
        call = draw(st.integers(0, horizon))
        if draw(st.booleans()):
            history.append(Operation(1000 + n, name, args, call, None, None, None))
        else:
            failed = Operation(1000 + n, name, args, call, call + draw(WIDEN), "Error", False)
            history.append(failed)
    return draw(st.permutations(history))


@st.composite
def kv_executions(draw: st.DrawFn) -> list[tuple[str, tuple[object, ...], object]]:
    values: dict[int, int] = {}
    effects: list[tuple[str, tuple[object, ...], object]] = []
    for _ in range(draw(st.integers(0, 40))):
        key, value = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        kind = draw(st.sampled_from(["get", "put", "cas"]))
        if kind == "get":
            effects.append(("get", (key,), values.get(key)))
        elif kind == "put":
            values[key] = value
            effects.append(("put", (key, value), "ok"))
        else:
            expected = draw(st.integers(0, 2))
            swapped = values.get(key) == expected
            if swapped:
                values[key] = value
            effects.append(("cas", (key, expected, value), swapped))
    return effects


_NEXT = {
    ("enable", "Enabled"): ("ok", "Enabled"),
    ("enable", "Disabled"): ("ok", "Enabled"),
    ("disable", "Enabled"): ("ok", "Disabled"),
    ("disable", "Disabled"): ("ok", "Disabled"),
    ("schedule_deletion", "Enabled"): ("ok", "PendingDeletion"),
    ("schedule_deletion", "Disabled"): ("ok", "PendingDeletion"),
    ("cancel_deletion", "PendingDeletion"): ("ok", "Disabled"),
    ("encrypt_allowed", "Enabled"): ("ok", "Enabled"),
    ("encrypt_allowed", "Disabled"): ("DisabledException", "Disabled"),
}


@st.composite
def keystore_executions(
    draw: st.DrawFn, max_ops: int = 40
) -> list[tuple[str, tuple[object, ...], object]]:
    keys: dict[str, str] = {}
    effects: list[tuple[str, tuple[object, ...], object]] = []
    for _ in range(draw(st.integers(0, max_ops))):
        if not keys or draw(st.integers(0, 5)) == 0:
            key_id = f"key-{len(keys)}"
            keys[key_id] = "Enabled"
            effects.append(("create", (), key_id))
            continue
        key_id = draw(st.sampled_from([*sorted(keys), "missing"]))
        name = draw(
            st.sampled_from(
                ["enable", "disable", "schedule_deletion", "cancel_deletion", "describe"]
                + ["encrypt_allowed"]
            )
        )
        state = keys.get(key_id)
        if state is None:
            output = "NotFound" if name == "describe" else "NotFoundException"
        elif name == "describe":
            output = state
        else:
            output, keys[key_id] = _NEXT.get((name, state), ("KMSInvalidStateException", state))
        effects.append((name, (key_id,), output))
    return effects


@settings(max_examples=300, deadline=None)
@given(kv_executions().flatmap(widened))
def test_widened_kv_executions_are_linearizable(history: list[Operation]) -> None:
    model = KVModel()
    result = check(history, model, timeout_s=30)
    assert result.ok is True, result.explanation
    assert_witness_is_legal(result, model)


@settings(max_examples=300, deadline=None)
@given(keystore_executions().flatmap(widened))
def test_widened_keystore_executions_are_linearizable(history: list[Operation]) -> None:
    model = KeyStoreModel()
    result = check(history, model, timeout_s=30)
    assert result.ok is True, result.explanation
    assert_witness_is_legal(result, model)


@settings(max_examples=200, deadline=None)
@given(
    # Small: a non-linearizable history searched as one partition costs the product
    # of the per-key searches.
    keystore_executions(max_ops=15).flatmap(widened),
    st.lists(st.tuples(st.integers(0, 60), st.sampled_from(["Enabled", "ok", "Disabled"]))),
)
def test_partitioning_never_changes_the_verdict(
    history: list[Operation], corruptions: list[tuple[int, str]]
) -> None:
    corrupted = list(history)
    for index, output in corruptions:
        if index < len(corrupted) and corrupted[index].ok and corrupted[index].op != "create":
            corrupted[index] = replace(corrupted[index], output=output)
    partitioned = check(corrupted, KeyStoreModel(), timeout_s=30)
    whole = check(corrupted, KeyStoreModel(partitioned=False), timeout_s=30)
    assert partitioned.ok is not None and whole.ok is not None
    assert partitioned.ok is whole.ok
