"""End-to-end: CreateAlias, UpdateAlias, DeleteAlias, ListAliases and alias resolution,
over a real kmsd process (including across a restart)."""

from __future__ import annotations

import time

import grpc
import pytest
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res
from test_e2e_errors import ARN_PREFIX, assert_kms_error, assert_near, new_key

from kmsd_process import KmsdProcess

Code = grpc.StatusCode
Stub = pb_grpc.KeyManagementServiceStub


def _create(stub: Stub, alias_name: str, target: str) -> int:
    return stub.CreateAlias(
        pb.CreateAliasRequest(alias_name=alias_name, target_key_id=target)
    ).commit_index


def _aliases(stub: Stub, key_id: str = "") -> dict[str, res.AliasListEntry]:
    out = stub.ListAliases(pb.ListAliasesRequest(key_id=key_id, limit=100))
    assert not out.truncated
    return {a.alias_name: a for a in out.aliases}


def _target(stub: Stub, key_ref: str) -> str:
    return stub.DescribeKey(pb.DescribeKeyRequest(key_id=key_ref)).key_metadata.key_id


def test_create_and_resolve_an_alias(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    assert _create(stub, "alias/payments", key.key_id) > 0
    assert _target(stub, "alias/payments") == key.key_id
    assert _target(stub, f"{ARN_PREFIX}alias/payments") == key.key_id
    entry = _aliases(stub)["alias/payments"]
    assert entry.alias_arn == f"{ARN_PREFIX}alias/payments"
    assert entry.target_key_id == key.key_id
    assert_near(entry.creation_date, time.time())
    assert entry.last_updated_date == entry.creation_date
    # The alias works in crypto operations, and the result names the key.
    out = stub.Encrypt(pb.EncryptRequest(key_id="alias/payments", plaintext=b"x"))
    assert out.key_id == key.arn


def test_create_alias_by_key_arn_and_many_aliases_per_key(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    _create(stub, "alias/by-arn", key.arn)
    _create(stub, "alias/team/sub_name-2", key.key_id)
    assert set(_aliases(stub, key.key_id)) == {"alias/by-arn", "alias/team/sub_name-2"}
    assert set(_aliases(stub, key.arn)) == {"alias/by-arn", "alias/team/sub_name-2"}


def test_alias_names_are_case_sensitive(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    a, b = new_key(stub), new_key(stub)
    _create(stub, "alias/CaseTest", a.key_id)
    _create(stub, "alias/casetest", b.key_id)
    assert _target(stub, "alias/CaseTest") == a.key_id
    assert _target(stub, "alias/casetest") == b.key_id


def test_update_alias_points_it_at_another_key(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    first, second = new_key(stub), new_key(stub)
    _create(stub, "alias/moving", first.key_id)
    blob = stub.Encrypt(pb.EncryptRequest(key_id="alias/moving", plaintext=b"old")).ciphertext_blob
    created = _aliases(stub)["alias/moving"]
    out = stub.UpdateAlias(
        pb.UpdateAliasRequest(alias_name="alias/moving", target_key_id=second.arn)
    )
    assert out.commit_index > 0
    assert _target(stub, "alias/moving") == second.key_id
    updated = _aliases(stub)["alias/moving"]
    assert updated.target_key_id == second.key_id
    assert updated.creation_date == created.creation_date
    assert (updated.last_updated_date.seconds, updated.last_updated_date.nanos) >= (
        created.last_updated_date.seconds,
        created.last_updated_date.nanos,
    )
    assert "alias/moving" not in _aliases(stub, first.key_id)
    assert "alias/moving" in _aliases(stub, second.key_id)
    # Ciphertexts bind the key, not the alias: the old one decrypts; naming the alias now
    # names another key.
    assert stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob)).plaintext == b"old"
    assert_kms_error(
        lambda: stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, key_id="alias/moving")),
        Code.INVALID_ARGUMENT,
        "IncorrectKeyException",
    )


