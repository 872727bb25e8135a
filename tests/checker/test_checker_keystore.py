"""The key store model: AWS key-state semantics, and histories kmsd must (not) produce."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kmsd.checker import DROP, UNKNOWN, KeyStoreModel, Operation, check
from kmsd.checker.models import KEY_OPERATIONS

K = "1234abcd-12ab-34cd-56ef-1234567890ab"


def op(
    client: int, name: str, call: int, ret: int | None, out: object = "ok", key: str = K
) -> Operation:
    """A completed key operation, or an indeterminate one when `ret` is None."""
    args: tuple[object, ...] = () if name == "create" else (key,)
    if ret is None:
        return Operation(client, name, args, call, None, None, None)
    return Operation(client, name, args, call, ret, out, True)


def create(call: int = 0, ret: int = 10, key: str = K) -> Operation:
    return op(0, "create", call, ret, key)


def verdict(history: Sequence[Operation]) -> bool | None:
    partitioned = check(history, KeyStoreModel(), timeout_s=10).ok
    # Locality: checking the whole history at once must give the same answer.
    assert check(history, KeyStoreModel(partitioned=False), timeout_s=10).ok is partitioned
    return partitioned


def test_describe_enabled_after_a_completed_disable_is_a_violation() -> None:
    history = [create(), op(1, "disable", 20, 30), op(2, "describe", 40, 50, "Enabled")]
    result = check(history, KeyStoreModel())
    assert result.ok is False
    [bad] = result.counterexamples
    assert bad.key == K
    assert bad.blocking == history[2]
    assert bad.state == ((K, "Disabled"),)
    assert (
        "describe(" in bad.explanation and "-> Enabled (illegal in this state)" in bad.explanation
    )


def test_describe_concurrent_with_a_disable_may_see_either_state() -> None:
    for seen in ("Enabled", "Disabled"):
        history = [create(), op(1, "disable", 20, 30), op(2, "describe", 25, 35, seen)]
        assert verdict(history) is True


def test_stale_describe_on_a_follower_after_the_disable_completed() -> None:
    # Client 2 reads from the leader and sees the disable; client 3 asks a lagging
    # follower afterwards and sees the old state: a stale read.
    history = [
        create(),
        op(1, "disable", 20, 30),
        op(2, "describe", 25, 35, "Disabled"),
        op(3, "describe", 40, 50, "Enabled"),
    ]
    assert verdict(history) is False
    # Even while the disable is still in flight, once one reader saw Disabled no
    # later reader may see Enabled.
    in_flight = [
        create(),
        op(1, "disable", 20, 100),
        op(2, "describe", 25, 35, "Disabled"),
        op(3, "describe", 40, 50, "Enabled"),
    ]
    assert verdict(in_flight) is False


def test_encrypt_concurrent_with_a_disable_may_succeed() -> None:
    for seen in ("ok", "DisabledException"):
        history = [create(), op(1, "disable", 20, 40), op(2, "encrypt_allowed", 25, 35, seen)]
        assert verdict(history) is True


def test_encrypt_after_a_completed_disable_must_fail() -> None:
    history = [create(), op(1, "disable", 20, 30), op(2, "encrypt_allowed", 40, 50, "ok")]
    assert verdict(history) is False
    history[2] = op(2, "encrypt_allowed", 40, 50, "DisabledException")
    assert verdict(history) is True


def test_encrypt_ok_after_a_completed_schedule_deletion_is_a_violation() -> None:
    history = [create(), op(1, "schedule_deletion", 20, 30), op(2, "encrypt_allowed", 40, 50)]
    assert verdict(history) is False
    history[2] = op(2, "encrypt_allowed", 40, 50, "KMSInvalidStateException")
    assert verdict(history) is True


def test_schedule_deletion_twice() -> None:
    first = op(1, "schedule_deletion", 20, 30)
    assert verdict([create(), first, op(2, "schedule_deletion", 40, 50)]) is False
    again = op(2, "schedule_deletion", 40, 50, "KMSInvalidStateException")
    assert verdict([create(), first, again]) is True
    # Concurrent: exactly one of them may win.
    both = [create(), op(1, "schedule_deletion", 20, 50), op(2, "schedule_deletion", 20, 50)]
    assert verdict(both) is False
    one = [both[0], both[1], op(2, "schedule_deletion", 20, 50, "KMSInvalidStateException")]
    assert verdict(one) is True


def test_cancel_deletion_leaves_the_key_disabled() -> None:
    history = [
        create(),
        op(1, "schedule_deletion", 20, 30),
        op(1, "cancel_deletion", 40, 50),
        op(2, "describe", 60, 70, "Disabled"),
    ]
    assert verdict(history) is True
    history[3] = op(2, "describe", 60, 70, "Enabled")
    assert verdict(history) is False
    # Cancelling a key that is not pending deletion is an invalid state.
    assert verdict([create(), op(1, "cancel_deletion", 20, 30)]) is False
    assert verdict([create(), op(1, "cancel_deletion", 20, 30, "KMSInvalidStateException")]) is True


def test_enable_and_disable_refuse_a_key_pending_deletion() -> None:
    for name in ("enable", "disable"):
        history = [create(), op(1, "schedule_deletion", 20, 30), op(2, name, 40, 50)]
        assert verdict(history) is False
        history[2] = op(2, name, 40, 50, "KMSInvalidStateException")
        assert verdict(history) is True


def test_enable_and_disable_are_idempotent() -> None:
    history = [
        create(),
        op(1, "enable", 20, 30),
        op(1, "disable", 40, 50),
        op(2, "disable", 60, 70),
        op(2, "describe", 80, 90, "Disabled"),
        op(1, "enable", 100, 110),
        op(2, "encrypt_allowed", 120, 130),
    ]
    assert verdict(history) is True


def test_a_key_is_not_found_until_its_create_takes_effect() -> None:
    assert verdict([op(1, "describe", 0, 5, "NotFound"), create(0, 10)]) is True
    assert verdict([create(0, 10), op(1, "describe", 20, 30, "NotFound")]) is False
    # Both spellings of not-found are accepted, for every operation.
    lookups = [op(1, name, 0, 5, "NotFoundException") for name in sorted(KEY_OPERATIONS)]
    assert verdict(lookups) is True
    assert verdict([op(1, "encrypt_allowed", 0, 5, "NotFound")]) is True
    assert verdict([op(1, "describe", 0, 5, "Enabled")]) is False


def test_indeterminate_create_is_dropped() -> None:
    lost = op(0, "create", 0, None)
    result = check([lost, op(1, "describe", 20, 30, "NotFound", key="other")], KeyStoreModel())
    assert result.ok is True
    assert result.dropped == (lost,)
    assert KeyStoreModel().partition("create", (), UNKNOWN) is DROP


def test_a_server_must_not_hand_out_a_key_id_twice() -> None:
    assert verdict([create(0, 10), create(20, 30)]) is False


def test_indeterminate_disable_may_land_late_but_only_once() -> None:
    history = [
        create(),
        op(1, "disable", 20, None),
        op(2, "describe", 30, 40, "Enabled"),
        op(2, "describe", 500, 510, "Disabled"),
        op(3, "enable", 600, 610),
        op(2, "describe", 700, 710, "Enabled"),
    ]
    assert verdict(history) is True
    # Nothing is left that could disable it again.
    assert verdict([*history, op(2, "describe", 800, 810, "Disabled")]) is False


def test_keys_are_checked_independently() -> None:
    other = "ffffffff-0000-4000-8000-000000000000"
    history = [
        create(0, 10),
        create(0, 10, key=other),
        op(1, "disable", 20, 30, key=other),
        op(2, "describe", 40, 50, "Enabled"),
        op(2, "describe", 40, 50, "Enabled", key=other),
    ]
    result = check(history, KeyStoreModel())
    assert result.ok is False
    assert [p.key for p in result.counterexamples] == [other]
    assert {p.key: p.ok for p in result.partitions} == {K: True, other: False}


def test_unknown_operations_are_rejected() -> None:
    with pytest.raises(ValueError, match="no operation"):
        check([create(), op(1, "rotate", 20, 30)], KeyStoreModel())


# The model against kmsd's own key-state table (kmsd/fsm/key_states.py).

_AWS_NAMES = {
    "enable": "EnableKey",
    "disable": "DisableKey",
    "schedule_deletion": "ScheduleKeyDeletion",
    "cancel_deletion": "CancelKeyDeletion",
    "describe": "DescribeKey",
    "encrypt_allowed": "Encrypt",
}


@pytest.mark.parametrize("operation", sorted(KEY_OPERATIONS))
@pytest.mark.parametrize("state", ["Enabled", "Disabled", "PendingDeletion"])
def test_model_matches_the_kmsd_key_state_table(operation: str, state: str) -> None:
    from kms.v1 import resources_pb2 as res

    from kmsd.errors import KmsError
    from kmsd.fsm.key_states import check_key_state

    numbers = {
        "Enabled": res.KEY_STATE_ENABLED,
        "Disabled": res.KEY_STATE_DISABLED,
        "PendingDeletion": res.KEY_STATE_PENDING_DELETION,
    }
    try:
        check_key_state(_AWS_NAMES[operation], "arn", numbers[state])
        server_error = None
    except KmsError as error:
        server_error = error.aws_exception
    expected, _ = KeyStoreModel.expect(operation, state)
    if server_error is not None:
        assert expected == server_error
    else:
        assert expected in ("ok", state)
