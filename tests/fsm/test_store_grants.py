"""KeyStore: key policies and grants (apply, idempotency by name, removal, snapshots)."""

from __future__ import annotations

from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import resources_pb2 as res

from kmsd.fsm.store import KeyStore

KEY = "00000000-0000-4000-8000-000000000001"
OTHER = "00000000-0000-4000-8000-000000000002"
G1, G2, G3 = (f"{n:064x}" for n in (1, 2, 3))


class Applier:
    """Applies commands in log order to a store."""

    def __init__(self, store: KeyStore | None = None) -> None:
        self.store = store or KeyStore()
        self.index = self.store.applied_index

    def __call__(self, command: fsm.Command) -> fsm.CommandResult:
        self.index += 1
        return self.store.apply(self.index, command.SerializeToString())


def _create_key(key_id: str) -> fsm.Command:
    command = fsm.Command(now_ms=1000, principal="alice")
    command.create_key.CopyFrom(
        fsm.CreateKey(key_id=key_id, wrapped_material=b"w", policy="initial")
    )
    return command


def _grant(grant_id: str, key_id: str = KEY, name: str = "", grantee: str = "bob") -> fsm.Command:
    command = fsm.Command(now_ms=2000, principal="alice")
    command.create_grant.CopyFrom(
        fsm.CreateGrant(
            key_id=key_id,
            grant_id=grant_id,
            name=name,
            grantee_principal=grantee,
            retiring_principal="carol",
            operations=[res.GRANT_OPERATION_DECRYPT, res.GRANT_OPERATION_ENCRYPT],
            constraints=res.GrantConstraints(encryption_context_equals={"tenant": "a"}),
        )
    )
    return command


def _setup() -> Applier:
    apply = Applier()
    assert not apply(_create_key(KEY)).HasField("error")
    assert not apply(_create_key(OTHER)).HasField("error")
    return apply


def test_put_key_policy_replaces_the_document() -> None:
    apply = _setup()
    key = apply.store.key(KEY)
    assert key is not None and key.policy == "initial"
    command = fsm.Command(now_ms=3000)
    command.put_key_policy.CopyFrom(fsm.PutKeyPolicy(key_id=KEY, policy='{"x": 1}'))
    assert apply(command).key_id == KEY
    assert apply.store.key(KEY).policy == '{"x": 1}'  # type: ignore[union-attr]
    command.put_key_policy.key_id = "00000000-0000-4000-8000-00000000dead"
    assert apply(command).error.reason == "NOT_FOUND"
    command.put_key_policy.CopyFrom(fsm.PutKeyPolicy(key_id=KEY, policy=""))
    assert apply(command).error.field == "policy"


def test_create_grant_records_it_and_returns_its_id() -> None:
    apply = _setup()
    result = apply(_grant(G1))
    assert result.grant_id == G1 and result.key_id == KEY
    grant = apply.store.grant(G1)
    assert grant is not None
    assert grant.issuing_principal == "alice" and grant.creation_ms == 2000
    assert grant.create_index == apply.index
    assert dict(grant.constraints.encryption_context_equals) == {"tenant": "a"}
    assert apply.store.grants_for(KEY, "bob") == [grant]
    assert apply.store.grants_for(KEY, "carol") == []
    assert apply.store.grants_for(OTHER, "bob") == []
    assert apply.store.retirable_grants("carol") == [grant]
    # A taken grant id is a conflict, never an overwrite.
    assert apply(_grant(G1, OTHER)).error.reason == "CONFLICT"
    # On a key pending deletion: KMSInvalidStateException.
    schedule = fsm.Command(now_ms=3000)
    schedule.schedule_key_deletion.CopyFrom(
        fsm.ScheduleKeyDeletion(key_id=OTHER, pending_window_in_days=7)
    )
    apply(schedule)
    assert apply(_grant(G2, OTHER)).error.reason == "KMS_INVALID_STATE"


def test_a_named_grant_is_created_once() -> None:
    apply = _setup()
    assert apply(_grant(G1, name="backup")).grant_id == G1
    # Same name and parameters, new proposed id: the existing grant is returned.
    assert apply(_grant(G2, name="backup")).grant_id == G1
    assert apply.store.grant(G2) is None
    # Same name, other parameters: a new grant (names need not be unique).
    assert apply(_grant(G3, name="backup", grantee="dave")).grant_id == G3
    assert [g.grant_id for g in apply.store.grants_of(KEY)] == [G1, G3]


def test_retire_and_revoke_remove_the_grant() -> None:
    apply = _setup()
    apply(_grant(G1))
    apply(_grant(G2))
    retire = fsm.Command(now_ms=3000)
    retire.retire_grant.CopyFrom(fsm.RetireGrant(key_id=KEY, grant_id=G1))
    assert apply(retire).grant_id == G1
    assert apply.store.grant(G1) is None
    assert apply(retire).error.reason == "NOT_FOUND"
    revoke = fsm.Command(now_ms=3000)
    revoke.revoke_grant.CopyFrom(fsm.RevokeGrant(key_id=OTHER, grant_id=G2))
    assert apply(revoke).error.reason == "NOT_FOUND"  # the grant is on another key
    revoke.revoke_grant.key_id = KEY
    assert not apply(revoke).HasField("error")
    assert apply.store.grants_for(KEY, "bob") == []
    assert apply.store.retirable_grants("carol") == []


def test_deleting_a_key_deletes_its_grants() -> None:
    apply = _setup()
    apply(_grant(G1))
    apply(_grant(G2, OTHER))
    schedule = fsm.Command(now_ms=3000)
    schedule.schedule_key_deletion.CopyFrom(
        fsm.ScheduleKeyDeletion(key_id=KEY, pending_window_in_days=7)
    )
    apply(schedule)
    key = apply.store.key(KEY)
    assert key is not None
    delete = fsm.Command(now_ms=key.deletion_date_ms)
    delete.delete_key.CopyFrom(fsm.DeleteKey(key_id=KEY, deletion_date_ms=key.deletion_date_ms))
    assert not apply(delete).HasField("error")
    assert apply.store.grant(G1) is None and apply.store.grants_of(KEY) == []
    assert apply.store.grant(G2) is not None


def test_snapshot_keeps_policies_and_grants() -> None:
    apply = _setup()
    apply(_grant(G1))
    apply(_grant(G2, OTHER, grantee="dave"))
    restored = KeyStore()
    restored.restore(apply.store.snapshot())
    assert restored.snapshot() == apply.store.snapshot()
    assert restored.grants_for(OTHER, "dave") == apply.store.grants_for(OTHER, "dave")
    assert restored.retirable_grants("carol") == apply.store.retirable_grants("carol")
    assert restored.key(KEY).policy == "initial"  # type: ignore[union-attr]
    # And it goes on identically.
    then = Applier(restored)
    revoke = fsm.Command(now_ms=3000)
    revoke.revoke_grant.CopyFrom(fsm.RevokeGrant(key_id=KEY, grant_id=G1))
    then(revoke)
    apply(revoke)
    assert restored.snapshot() == apply.store.snapshot()
