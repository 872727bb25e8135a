"""KeyStore: deterministic apply, snapshot/restore, idempotency, the key-state table."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import resources_pb2 as res

from kmsd.errors import DisabledError, InvalidStateError
from kmsd.fsm.key_states import check_key_state
from kmsd.fsm.store import DAY_MS, DEDUPE_TTL_MS, KeyStore
from kmsd.log.single_node import SingleNodeLog

KEY_IDS = [f"00000000-0000-4000-8000-{n:012d}" for n in range(4)]


def _random_command(rng: random.Random, now_ms: int) -> fsm.Command:
    command = fsm.Command(now_ms=now_ms, request_id=rng.choice(["", "", "r1", "r2", "r3"]))
    key_id = rng.choice(KEY_IDS)
    kind = rng.randrange(16)
    grant_id = f"{rng.randrange(4):064x}"
    if kind == 0:
        command.create_key.CopyFrom(
            fsm.CreateKey(
                key_id=key_id,
                wrapped_material=rng.randbytes(8),
                key_spec=res.KEY_SPEC_SYMMETRIC_DEFAULT,
                origin=res.ORIGIN_AWS_KMS,
            )
        )
    elif kind == 1:
        command.enable_key.key_id = key_id
    elif kind == 2:
        command.disable_key.key_id = key_id
    elif kind == 3:
        command.schedule_key_deletion.CopyFrom(
            fsm.ScheduleKeyDeletion(key_id=key_id, pending_window_in_days=7)
        )
    elif kind == 4:
        command.cancel_key_deletion.key_id = key_id
    elif kind == 5:
        command.create_alias.CopyFrom(
            fsm.CreateAlias(alias_name=f"alias/{rng.randrange(3)}", target_key_id=key_id)
        )
    elif kind == 6:
        command.update_alias.CopyFrom(
            fsm.UpdateAlias(alias_name=f"alias/{rng.randrange(3)}", target_key_id=key_id)
        )
    elif kind == 7:
        command.delete_alias.alias_name = f"alias/{rng.randrange(3)}"
    elif kind == 8:
        command.rotate_key.CopyFrom(
            fsm.RotateKey(
                key_id=key_id,
                version=rng.randrange(1, 4),
                wrapped_material=b"w",
                rotation_type=res.ROTATION_TYPE_ON_DEMAND,
            )
        )
    elif kind == 9:
        command.tag_resource.CopyFrom(
            fsm.TagResource(
                key_id=key_id, tags=[res.Tag(tag_key=f"k{rng.randrange(3)}", tag_value="v")]
            )
        )
    elif kind == 10:
        command.delete_key.CopyFrom(fsm.DeleteKey(key_id=key_id, deletion_date_ms=now_ms))
    elif kind == 12:
        command.put_key_policy.CopyFrom(fsm.PutKeyPolicy(key_id=key_id, policy=f"p{now_ms}"))
    elif kind == 13:
        command.principal = rng.choice(["alice", "bob"])
        command.create_grant.CopyFrom(
            fsm.CreateGrant(
                key_id=key_id,
                grant_id=grant_id,
                name=rng.choice(["", "n"]),
                grantee_principal=rng.choice(["bob", "carol"]),
                operations=[res.GRANT_OPERATION_ENCRYPT],
                constraints=res.GrantConstraints(
                    encryption_context_subset={"t": str(rng.randrange(2))}
                ),
            )
        )
    elif kind == 14:
        command.retire_grant.CopyFrom(fsm.RetireGrant(key_id=key_id, grant_id=grant_id))
    elif kind == 15:
        command.revoke_grant.CopyFrom(fsm.RevokeGrant(key_id=key_id, grant_id=grant_id))
    else:
        command.enable_key_rotation.CopyFrom(
            fsm.EnableKeyRotation(key_id=key_id, rotation_period_in_days=90)
        )
    return command


def _log(seed: int, length: int) -> list[bytes]:
    rng = random.Random(seed)
    now = 1_767_225_600_000
    commands = []
    for _ in range(length):
        now += rng.randrange(0, 3 * DAY_MS)
        commands.append(_random_command(rng, now).SerializeToString())
    return commands


@pytest.mark.parametrize("seed", range(20))
def test_same_log_same_state_and_snapshot_round_trip(seed: int) -> None:
    commands = _log(seed, 200)
    a, b = KeyStore(), KeyStore()
    results_a = [a.apply(i, c) for i, c in enumerate(commands, 1)]
    results_b = [b.apply(i, c) for i, c in enumerate(commands, 1)]
    assert results_a == results_b
    assert a.snapshot() == b.snapshot()
    # A store restored from a mid-log snapshot ends where a store that applied it all does.
    half = KeyStore()
    for i, c in enumerate(commands[:100], 1):
        half.apply(i, c)
    restored = KeyStore()
    restored.restore(half.snapshot())
    for i, c in enumerate(commands[100:], 101):
        restored.apply(i, c)
    assert restored.snapshot() == a.snapshot()
    assert restored.applied_index == 200


def _every_other_update(key_id: str, now_ms: int) -> list[fsm.Command]:
    """Updates the random log does not draw, so a frozen image meets every kind."""
    return [
        fsm.Command(
            now_ms=now_ms,
            update_key_description=fsm.UpdateKeyDescription(key_id=key_id, description="d"),
        ),
        fsm.Command(
            now_ms=now_ms,
            enable_key_rotation=fsm.EnableKeyRotation(key_id=key_id, rotation_period_in_days=90),
        ),
        fsm.Command(now_ms=now_ms, disable_key_rotation=fsm.DisableKeyRotation(key_id=key_id)),
        fsm.Command(
            now_ms=now_ms,
            untag_resource=fsm.UntagResource(key_id=key_id, tag_keys=["k0", "k1", "k2"]),
        ),
    ]


@pytest.mark.parametrize("seed", range(10))
def test_a_frozen_image_is_the_state_when_it_was_frozen(seed: int) -> None:
    """freeze() lets a snapshot be encoded on another thread while commands go on being
    applied: every later command, of every kind, must leave the image untouched."""
    commands = _log(seed, 300)
    for key_id in KEY_IDS:
        commands += [c.SerializeToString() for c in _every_other_update(key_id, 1_767_225_600)]
    store = KeyStore()
    images: list[tuple[bytes, Iterator[bytes]]] = []
    changed = 0
    for index, command in enumerate(commands, 1):
        if index % 25 == 1:
            images.append((store.snapshot(), store.freeze()))
        before = store.snapshot()
        store.apply(index, command)
        changed += store.snapshot() != before
    assert changed > 100, "the log must really change the state"
    for expected, frozen in images:
        assert b"".join(frozen) == expected


def _cold_snapshot(store: KeyStore) -> bytes:
    """A snapshot encoding every record anew (no earlier encodings to reuse)."""
    store._encodings = {}
    return store.snapshot()


@pytest.mark.parametrize("seed", range(5))
def test_a_snapshot_reusing_earlier_encodings_equals_one_made_cold(seed: int) -> None:
    """Snapshots reuse the previous one's encoding of records that are the same
    objects; a record replaced since (every kind of update) must be encoded anew."""
    commands = _log(seed, 300)
    for key_id in KEY_IDS:
        commands += [c.SerializeToString() for c in _every_other_update(key_id, 1_767_225_600)]
    warm, cold = KeyStore(), KeyStore()
    for index, command in enumerate(commands, 1):
        warm.apply(index, command)
        cold.apply(index, command)
        if index % 3 == 0:
            warm.snapshot()
        if index % 7 == 0:
            assert warm.snapshot() == _cold_snapshot(cold)
    assert warm.snapshot() == _cold_snapshot(cold)


def test_request_id_is_idempotent_and_bound_to_its_parameters() -> None:
    store = KeyStore()
    create = fsm.Command(request_id="once", now_ms=1)
    create.create_key.CopyFrom(fsm.CreateKey(key_id=KEY_IDS[0], wrapped_material=b"w"))
    first = store.apply(1, create.SerializeToString())
    again = store.apply(2, create.SerializeToString())
    assert first == again and not first.HasField("error")
    assert len(store.keys()) == 1
    other = fsm.Command(request_id="once", now_ms=2)
    other.create_key.CopyFrom(fsm.CreateKey(key_id=KEY_IDS[1], wrapped_material=b"w"))
    refused = store.apply(3, other.SerializeToString())
    assert refused.error.field == "request_id"
    assert len(store.keys()) == 1
    # Remembered ids expire by log time, so the table stays bounded.
    later = fsm.Command(now_ms=2 + DEDUPE_TTL_MS + 1)
    later.enable_key.key_id = KEY_IDS[0]
    store.apply(4, later.SerializeToString())
    assert not store.apply(5, other.SerializeToString()).HasField("error")
    assert len(store.keys()) == 2


def test_deleting_a_key_removes_its_aliases_and_checks_the_date() -> None:
    store = KeyStore()
    commands = [fsm.Command(now_ms=1) for _ in range(3)]
    commands[0].create_key.CopyFrom(fsm.CreateKey(key_id=KEY_IDS[0], wrapped_material=b"w"))
    commands[1].create_alias.CopyFrom(
        fsm.CreateAlias(alias_name="alias/a", target_key_id=KEY_IDS[0])
    )
    commands[2].schedule_key_deletion.CopyFrom(
        fsm.ScheduleKeyDeletion(key_id=KEY_IDS[0], pending_window_in_days=7)
    )
    for i, c in enumerate(commands, 1):
        assert not store.apply(i, c.SerializeToString()).HasField("error")
    due = 1 + 7 * DAY_MS
    early = fsm.Command(now_ms=due - 1)
    early.delete_key.CopyFrom(fsm.DeleteKey(key_id=KEY_IDS[0], deletion_date_ms=due))
    assert store.apply(4, early.SerializeToString()).error.reason == "CONFLICT"
    on_time = fsm.Command(now_ms=due)
    on_time.delete_key.CopyFrom(fsm.DeleteKey(key_id=KEY_IDS[0], deletion_date_ms=due))
    assert not store.apply(5, on_time.SerializeToString()).HasField("error")
    assert store.key(KEY_IDS[0]) is None and store.alias("alias/a") is None


def test_undecodable_command_is_rejected_not_raised() -> None:
    store = KeyStore()
    assert store.apply(1, b"\xff\xff\xff").error.reason == "KMS_INTERNAL"
    assert store.applied_index == 1


@pytest.mark.parametrize(
    ("operation", "state", "error"),
    [
        ("Encrypt", res.KEY_STATE_ENABLED, None),
        ("Encrypt", res.KEY_STATE_DISABLED, DisabledError),
        ("Decrypt", res.KEY_STATE_PENDING_DELETION, InvalidStateError),
        ("EnableKey", res.KEY_STATE_PENDING_DELETION, InvalidStateError),
        ("EnableKey", res.KEY_STATE_DISABLED, None),
        ("CancelKeyDeletion", res.KEY_STATE_ENABLED, InvalidStateError),
        ("CancelKeyDeletion", res.KEY_STATE_PENDING_DELETION, None),
        ("DescribeKey", res.KEY_STATE_PENDING_DELETION, None),
        ("DeleteAlias", res.KEY_STATE_PENDING_DELETION, None),
        ("CreateAlias", res.KEY_STATE_PENDING_DELETION, InvalidStateError),
        ("RotateKeyOnDemand", res.KEY_STATE_DISABLED, DisabledError),
        ("TagResource", res.KEY_STATE_DISABLED, None),
    ],
)
def test_key_state_table(operation: str, state: int, error: type[Exception] | None) -> None:
    if error is None:
        check_key_state(operation, "arn", state)
    else:
        with pytest.raises(error):
            check_key_state(operation, "arn", state)


def test_restart_rebuilds_the_same_state(tmp_path: Path) -> None:
    commands = _log(7, 300)

    async def run() -> tuple[bytes, bytes]:
        store = KeyStore()
        log = SingleNodeLog(tmp_path, store, snapshot_every=64)
        await log.start()
        for command in commands:
            await log.propose(command)
        before = store.snapshot()
        await log.stop()
        again = KeyStore()
        log = SingleNodeLog(tmp_path, again, snapshot_every=64)
        await log.start()
        after = again.snapshot()
        await log.stop()
        return before, after

    before, after = asyncio.run(run())
    assert before == after