def test_update_alias_errors(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    assert_kms_error(
        lambda: stub.UpdateAlias(
            pb.UpdateAliasRequest(alias_name="alias/never-made", target_key_id=key.key_id)
        ),
        Code.NOT_FOUND,
        "NotFoundException",
    )
    _create(stub, "alias/update-errors", key.key_id)
    assert_kms_error(
        lambda: stub.UpdateAlias(
            pb.UpdateAliasRequest(
                alias_name="alias/update-errors",
                target_key_id="11111111-2222-4333-8444-555555555555",
            )
        ),
        Code.NOT_FOUND,
        "NotFoundException",
    )
    assert _target(stub, "alias/update-errors") == key.key_id


def test_delete_alias_leaves_the_key(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    _create(stub, "alias/short-lived", key.key_id)
    out = stub.DeleteAlias(pb.DeleteAliasRequest(alias_name="alias/short-lived"))
    assert out.commit_index > 0
    assert "alias/short-lived" not in _aliases(stub)
    assert_kms_error(
        lambda: stub.DescribeKey(pb.DescribeKeyRequest(key_id="alias/short-lived")),
        Code.NOT_FOUND,
        "NotFoundException",
    )
    assert _target(stub, key.key_id) == key.key_id
    assert_kms_error(
        lambda: stub.DeleteAlias(pb.DeleteAliasRequest(alias_name="alias/short-lived")),
        Code.NOT_FOUND,
        "NotFoundException",
    )
    # The name is free again.
    _create(stub, "alias/short-lived", key.key_id)
    assert _target(stub, "alias/short-lived") == key.key_id


def test_alias_name_already_exists(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    a, b = new_key(stub), new_key(stub)
    _create(stub, "alias/taken", a.key_id)
    for target in (a.key_id, b.key_id):
        assert_kms_error(
            lambda target=target: _create(stub, "alias/taken", target),
            Code.ALREADY_EXISTS,
            "AlreadyExistsException",
        )
    assert _target(stub, "alias/taken") == a.key_id


@pytest.mark.parametrize(
    "name",
    [
        "payments",  # no prefix
        "Alias/payments",
        "alias/",
        "alias/aws/managed",
        "alias/has space",
        "alias/colon:name",
        "alias/dot.name",
        "alias/émoji",
        "alias/" + "a" * 251,  # 257 characters
    ],
)
def test_bad_alias_names(kmsd: KmsdProcess, name: str) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    assert_kms_error(
        lambda: _create(stub, name, key.key_id),
        Code.INVALID_ARGUMENT,
        "InvalidAliasNameException",
        field="alias_name",
    )


def test_longest_alias_name_is_accepted(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    name = "alias/" + "a" * 250
    assert len(name) == 256
    _create(stub, name, key.key_id)
    assert _target(stub, name) == key.key_id


def test_alias_target_must_be_a_key_not_an_alias(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    _create(stub, "alias/real-target", key.key_id)
    for target in ("alias/real-target", f"{ARN_PREFIX}alias/real-target"):
        assert_kms_error(
            lambda target=target: _create(stub, "alias/second-hop", target),
            Code.INVALID_ARGUMENT,
            "ValidationException",
            field="target_key_id",
        )
        assert_kms_error(
            lambda target=target: stub.UpdateAlias(
                pb.UpdateAliasRequest(alias_name="alias/real-target", target_key_id=target)
            ),
            Code.INVALID_ARGUMENT,
            "ValidationException",
            field="target_key_id",
        )
    assert_kms_error(
        lambda: _create(stub, "alias/no-target", ""),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="target_key_id",
    )
    assert_kms_error(
        lambda: _create(stub, "alias/missing-target", "11111111-2222-4333-8444-555555555555"),
        Code.NOT_FOUND,
        "NotFoundException",
    )


def test_alias_to_a_key_pending_deletion(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    live, doomed = new_key(stub), new_key(stub)
    _create(stub, "alias/to-doomed", doomed.key_id)
    _create(stub, "alias/to-live", live.key_id)
    stub.ScheduleKeyDeletion(pb.ScheduleKeyDeletionRequest(key_id=doomed.key_id))
    assert_kms_error(
        lambda: _create(stub, "alias/new-to-doomed", doomed.key_id),
        Code.FAILED_PRECONDITION,
        "KMSInvalidStateException",
    )
    assert_kms_error(
        lambda: stub.UpdateAlias(
            pb.UpdateAliasRequest(alias_name="alias/to-live", target_key_id=doomed.key_id)
        ),
        Code.FAILED_PRECONDITION,
        "KMSInvalidStateException",
    )
    # Existing aliases of the key still resolve and can be deleted or moved away.
    assert _target(stub, "alias/to-doomed") == doomed.key_id
    stub.UpdateAlias(pb.UpdateAliasRequest(alias_name="alias/to-doomed", target_key_id=live.key_id))
    stub.DeleteAlias(pb.DeleteAliasRequest(alias_name="alias/to-doomed"))


def test_list_aliases_pages(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    names = {f"alias/page-{n}" for n in range(5)}
    for name in names:
        _create(stub, name, key.key_id)
    seen: list[str] = []
    marker = ""
    while True:
        out = stub.ListAliases(pb.ListAliasesRequest(key_id=key.key_id, limit=2, marker=marker))
        assert len(out.aliases) <= 2
        assert all(a.target_key_id == key.key_id for a in out.aliases)
        seen.extend(a.alias_name for a in out.aliases)
        assert out.truncated == bool(out.next_marker)
        if not out.truncated:
            break
        marker = out.next_marker
    assert sorted(seen) == sorted(names)
    # Paging over all aliases sees each once.
    everything: list[str] = []
    marker = ""
    while True:
        out = stub.ListAliases(pb.ListAliasesRequest(limit=3, marker=marker))
        everything.extend(a.alias_name for a in out.aliases)
        if not out.truncated:
            break
        marker = out.next_marker
    assert len(everything) == len(set(everything))
    assert names <= set(everything)


def test_list_aliases_errors(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    for limit in (-1, 101):
        assert_kms_error(
            lambda limit=limit: stub.ListAliases(pb.ListAliasesRequest(limit=limit)),
            Code.INVALID_ARGUMENT,
            "ValidationException",
            field="limit",
        )
    assert_kms_error(
        lambda: stub.ListAliases(pb.ListAliasesRequest(marker="not-a-marker")),
        Code.INVALID_ARGUMENT,
        "InvalidMarkerException",
        field="marker",
    )
    assert_kms_error(
        lambda: stub.ListAliases(
            pb.ListAliasesRequest(key_id="11111111-2222-4333-8444-555555555555")
        ),
        Code.NOT_FOUND,
        "NotFoundException",
    )
    assert_kms_error(
        lambda: stub.ListAliases(pb.ListAliasesRequest(key_id="arn:aws:s3:::bucket")),
        Code.INVALID_ARGUMENT,
        "InvalidArnException",
    )
    # A marker of one key's listing is no marker for another's.
    a, b = new_key(stub), new_key(stub)
    for n in range(2):
        _create(stub, f"alias/marker-{n}", a.key_id)
    marker = stub.ListAliases(pb.ListAliasesRequest(key_id=a.key_id, limit=1)).next_marker
    assert marker
    assert_kms_error(
        lambda: stub.ListAliases(pb.ListAliasesRequest(key_id=b.key_id, marker=marker)),
        Code.INVALID_ARGUMENT,
        "InvalidMarkerException",
    )


def test_delete_alias_with_a_bad_name(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    assert_kms_error(
        lambda: stub.DeleteAlias(pb.DeleteAliasRequest(alias_name="no-prefix")),
        Code.INVALID_ARGUMENT,
        "InvalidAliasNameException",
        field="alias_name",
    )


def test_aliases_survive_a_restart(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key, other = new_key(stub), new_key(stub)
    _create(stub, "alias/durable", key.key_id)
    _create(stub, "alias/durable-moved", key.key_id)
    stub.UpdateAlias(
        pb.UpdateAliasRequest(alias_name="alias/durable-moved", target_key_id=other.key_id)
    )
    _create(stub, "alias/durable-deleted", key.key_id)
    stub.DeleteAlias(pb.DeleteAliasRequest(alias_name="alias/durable-deleted"))
    blob = stub.Encrypt(pb.EncryptRequest(key_id="alias/durable", plaintext=b"d")).ciphertext_blob
    before = _aliases(stub)
    kmsd.stop()
    kmsd.restart()
    stub = kmsd.stub()
    assert _aliases(stub) == before
    assert _target(stub, "alias/durable") == key.key_id
    assert _target(stub, "alias/durable-moved") == other.key_id
    assert "alias/durable-deleted" not in before
    out = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, key_id="alias/durable"))
    assert out.plaintext == b"d"
    again = stub.Encrypt(pb.EncryptRequest(key_id="alias/durable", plaintext=b"e"))
    assert again.key_id == key.arn
