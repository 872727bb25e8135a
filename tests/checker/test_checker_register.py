"""Textbook histories of a read/write/CAS register, and the search against brute force."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd.checker import UNKNOWN, KVModel, Operation, RegisterModel, check


def op(
    client: int, name: str, args: tuple[object, ...], call: int, ret: int | None, out: object = "ok"
) -> Operation:
    """A completed operation, or an indeterminate one when `ret` is None."""
    if ret is None:
        return Operation(client, name, args, call, None, None, None)
    return Operation(client, name, args, call, ret, out, True)


def w(client: int, value: int, call: int, ret: int | None) -> Operation:
    return op(client, "write", (value,), call, ret)


def r(client: int, value: object, call: int, ret: int) -> Operation:
    return op(client, "read", (), call, ret, value)


def verdict(history: Sequence[Operation], initial: object = 0) -> bool | None:
    return check(history, RegisterModel(initial=initial), timeout_s=10).ok


def test_empty_history_is_linearizable() -> None:
    result = check([], RegisterModel())
    assert result.ok is True
    assert result.partitions == ()


def test_sequential_write_then_read() -> None:
    assert verdict([w(0, 1, 0, 10), r(1, 1, 20, 30)]) is True


def test_read_concurrent_with_a_write_may_see_either_value() -> None:
    assert verdict([w(0, 1, 0, 10), r(1, 1, 5, 15)]) is True
    assert verdict([w(0, 1, 0, 10), r(1, 0, 5, 15)]) is True


def test_stale_read_after_a_completed_write_is_not_linearizable() -> None:
    result = check([w(0, 1, 0, 10), r(1, 0, 20, 30)], RegisterModel(initial=0))
    assert result.ok is False
    [bad] = result.counterexamples
    assert bad.blocking == r(1, 0, 20, 30)
    assert [o.op for o in bad.linearization] == ["write"]
    assert bad.state == 1
    assert "cannot place" in bad.explanation and "read() -> 0" in bad.explanation


def test_touching_intervals_count_as_concurrent() -> None:
    # ret == call is not "strictly before": the read may still go first.
    assert verdict([w(0, 1, 0, 10), r(1, 0, 10, 20)]) is True


def test_new_then_old_value_inversion_is_not_linearizable() -> None:
    # One slow write; once a read saw 1, no later read may see the old 0.
    history = [w(0, 1, 0, 100), r(1, 1, 10, 20), r(2, 0, 30, 40)]
    assert verdict(history) is False
    # Both reads concurrent with each other: either order works.
    assert verdict([w(0, 1, 0, 100), r(1, 1, 10, 40), r(2, 0, 30, 50)]) is True


def test_two_concurrent_writes_may_be_seen_in_either_order() -> None:
    history = [w(0, 1, 0, 100), w(1, 2, 0, 100), r(2, 2, 10, 20), r(2, 1, 30, 40)]
    assert verdict(history) is True
    # ...but not flip back once both writes have returned and 1 was seen last.
    history += [r(3, 1, 110, 120), r(3, 2, 130, 140)]
    assert verdict(history) is False


def test_indeterminate_write_may_take_effect_much_later() -> None:
    history = [
        w(0, 1, 0, None),  # timed out
        w(1, 2, 10, 20),
        r(2, 2, 30, 40),
        r(2, 1, 1000, 1010),  # the lost write landed at last
    ]
    assert verdict(history) is True


def test_indeterminate_write_may_never_take_effect() -> None:
    assert verdict([w(0, 1, 0, None), r(1, 0, 10, 20), r(1, 0, 1000, 1010)]) is True


def test_indeterminate_write_cannot_take_effect_before_its_call() -> None:
    assert verdict([r(1, 1, 0, 10), w(0, 1, 20, None)]) is False


def test_indeterminate_write_takes_effect_once() -> None:
    history = [w(0, 1, 0, None), r(1, 1, 10, 20), w(2, 2, 30, 40), r(1, 2, 50, 60)]
    assert verdict(history) is True
    # After 2 overwrote it, the single write of 1 cannot be seen again.
    assert verdict([*history, r(1, 1, 70, 80)]) is False
    # Two identical timed-out writes may land at two different moments.
    assert verdict([w(3, 1, 0, None), *history, r(1, 1, 70, 80)]) is True


def test_definite_failures_are_dropped() -> None:
    failed = Operation(0, "write", (1,), 0, 10, "ValidationException", False)
    result = check([failed, r(1, 0, 20, 30)], RegisterModel(initial=0))
    assert result.ok is True
    assert result.dropped == (failed,)


def test_indeterminate_reads_are_dropped() -> None:
    lost_read = Operation(1, "read", (), 0, None, None, None)
    result = check([w(0, 1, 0, 10), lost_read], RegisterModel())
    assert result.ok is True
    assert result.dropped == (lost_read,)


def test_cas_succeeds_only_on_the_expected_value() -> None:
    good = [w(0, 1, 0, 10), op(1, "cas", (1, 2), 20, 30, True), r(2, 2, 40, 50)]
    assert verdict(good) is True
    assert verdict([w(0, 1, 0, 10), op(1, "cas", (0, 2), 20, 30, True)]) is False
    # Two CASes from the same value cannot both succeed.
    racing = [op(1, "cas", (0, 1), 0, 10, True), op(2, "cas", (0, 2), 0, 10, True)]
    assert verdict(racing) is False
    assert verdict([racing[0], op(2, "cas", (0, 2), 0, 10, False)]) is True


def test_kv_model_checks_keys_independently() -> None:
    history = [
        op(0, "put", ("x", 1), 0, 10),
        op(1, "put", ("y", 2), 0, 10),
        op(2, "get", ("x",), 20, 30, 1),
        op(2, "get", ("y",), 40, 50, None),  # stale
        op(3, "get", ("z",), 40, 50, None),
    ]
    result = check(history, KVModel())
    assert result.ok is False
    assert [p.key for p in result.counterexamples] == ["y"]
    assert {p.key: p.ok for p in result.partitions} == {"x": True, "y": False, "z": True}
    assert "partition 'y'" in result.explanation


def test_explanation_names_the_operations_that_could_have_gone_next() -> None:
    history = [w(0, 1, 5, 10), op(1, "cas", (5, 6), 20, 100, True), r(2, 3, 30, 40)]
    result = check(history, RegisterModel(initial=0))
    assert result.ok is False
    [bad] = result.counterexamples
    assert bad.linearization == (history[0],)
    text = bad.explanation
    assert "cannot place: #2 client 2 [25, 35] read() -> 3 (illegal in this state)" in text
    assert "model state after the prefix: 1" in text
    assert "cas(5, 6) -> True (illegal in this state)" in text
    assert "[15, 95]" in text  # times are relative to the first call


# Brute force: try every order that respects real time. Only for tiny histories.


def brute_force(history: Sequence[Operation], model: RegisterModel) -> bool:
    ops = [o for o in history if o.ok is not False]
    for order in itertools.permutations(range(len(ops))):
        position = {i: p for p, i in enumerate(order)}
        if any(
            position[a] > position[b]
            for a, b in itertools.permutations(range(len(ops)), 2)
            if ops[a].ret_or_inf < ops[b].call
        ):
            continue
        state = model.init()
        for i in order:
            o = ops[i]
            legal, state = model.step(state, o.op, o.args, UNKNOWN if o.indeterminate else o.output)
            if not legal:
                break
        else:
            return True
    return False


@st.composite
def small_histories(draw: st.DrawFn) -> list[Operation]:
    history = []
    for client in range(draw(st.integers(1, 6))):
        call = draw(st.integers(0, 8))
        ret = call + draw(st.integers(0, 6))
        kind = draw(st.sampled_from(["write", "read", "cas"]))
        value = draw(st.integers(0, 2))
        outcome = draw(st.sampled_from(["ok", "ok", "ok", "info", "fail"]))
        if kind == "write":
            args: tuple[object, ...] = (value,)
            output: object = "ok"
        elif kind == "read":
            args, output = (), value
        else:
            args, output = (value, draw(st.integers(0, 2))), draw(st.booleans())
        if outcome == "info":
            history.append(Operation(client, kind, args, call, None, None, None))
        else:
            history.append(Operation(client, kind, args, call, ret, output, outcome == "ok"))
    return history


@settings(max_examples=400, deadline=None)
@given(small_histories())
def test_search_agrees_with_brute_force(history: list[Operation]) -> None:
    model = RegisterModel(initial=0)
    assert check(history, model).ok is brute_force(history, model)


@pytest.mark.parametrize("initial", [None, 0])
def test_initial_value_is_respected(initial: object) -> None:
    assert verdict([r(0, initial, 0, 10)], initial=initial) is True
    assert verdict([r(0, 5, 0, 10)], initial=initial) is False
