"""KmsClient methods: each of the 34 RPCs is called with the fields its keyword arguments name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import resources_pb2 as res
from kms_fake import FakeCluster, FakeKms

from kms_client.client import KmsClient

Call = Callable[[KmsClient], Any]

# (client call, RPC name, fields expected in the request the server received)
CASES: list[tuple[str, Call, dict[str, Any]]] = [
    (
        "CreateKey",
        lambda c: c.create_key(
            "d",
            key_spec="SYMMETRIC_DEFAULT",
            key_usage="ENCRYPT_DECRYPT",
            tags={"t": "v"},
            request_id="r",
        ),
        {
            "description": "d",
            "key_spec": res.KEY_SPEC_SYMMETRIC_DEFAULT,
            "key_usage": res.KEY_USAGE_ENCRYPT_DECRYPT,
            "tags": [res.Tag(tag_key="t", tag_value="v")],
            "request_id": "r",
        },
    ),
    (
        "DescribeKey",
        lambda c: c.describe_key("k", grant_tokens=["g"], min_commit_index=7),
        {"key_id": "k", "grant_tokens": ["g"], "min_commit_index": 7},
    ),
    ("ListKeys", lambda c: c.list_keys(limit=2, marker="m"), {"limit": 2, "marker": "m"}),
    (
        "UpdateKeyDescription",
        lambda c: c.update_key_description("k", "new", request_id="r"),
        {"key_id": "k", "description": "new", "request_id": "r"},
    ),
    ("EnableKey", lambda c: c.enable_key("k", request_id="r"), {"key_id": "k", "request_id": "r"}),
    ("DisableKey", lambda c: c.disable_key("k"), {"key_id": "k"}),
    (
        "ScheduleKeyDeletion",
        lambda c: c.schedule_key_deletion("k", pending_window_in_days=7),
        {"key_id": "k", "pending_window_in_days": 7},
    ),
    ("CancelKeyDeletion", lambda c: c.cancel_key_deletion("k"), {"key_id": "k"}),
    (
        "Encrypt",
        lambda c: c.encrypt(
            "k",
            b"p",
            {"a": "b"},
            grant_tokens=["g"],
            encryption_algorithm="SYMMETRIC_DEFAULT",
            dry_run=True,
        ),
        {
            "key_id": "k",
            "plaintext": b"p",
            "encryption_context": {"a": "b"},
            "grant_tokens": ["g"],
            "encryption_algorithm": res.ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT,
            "dry_run": True,
        },
    ),
    (
        "Decrypt",
        lambda c: c.decrypt(
            b"c", {"a": "b"}, key_id="k", dry_run=True, dry_run_modifiers=["IGNORE_CIPHERTEXT"]
        ),
        {
            "ciphertext_blob": b"c",
            "encryption_context": {"a": "b"},
            "key_id": "k",
            "dry_run": True,
            "dry_run_modifiers": [pb.DRY_RUN_MODIFIER_IGNORE_CIPHERTEXT],
        },
    ),
    (
        "ReEncrypt",
        lambda c: c.re_encrypt(
            b"c",
            "dest",
            source_encryption_context={"s": "1"},
            source_key_id="src",
            destination_encryption_context={"d": "2"},
        ),
        {
            "ciphertext_blob": b"c",
            "destination_key_id": "dest",
            "source_key_id": "src",
            "source_encryption_context": {"s": "1"},
            "destination_encryption_context": {"d": "2"},
        },
    ),
    (
        "GenerateDataKey",
        lambda c: c.generate_data_key("k", {"a": "b"}, key_spec="AES_128"),
        {"key_id": "k", "encryption_context": {"a": "b"}, "key_spec": res.DATA_KEY_SPEC_AES_128},
    ),
    (
        "GenerateDataKeyWithoutPlaintext",
        lambda c: c.generate_data_key_without_plaintext("k", number_of_bytes=64),
        {"key_id": "k", "number_of_bytes": 64, "key_spec": res.DATA_KEY_SPEC_UNSPECIFIED},
    ),
    ("GenerateRandom", lambda c: c.generate_random(16), {"number_of_bytes": 16}),
    (
        "CreateAlias",
        lambda c: c.create_alias("alias/a", "k"),
        {"alias_name": "alias/a", "target_key_id": "k"},
    ),
    (
        "UpdateAlias",
        lambda c: c.update_alias("alias/a", "k2"),
        {"alias_name": "alias/a", "target_key_id": "k2"},
    ),
    ("DeleteAlias", lambda c: c.delete_alias("alias/a"), {"alias_name": "alias/a"}),
    (
        "ListAliases",
        lambda c: c.list_aliases(key_id="k", limit=5),
        {"key_id": "k", "limit": 5},
    ),
    (
        "EnableKeyRotation",
        lambda c: c.enable_key_rotation("k", rotation_period_in_days=90),
        {"key_id": "k", "rotation_period_in_days": 90},
    ),
    ("DisableKeyRotation", lambda c: c.disable_key_rotation("k"), {"key_id": "k"}),
    (
        "GetKeyRotationStatus",
        lambda c: c.get_key_rotation_status("k", min_commit_index=3),
        {"key_id": "k", "min_commit_index": 3},
    ),
    ("RotateKeyOnDemand", lambda c: c.rotate_key_on_demand("k"), {"key_id": "k"}),
    (
        "ListKeyRotations",
        lambda c: c.list_key_rotations("k", include_key_material="ALL_KEY_MATERIAL", limit=1),
        {
            "key_id": "k",
            "include_key_material": pb.INCLUDE_KEY_MATERIAL_ALL_KEY_MATERIAL,
            "limit": 1,
        },
    ),
    (
        "TagResource",
        lambda c: c.tag_resource("k", [res.Tag(tag_key="a", tag_value="b")]),
        {"key_id": "k", "tags": [res.Tag(tag_key="a", tag_value="b")]},
    ),
    ("UntagResource", lambda c: c.untag_resource("k", "a"), {"key_id": "k", "tag_keys": ["a"]}),
    ("ListResourceTags", lambda c: c.list_resource_tags("k", limit=3), {"key_id": "k", "limit": 3}),
    (
        "PutKeyPolicy",
        lambda c: c.put_key_policy("k", "{}", bypass_policy_lockout_safety_check=True),
        {
            "key_id": "k",
            "policy": "{}",
            "policy_name": "default",
            "bypass_policy_lockout_safety_check": True,
        },
    ),
    (
        "GetKeyPolicy",
        lambda c: c.get_key_policy("k", min_commit_index=2),
        {"key_id": "k", "policy_name": "default", "min_commit_index": 2},
    ),
    ("ListKeyPolicies", lambda c: c.list_key_policies("k", limit=1), {"key_id": "k", "limit": 1}),
    (
        "CreateGrant",
        lambda c: c.create_grant(
            "k",
            "spiffe://x/bob",
            ["Encrypt", "GRANT_OPERATION_DECRYPT", res.GRANT_OPERATION_RE_ENCRYPT_FROM],
            retiring_principal="spiffe://x/alice",
            encryption_context_subset={"a": "b"},
            grant_tokens=["g"],
            name="n",
        ),
        {
            "key_id": "k",
            "grantee_principal": "spiffe://x/bob",
            "retiring_principal": "spiffe://x/alice",
            "operations": [
                res.GRANT_OPERATION_ENCRYPT,
                res.GRANT_OPERATION_DECRYPT,
                res.GRANT_OPERATION_RE_ENCRYPT_FROM,
            ],
            "constraints": res.GrantConstraints(encryption_context_subset={"a": "b"}),
            "grant_tokens": ["g"],
            "name": "n",
        },
    ),
    (
        "ListGrants",
        lambda c: c.list_grants("k", grantee_principal="p", limit=4),
        {"key_id": "k", "grantee_principal": "p", "limit": 4},
    ),
    (
        "ListRetirableGrants",
        lambda c: c.list_retirable_grants("p", marker="m"),
        {"retiring_principal": "p", "marker": "m"},
    ),
    (
        "RetireGrant",
        lambda c: c.retire_grant(grant_token="t", dry_run=True),
        {"grant_token": "t", "dry_run": True},
    ),
    (
        "RevokeGrant",
        lambda c: c.revoke_grant("k", "g"),
        {"key_id": "k", "grant_id": "g"},
    ),
]

MUTATING = {
    "CreateKey",
    "UpdateKeyDescription",
    "EnableKey",
    "DisableKey",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "EnableKeyRotation",
    "DisableKeyRotation",
    "RotateKeyOnDemand",
    "TagResource",
    "UntagResource",
    "PutKeyPolicy",
    "CreateGrant",
    "RetireGrant",
    "RevokeGrant",
}


@pytest.fixture
def echo(cluster: FakeCluster) -> FakeKms:
    """A node that models nothing: every RPC returns its empty response."""
    node = cluster.start("echo")
    for name in dir(FakeKms):
        if name.startswith("do_"):
            setattr(node, name, None)
    return node


def test_cases_cover_every_rpc() -> None:
    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["KeyManagementService"].methods}
    assert len(rpcs) == 34
    assert {name for name, _, _ in CASES} == rpcs


@pytest.mark.parametrize(("rpc", "call", "expected"), CASES, ids=[c[0] for c in CASES])
def test_method_sends_its_rpc(
    rpc: str,
    call: Call,
    expected: dict[str, Any],
    echo: FakeKms,
    make_client: Callable[..., KmsClient],
) -> None:
    client = make_client([echo.address])
    response = call(client)
    assert type(response).__name__ == f"{rpc}Response"
    assert [name for name, _ in echo.calls] == [rpc]
    request: Any = echo.calls[0][1]
    for field, value in expected.items():
        got = getattr(request, field)
        if isinstance(value, dict):
            got = dict(got)
        elif isinstance(value, list):
            got = list(got)
        assert got == value, field
    if rpc in MUTATING:
        assert request.request_id, "mutations carry a request_id by default"


def test_enum_arguments_accept_every_spelling(
    echo: FakeKms, make_client: Callable[..., KmsClient]
) -> None:
    client = make_client([echo.address])
    for spelling in (
        "SYMMETRIC_DEFAULT",
        "symmetric-default",
        "KEY_SPEC_SYMMETRIC_DEFAULT",
        res.KEY_SPEC_SYMMETRIC_DEFAULT,
    ):
        client.create_key(key_spec=spelling)
    assert {r.key_spec for r in echo.calls_of("CreateKey")} == {res.KEY_SPEC_SYMMETRIC_DEFAULT}
    with pytest.raises(ValueError, match="not a valid KeySpec"):
        client.create_key(key_spec="RSA_1024")
    with pytest.raises(ValueError):
        client.create_key(key_spec=999)
    assert len(echo.calls_of("CreateKey")) == 4


def test_generate_data_key_defaults_to_aes_256(
    echo: FakeKms, make_client: Callable[..., KmsClient]
) -> None:
    client = make_client([echo.address])
    client.generate_data_key("k")
    client.generate_data_key("k", number_of_bytes=24)
    first, second = echo.calls_of("GenerateDataKey")
    assert first.key_spec == res.DATA_KEY_SPEC_AES_256 and first.number_of_bytes == 0
    assert second.key_spec == res.DATA_KEY_SPEC_UNSPECIFIED and second.number_of_bytes == 24


def test_iter_keys_follows_markers(fake: FakeKms, client: KmsClient) -> None:
    created = [client.create_key(str(i)).key_metadata.key_id for i in range(5)]
    listed = [entry.key_id for entry in client.iter_keys(limit=2)]
    assert listed == sorted(created)
    assert [r.marker for r in fake.calls_of("ListKeys")] == ["", "2", "4"]


def test_crypto_round_trip_against_fake(client: KmsClient) -> None:
    key = client.create_key("k").key_metadata
    client.create_alias("alias/app", key.key_id)
    blob = client.encrypt("alias/app", b"hello", {"tenant": "a"}).ciphertext_blob
    out = client.decrypt(blob, {"tenant": "a"}, key_id=key.key_id)
    assert out.plaintext == b"hello"
    assert out.key_id == key.arn


def test_tags_round_trip(client: KmsClient) -> None:
    key = client.create_key(tags={"team": "billing"}).key_metadata
    client.tag_resource(key.key_id, {"env": "prod"})
    assert {t.tag_key: t.tag_value for t in client.iter_resource_tags(key.key_id)} == {
        "team": "billing",
        "env": "prod",
    }
