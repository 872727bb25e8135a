"""Authorization in the service layer with real principals: key policies, grants and
grant tokens, existence hiding, roles, and every RPC refusing a stranger.

Alice creates keys (the default policy gives her full access); Bob has no rights
until a grant or a policy gives him some; the administrator may do anything a policy
does not explicitly deny; Carol is not even a key creator.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import resources_pb2 as res

from inprocess import open_kms
from kmsd.auth.authorizer import ANONYMOUS, Caller
from kmsd.auth.grants import decode_token, encode_token
from kmsd.clock import FakeClock
from kmsd.config import AuthConfig
from kmsd.errors import (
    AccessDeniedError,
    DryRunError,
    InvalidCiphertextError,
    InvalidGrantIdError,
    InvalidGrantTokenError,
    KmsError,
    MalformedPolicyDocumentError,
    NotFoundError,
    ValidationError,
)
from kmsd.service import access, aliases, crypto_ops, grants, keys, policies, rotation, tags
from kmsd.service.context import Kms

ALICE = Caller("spiffe://kmsd.dev/user/alice")
BOB = Caller("spiffe://kmsd.dev/user/bob")
CAROL = Caller("spiffe://elsewhere/carol")
ADMIN = Caller("spiffe://kmsd.dev/admin")
AUTH = AuthConfig(
    administrators=(ADMIN.principal,),
    key_creators=("spiffe://kmsd.dev/user/*",),
)
MISSING = "00000000-0000-4000-8000-000000000000"
ACCOUNT = "111122223333"

Scenario = Callable[[Kms], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, auth: AuthConfig = AUTH) -> None:
    async def main() -> None:
        kms = await open_kms(tmp_path, FakeClock(), auth=auth)
        try:
            await scenario(kms)
        finally:
            await kms.log.stop()

    asyncio.run(main())


async def refused(call: Awaitable[Any], error: type[KmsError] = AccessDeniedError) -> KmsError:
    with pytest.raises(error) as info:
        await call
    return info.value


async def new_key(kms: Kms, caller: Caller = ALICE, **request: Any) -> str:
    created = await keys.create_key(kms, pb.CreateKeyRequest(**request), caller)
    return created.key_metadata.key_id


async def encrypt(
    kms: Kms, caller: Caller, key_id: str, context: dict[str, str] | None = None, **more: Any
) -> bytes:
    request = pb.EncryptRequest(
        key_id=key_id, plaintext=b"secret", encryption_context=context or {}, **more
    )
    return (await crypto_ops.encrypt(kms, request, caller)).ciphertext_blob


async def decrypt(
    kms: Kms, caller: Caller, blob: bytes, context: dict[str, str] | None = None, **more: Any
) -> bytes:
    request = pb.DecryptRequest(ciphertext_blob=blob, encryption_context=context or {}, **more)
    return (await crypto_ops.decrypt(kms, request, caller)).plaintext


async def grant_to(
    kms: Kms, key_id: str, grantee: Caller, *operations: int, caller: Caller = ALICE, **more: Any
) -> pb.CreateGrantResponse:
    request = pb.CreateGrantRequest(
        key_id=key_id, grantee_principal=grantee.principal, operations=operations, **more
    )
    return await grants.create_grant(kms, request, caller)


async def put_policy(
    kms: Kms, key_id: str, statements: list[dict[str, Any]], caller: Caller = ALICE, **more: Any
) -> None:
    document = json.dumps({"Version": "2012-10-17", "Statement": statements})
    request = pb.PutKeyPolicyRequest(key_id=key_id, policy=document, **more)
    await policies.put_key_policy(kms, request, caller)


def statement(effect: str, who: Caller | str, action: Any, **more: Any) -> dict[str, Any]:
    principal = who if isinstance(who, str) else {"AWS": who.principal}
    return {"Effect": effect, "Principal": principal, "Action": action, "Resource": "*", **more}


# ---- keys, the default policy, existence hiding ---------------------------------------


def test_alice_uses_her_key_and_bob_cannot(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        blob = await encrypt(kms, ALICE, key_id)
        assert await decrypt(kms, ALICE, blob) == b"secret"
        policy = await policies.get_key_policy(kms, pb.GetKeyPolicyRequest(key_id=key_id), ALICE)
        document = json.loads(policy.policy)
        assert policy.policy_name == "default"
        assert document["Statement"][0]["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
        assert document["Statement"][1]["Principal"] == {"AWS": ALICE.principal}
        for call in (
            encrypt(kms, BOB, key_id),
            decrypt(kms, BOB, blob),
            decrypt(kms, BOB, blob, key_id=key_id),
            keys.describe_key(kms, pb.DescribeKeyRequest(key_id=key_id), BOB),
            keys.disable_key(kms, pb.DisableKeyRequest(key_id=key_id), BOB),
            policies.get_key_policy(kms, pb.GetKeyPolicyRequest(key_id=key_id), BOB),
            grants.list_grants(kms, pb.ListGrantsRequest(key_id=key_id), BOB),
            grant_to(kms, key_id, BOB, res.GRANT_OPERATION_ENCRYPT, caller=BOB),
        ):
            error = await refused(call)
            assert BOB.principal in error.message
        # The administrator may use it (the default policy's root statement).
        assert await decrypt(kms, ADMIN, blob) == b"secret"

    run(tmp_path, scenario)


def test_bob_cannot_tell_an_existing_key_from_a_missing_one(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        await aliases.create_alias(
            kms, pb.CreateAliasRequest(alias_name="alias/real", target_key_id=key_id), ALICE
        )
        arn = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/"

        async def message(call: Callable[[str], Awaitable[Any]], ref: str) -> str:
            return (await refused(call(ref))).message.replace(ref, "<ref>")

        calls: list[Callable[[str], Awaitable[Any]]] = [
            lambda ref: encrypt(kms, BOB, ref),
            lambda ref: keys.describe_key(kms, pb.DescribeKeyRequest(key_id=ref), BOB),
            lambda ref: keys.enable_key(kms, pb.EnableKeyRequest(key_id=ref), BOB),
            lambda ref: rotation.list_key_rotations(
                kms, pb.ListKeyRotationsRequest(key_id=ref), BOB
            ),
            lambda ref: policies.put_key_policy(
                kms, pb.PutKeyPolicyRequest(key_id=ref, policy="{}"), BOB
            ),
            lambda ref: grants.revoke_grant(
                kms, pb.RevokeGrantRequest(key_id=ref, grant_id="ab" * 32), BOB
            ),
        ]
        pairs = [
            (key_id, MISSING),
            (arn + key_id, arn + MISSING),
            ("alias/real", "alias/missing"),
        ]
        for call in calls:
            for existing, missing in pairs:
                assert await message(call, existing) == await message(call, missing)
        # The administrator is told the truth.
        await refused(encrypt(kms, ADMIN, MISSING), NotFoundError)
        await refused(encrypt(kms, ADMIN, "alias/missing"), NotFoundError)
        # A ciphertext naming a missing key: AccessDenied to Bob, opaque to the admin.
        blob = bytearray(await encrypt(kms, ALICE, key_id))
        forged = bytes(blob[:1]) + bytes(16) + bytes(blob[17:])
        await refused(decrypt(kms, BOB, forged))
        await refused(decrypt(kms, ADMIN, forged), InvalidCiphertextError)
        # An unparsable ciphertext is InvalidCiphertext for everyone (nothing to authorize).
        await refused(decrypt(kms, BOB, b"\x09junk" * 20), InvalidCiphertextError)

    run(tmp_path, scenario)


def test_account_level_operations_need_a_key_creator(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        await new_key(kms, BOB)
        await new_key(kms, ADMIN)
        for call in (
            keys.create_key(kms, pb.CreateKeyRequest(), CAROL),
            keys.list_keys(kms, pb.ListKeysRequest(), CAROL),
            aliases.list_aliases(kms, pb.ListAliasesRequest(), CAROL),
            crypto_ops.generate_random(kms, pb.GenerateRandomRequest(number_of_bytes=8), CAROL),
            keys.create_key(kms, pb.CreateKeyRequest(), Caller(ANONYMOUS)),
        ):
            await refused(call)
        listed = await keys.list_keys(kms, pb.ListKeysRequest(), ALICE)
        assert len(listed.keys) == 2
        random_bytes = pb.GenerateRandomRequest(number_of_bytes=8)
        assert len((await crypto_ops.generate_random(kms, random_bytes, ALICE)).plaintext) == 8

    run(tmp_path, scenario)


def test_authorization_off_allows_everything(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        anonymous = Caller(ANONYMOUS)
        key_id = await new_key(kms, anonymous)
        blob = await encrypt(kms, BOB, key_id)
        assert await decrypt(kms, CAROL, blob) == b"secret"
        await put_policy(kms, key_id, [statement("Deny", "*", "kms:*")], caller=CAROL)
        assert await decrypt(kms, anonymous, blob) == b"secret"
        await refused(encrypt(kms, CAROL, MISSING), NotFoundError)

    run(tmp_path, scenario, AuthConfig(enabled=False))


# ---- grants ---------------------------------------------------------------------------


def test_a_grant_lets_bob_in_at_once_and_revoking_shuts_him_out(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        blob = await encrypt(kms, ALICE, key_id)
        await refused(decrypt(kms, BOB, blob))
        granted = await grant_to(
            kms, key_id, BOB, res.GRANT_OPERATION_DECRYPT, res.GRANT_OPERATION_ENCRYPT
        )
        token = decode_token(granted.grant_token)
        assert token.grant_id == granted.grant_id and token.index == granted.commit_index
        tokens = [granted.grant_token]
        assert await decrypt(kms, BOB, blob, grant_tokens=tokens) == b"secret"
        own = await encrypt(kms, BOB, key_id, grant_tokens=tokens)
        assert await decrypt(kms, BOB, own) == b"secret"  # the token only speeds things up
        # The grant gives what it lists, nothing more.
        await refused(keys.describe_key(kms, pb.DescribeKeyRequest(key_id=key_id), BOB))
        await refused(
            crypto_ops.generate_data_key(
                kms, pb.GenerateDataKeyRequest(key_id=key_id, number_of_bytes=16), BOB
            )
        )
        await grants.revoke_grant(
            kms, pb.RevokeGrantRequest(key_id=key_id, grant_id=granted.grant_id), ALICE
        )
        await refused(decrypt(kms, BOB, blob, grant_tokens=tokens))
        await refused(encrypt(kms, BOB, key_id))

    run(tmp_path, scenario)


def test_grant_tokens_are_checked(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        for bad in ("not-a-token", "x" * 57):
            await refused(encrypt(kms, ALICE, key_id, grant_tokens=[bad]), InvalidGrantTokenError)
        # A token from the future (never committed) is forged: refused at once, not waited for.
        future = encode_token("cd" * 32, kms.log.applied_index + 1000)
        error = await refused(
            encrypt(kms, ALICE, key_id, grant_tokens=[future]), InvalidGrantTokenError
        )
        assert error.violations[0].field == "grant_tokens"
        # A well-formed token for a grant that does not exist adds nothing.
        ghost = encode_token("cd" * 32, 1)
        await refused(encrypt(kms, BOB, key_id, grant_tokens=[ghost]))
        assert await encrypt(kms, ALICE, key_id, grant_tokens=[ghost])
        await refused(encrypt(kms, ALICE, key_id, grant_tokens=[ghost] * 11), ValidationError)

    run(tmp_path, scenario)


class LaggingLog:
    """A follower's log that has applied up to `applied` and catches up to `caught_up`
    when asked for a linearizable read (as RaftLog.read_barrier does)."""

    def __init__(self, applied: int, caught_up: int) -> None:
        self.applied_index = applied
        self.caught_up = caught_up
        self.barriers: list[float] = []

    async def read_barrier(self, allow_stale_s: float = 0.0) -> int:
        self.barriers.append(allow_stale_s)
        self.applied_index = self.caught_up
        return self.caught_up


def test_a_grant_token_makes_a_lagging_node_catch_up_first() -> None:
    async def scenario() -> None:
        token = encode_token("ab" * 32, 8)
        ahead = LaggingLog(applied=9, caught_up=9)
        await access.wait_for_grant_tokens(SimpleNamespace(log=ahead), [token])  # type: ignore[arg-type]
        assert ahead.barriers == []  # applied already: nothing to wait for
        behind = LaggingLog(applied=5, caught_up=9)
        await access.wait_for_grant_tokens(SimpleNamespace(log=behind), [token])  # type: ignore[arg-type]
        assert behind.barriers == [0.0] and behind.applied_index == 9  # one linearizable read
        forged = LaggingLog(applied=5, caught_up=7)  # the cluster never committed index 8
        with pytest.raises(InvalidGrantTokenError):
            await access.wait_for_grant_tokens(SimpleNamespace(log=forged), [token])  # type: ignore[arg-type]
        assert forged.barriers == [0.0]

    asyncio.run(scenario())


def test_a_constrained_grant_refuses_other_contexts(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        equals = await grant_to(
            kms,
            key_id,
            BOB,
            res.GRANT_OPERATION_ENCRYPT,
            res.GRANT_OPERATION_DECRYPT,
            res.GRANT_OPERATION_DESCRIBE_KEY,
            constraints=res.GrantConstraints(encryption_context_equals={"tenant": "a"}),
        )
        tokens = [equals.grant_token]
        blob = await encrypt(kms, BOB, key_id, {"tenant": "a"}, grant_tokens=tokens)
        assert await decrypt(kms, BOB, blob, {"tenant": "a"}) == b"secret"
        await encrypt(kms, BOB, key_id, {"TENANT": "a"})  # constraint keys: any case
        for other in ({"tenant": "b"}, {}, {"tenant": "a", "more": "1"}, {"tenant": "A"}):
            await refused(encrypt(kms, BOB, key_id, other))
        # DescribeKey takes no context: the constraint does not apply.
        await keys.describe_key(kms, pb.DescribeKeyRequest(key_id=key_id), BOB)
        subset = await grant_to(
            kms,
            key_id,
            CAROL,
            res.GRANT_OPERATION_GENERATE_DATA_KEY,
            constraints=res.GrantConstraints(encryption_context_subset={"tenant": "a"}),
        )
        request = pb.GenerateDataKeyRequest(
            key_id=key_id,
            number_of_bytes=32,
            encryption_context={"tenant": "a", "file": "x"},
            grant_tokens=[subset.grant_token],
        )
        assert (await crypto_ops.generate_data_key(kms, request, CAROL)).plaintext
        request.encryption_context["tenant"] = "b"
        await refused(crypto_ops.generate_data_key(kms, request, CAROL))

    run(tmp_path, scenario)


def test_re_encrypt_needs_from_on_the_source_and_to_on_the_destination(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        source, destination = await new_key(kms), await new_key(kms)
        blob = await encrypt(kms, ALICE, source)

        async def re_encrypt() -> pb.ReEncryptResponse:
            request = pb.ReEncryptRequest(ciphertext_blob=blob, destination_key_id=destination)
            return await crypto_ops.re_encrypt(kms, request, BOB)

        await grant_to(kms, source, BOB, res.GRANT_OPERATION_RE_ENCRYPT_FROM)
        await refused(re_encrypt())
        await grant_to(kms, destination, BOB, res.GRANT_OPERATION_RE_ENCRYPT_TO)
        moved = await re_encrypt()
        assert await decrypt(kms, ALICE, moved.ciphertext_blob) == b"secret"
        await refused(decrypt(kms, BOB, moved.ciphertext_blob))  # ReEncryptTo is not Decrypt

    run(tmp_path, scenario)


def test_create_grant_from_a_grant(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        subset = res.GrantConstraints(encryption_context_subset={"tenant": "a"})
        await grant_to(
            kms,
            key_id,
            BOB,
            res.GRANT_OPERATION_CREATE_GRANT,
            res.GRANT_OPERATION_ENCRYPT,
            res.GRANT_OPERATION_DECRYPT,
            constraints=subset,
        )
        stricter = res.GrantConstraints(encryption_context_equals={"tenant": "a", "x": "1"})
        child = await grant_to(
            kms, key_id, CAROL, res.GRANT_OPERATION_ENCRYPT, caller=BOB, constraints=stricter
        )
        listed = await grants.list_grants(
            kms, pb.ListGrantsRequest(key_id=key_id, grant_id=child.grant_id), ALICE
        )
        (entry,) = listed.grants
        assert entry.issuing_principal == BOB.principal
        assert entry.issuing_account == f"arn:aws:iam::{ACCOUNT}:root"
        # More operations, or looser constraints, than Bob's grant: refused.
        await refused(
            grant_to(kms, key_id, CAROL, res.GRANT_OPERATION_GENERATE_DATA_KEY, caller=BOB,
                     constraints=subset)
        )  # fmt: skip
        await refused(grant_to(kms, key_id, CAROL, res.GRANT_OPERATION_ENCRYPT, caller=BOB))

    run(tmp_path, scenario)


def test_retire_grant_rules(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)

        async def retire(caller: Caller, **request: Any) -> pb.RetireGrantResponse:
            return await grants.retire_grant(kms, pb.RetireGrantRequest(**request), caller)

        # The retiring principal may retire it, by token.
        g1 = await grant_to(
            kms, key_id, BOB, res.GRANT_OPERATION_ENCRYPT, retiring_principal=CAROL.principal
        )
        await refused(retire(BOB, grant_token=g1.grant_token))  # grantee without RetireGrant
        listed = await grants.list_retirable_grants(
            kms, pb.ListRetirableGrantsRequest(retiring_principal=CAROL.principal), CAROL
        )
        assert [g.grant_id for g in listed.grants] == [g1.grant_id]
        await refused(
            grants.list_retirable_grants(
                kms, pb.ListRetirableGrantsRequest(retiring_principal=CAROL.principal), BOB
            )
        )
        await refused(retire(CAROL, grant_token=g1.grant_token, dry_run=True), DryRunError)
        done = await retire(CAROL, grant_token=g1.grant_token)
        assert done.key_id.endswith(key_id)
        # Retired: the token now names nothing.
        await refused(retire(CAROL, grant_token=g1.grant_token))
        await refused(retire(ADMIN, grant_token=g1.grant_token), NotFoundError)
        # The grantee may retire a grant that includes RetireGrant, by key and grant id.
        g2 = await grant_to(
            kms, key_id, BOB, res.GRANT_OPERATION_ENCRYPT, res.GRANT_OPERATION_RETIRE_GRANT
        )
        await retire(BOB, key_id=key_id, grant_id=g2.grant_id)
        # Administrators may retire any grant.
        g3 = await grant_to(kms, key_id, BOB, res.GRANT_OPERATION_ENCRYPT)
        await refused(retire(ALICE, key_id=key_id, grant_id=g3.grant_id))  # kms:RetireGrant alone
        await retire(ADMIN, key_id=key_id, grant_id=g3.grant_id)
        # Naming the grant wrongly.
        await refused(retire(ADMIN), ValidationError)
        await refused(retire(ADMIN, grant_id=g3.grant_id), ValidationError)
        await refused(retire(ADMIN, key_id=key_id, grant_id="nope"), InvalidGrantIdError)
        await refused(retire(ADMIN, grant_token="garbage"), InvalidGrantTokenError)

    run(tmp_path, scenario)


def test_revoke_needs_kms_revoke_grant(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        g = await grant_to(
            kms, key_id, BOB, res.GRANT_OPERATION_ENCRYPT, res.GRANT_OPERATION_RETIRE_GRANT
        )
        revoke = pb.RevokeGrantRequest(key_id=key_id, grant_id=g.grant_id)
        await refused(grants.revoke_grant(kms, revoke, BOB))  # retiring is not revoking
        revoke.dry_run = True
        await refused(grants.revoke_grant(kms, revoke, ALICE), DryRunError)
        revoke.dry_run = False
        await grants.revoke_grant(kms, revoke, ALICE)
        await refused(grants.revoke_grant(kms, revoke, ALICE), NotFoundError)

    run(tmp_path, scenario)


def test_grant_requests_are_validated(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        cases: list[tuple[dict[str, Any], str]] = [
            ({"grantee_principal": ""}, "grantee_principal"),
            ({"grantee_principal": "x" * 257}, "grantee_principal"),
            ({"grantee_principal": "a\nb"}, "grantee_principal"),
            ({"retiring_principal": "x" * 257}, "retiring_principal"),
            ({"operations": []}, "operations"),
            ({"operations": [res.GRANT_OPERATION_SIGN]}, "operations"),
            ({"operations": [res.GRANT_OPERATION_ENCRYPT] * 2}, "operations"),
            ({"name": "bad name"}, "name"),
            ({"name": "n" * 257}, "name"),
            (
                {
                    "constraints": res.GrantConstraints(
                        encryption_context_equals={f"k{n}": "v" for n in range(9)}
                    )
                },
                "constraints.encryption_context_equals",
            ),
            (
                {"constraints": res.GrantConstraints(encryption_context_subset={"k": "v" * 385})},
                "constraints.encryption_context_subset",
            ),
            (
                {
                    "constraints": res.GrantConstraints(
                        encryption_context_subset={"a": "1", "A": "1"}
                    )
                },
                "constraints.encryption_context_subset",
            ),
        ]
        for override, field in cases:
            request = pb.CreateGrantRequest(
                key_id=key_id,
                grantee_principal=BOB.principal,
                operations=[res.GRANT_OPERATION_ENCRYPT],
            )
            for name, value in override.items():
                if name == "constraints":
                    request.constraints.CopyFrom(value)
                elif name == "operations":
                    del request.operations[:]
                    request.operations.extend(value)
                else:
                    setattr(request, name, value)
            error = await refused(grants.create_grant(kms, request, ALICE), ValidationError)
            assert error.violations[0].field == field, (override, error.message)
        listing = pb.ListGrantsRequest(key_id=key_id, grant_id="zz")
        await refused(grants.list_grants(kms, listing, ALICE), InvalidGrantIdError)

    run(tmp_path, scenario)


def test_named_grants_are_idempotent_and_listings_page(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        first = await grant_to(kms, key_id, BOB, res.GRANT_OPERATION_ENCRYPT, name="app")
        again = await grant_to(kms, key_id, BOB, res.GRANT_OPERATION_ENCRYPT, name="app")
        assert again.grant_id == first.grant_id and again.grant_token != first.grant_token
        for n in range(4):
            await grant_to(kms, key_id, Caller(f"spiffe://kmsd.dev/user/u{n}"), 2)
        seen: list[str] = []
        marker = ""
        while True:
            page = await grants.list_grants(
                kms, pb.ListGrantsRequest(key_id=key_id, limit=2, marker=marker), ALICE
            )
            seen += [g.grant_id for g in page.grants]
            if not page.truncated:
                break
            marker = page.next_marker
        assert len(seen) == len(set(seen)) == 5 and seen[0] == first.grant_id
        by_grantee = await grants.list_grants(
            kms, pb.ListGrantsRequest(key_id=key_id, grantee_principal=BOB.principal), ALICE
        )
        assert [g.grant_id for g in by_grantee.grants] == [first.grant_id]
        names = await policies.list_key_policies(
            kms, pb.ListKeyPoliciesRequest(key_id=key_id), ALICE
        )
        assert list(names.policy_names) == ["default"] and not names.truncated

    run(tmp_path, scenario)


# ---- key policies ---------------------------------------------------------------------


def test_an_explicit_deny_wins_over_allows_and_grants(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        await grant_to(kms, key_id, BOB, res.GRANT_OPERATION_ENCRYPT)
        await put_policy(
            kms,
            key_id,
            [
                statement("Allow", ALICE, "kms:*"),
                statement("Allow", BOB, "kms:Encrypt"),
                statement(
                    "Deny",
                    "*",
                    ["kms:Encrypt", "kms:GenerateDataKey*"],
                    Condition={"StringEquals": {"kms:EncryptionContext:env": "prod"}},
                ),
            ],
        )
        await encrypt(kms, ALICE, key_id, {"env": "dev"})
        await encrypt(kms, BOB, key_id, {"env": "dev"})
        for caller in (ALICE, BOB, ADMIN):
            await refused(encrypt(kms, caller, key_id, {"env": "prod"}))

    run(tmp_path, scenario)


def test_policy_conditions_on_context_keys(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        await put_policy(
            kms,
            key_id,
            [
                statement("Allow", ALICE, "kms:*"),
                statement(
                    "Allow",
                    BOB,
                    "kms:Encrypt",
                    Condition={
                        "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["tenant"]},
                        "StringLike": {"kms:EncryptionContext:tenant": "team-*"},
                    },
                ),
            ],
        )
        await encrypt(kms, BOB, key_id, {"tenant": "team-7"})
        await refused(encrypt(kms, BOB, key_id, {"tenant": "other"}))
        await refused(encrypt(kms, BOB, key_id, {"tenant": "team-7", "extra": "1"}))
        await refused(encrypt(kms, BOB, key_id))  # StringLike on an absent key

    run(tmp_path, scenario)


def test_put_key_policy_validation_and_the_lockout_check(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        error = await refused(
            policies.put_key_policy(
                kms,
                pb.PutKeyPolicyRequest(
                    key_id=key_id, policy='{"Statement": [{"Effect": "Maybe"}]}'
                ),
                ALICE,
            ),
            MalformedPolicyDocumentError,
        )
        assert "Statement[0].Effect: must be Allow or Deny" in error.message
        use_only = [statement("Allow", ALICE, ["kms:Encrypt", "kms:Decrypt"])]
        error = await refused(put_policy(kms, key_id, use_only), MalformedPolicyDocumentError)
        assert "policy lockout safety check" in error.message
        await refused(
            put_policy(kms, key_id, [statement("Allow", ALICE, "kms:*")], policy_name="other"),
            ValidationError,
        )
        # Bypassed: Alice can still use the key but no longer change its policy.
        await put_policy(kms, key_id, use_only, bypass_policy_lockout_safety_check=True)
        await encrypt(kms, ALICE, key_id)
        await refused(put_policy(kms, key_id, [statement("Allow", ALICE, "kms:*")]))
        # The administrators still can (no Allow needed), and give it back.
        await put_policy(kms, key_id, [statement("Allow", ALICE, "kms:*")], caller=ADMIN)
        await put_policy(kms, key_id, [statement("Allow", ALICE, "kms:*")])

    run(tmp_path, scenario)


def test_create_key_with_a_policy(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        shared = json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    statement("Allow", ALICE, "kms:*"),
                    statement("Allow", BOB, ["kms:Encrypt", "kms:Decrypt"]),
                ],
            }
        )
        key_id = await new_key(kms, policy=shared)
        blob = await encrypt(kms, BOB, key_id)
        assert await decrypt(kms, ALICE, blob) == b"secret"
        got = await policies.get_key_policy(kms, pb.GetKeyPolicyRequest(key_id=key_id), ALICE)
        assert got.policy == shared
        error = await refused(
            keys.create_key(kms, pb.CreateKeyRequest(policy="{}"), ALICE),
            MalformedPolicyDocumentError,
        )
        assert "Statement: required" in error.message
        locked = json.dumps({"Statement": [statement("Allow", BOB, "kms:*")]})
        await refused(
            keys.create_key(kms, pb.CreateKeyRequest(policy=locked), ALICE),
            MalformedPolicyDocumentError,
        )
        bypass = pb.CreateKeyRequest(policy=locked, bypass_policy_lockout_safety_check=True)
        bobs = (await keys.create_key(kms, bypass, ALICE)).key_metadata.key_id
        await encrypt(kms, BOB, bobs)
        await refused(encrypt(kms, ALICE, bobs))

    run(tmp_path, scenario)


def test_alias_operations_need_rights_on_the_keys(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        alices, bobs = await new_key(kms), await new_key(kms, BOB)
        create = pb.CreateAliasRequest(alias_name="alias/a", target_key_id=alices)
        await refused(aliases.create_alias(kms, create, BOB))
        await aliases.create_alias(kms, create, ALICE)
        # Repointing needs UpdateAlias on both keys.
        update = pb.UpdateAliasRequest(alias_name="alias/a", target_key_id=bobs)
        await refused(aliases.update_alias(kms, update, BOB))
        await refused(aliases.update_alias(kms, update, ALICE))
        await aliases.update_alias(kms, update, ADMIN)
        delete = pb.DeleteAliasRequest(alias_name="alias/a")
        await refused(aliases.delete_alias(kms, delete, ALICE))
        await aliases.delete_alias(kms, delete, BOB)
        await refused(aliases.delete_alias(kms, delete, BOB))  # gone: AccessDenied to Bob
        await refused(aliases.delete_alias(kms, delete, ADMIN), NotFoundError)

    run(tmp_path, scenario)


def test_tags_and_the_request_id_of_another_principal(tmp_path: Path) -> None:
    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        tag = pb.TagResourceRequest(
            key_id=key_id, tags=[res.Tag(tag_key="team", tag_value="a")], request_id="r-1"
        )
        await refused(tags.tag_resource(kms, tag, BOB))
        await tags.tag_resource(kms, tag, ALICE)
        # Another principal reusing Alice's request_id gets no replay of her result.
        await grant_to(kms, key_id, BOB, res.GRANT_OPERATION_ENCRYPT)
        await put_policy(
            kms,
            key_id,
            [statement("Allow", ALICE, "kms:*"), statement("Allow", BOB, "kms:TagResource")],
        )
        error = await refused(tags.tag_resource(kms, tag, BOB), ValidationError)
        assert error.violations[0].field == "request_id"

    run(tmp_path, scenario)


# ---- every RPC ------------------------------------------------------------------------

SERVICE = pb.DESCRIPTOR.services_by_name["KeyManagementService"]
MODULES = (keys, crypto_ops, aliases, rotation, tags, policies, grants)


def _operation(rpc: str) -> Callable[..., Awaitable[Any]]:
    name = "".join(f"_{c.lower()}" if c.isupper() else c for c in rpc).lstrip("_")
    for module in MODULES:
        if hasattr(module, name):
            found: Callable[..., Awaitable[Any]] = getattr(module, name)
            return found
    raise AssertionError(f"no service function for {rpc}")


def _request(rpc: str, values: dict[str, Any]) -> Any:
    request = getattr(pb, f"{rpc}Request")()
    for field in request.DESCRIPTOR.fields:
        if field.name not in values:
            continue
        value = values[field.name]
        target = getattr(request, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target.update(value)
        elif field.is_repeated and field.message_type is not None:
            for item in value:
                target.add().CopyFrom(item)
        elif field.is_repeated:
            target.extend(value)
        else:
            setattr(request, field.name, value)
    return request


def test_every_rpc_refuses_a_stranger_whether_or_not_the_key_exists(tmp_path: Path) -> None:
    """Carol (no role, no grant) is refused by all 34 RPCs with AccessDenied, on Alice's
    key and on a missing one alike; nothing she sends changes anything."""

    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        await aliases.create_alias(
            kms, pb.CreateAliasRequest(alias_name="alias/alice", target_key_id=key_id), ALICE
        )
        blob = await encrypt(kms, ALICE, key_id)
        granted = await grant_to(kms, key_id, BOB, res.GRANT_OPERATION_ENCRYPT)
        policy = json.dumps({"Statement": statement("Allow", CAROL, "kms:*")})
        good: dict[str, Any] = {
            "plaintext": b"x",
            "ciphertext_blob": blob,
            "number_of_bytes": 16,
            "alias_name": "alias/alice",
            "tags": [res.Tag(tag_key="t", tag_value="v")],
            "tag_keys": ["t"],
            "policy": policy,
            "grantee_principal": CAROL.principal,
            "operations": [res.GRANT_OPERATION_ENCRYPT],
            "retiring_principal": ALICE.principal,
            "grant_token": granted.grant_token,
            "grant_id": granted.grant_id,
        }
        rpcs = [method.name for method in SERVICE.methods]
        assert len(rpcs) == 34
        before = kms.store.snapshot()
        for target in (key_id, MISSING):
            values = dict(good, key_id=target, target_key_id=target, destination_key_id=target)
            for rpc in rpcs:
                if rpc == "RetireGrant" and target == MISSING:
                    values = dict(values, grant_token="", key_id=target)
                request = _request(rpc, values)
                with pytest.raises(AccessDeniedError) as info:
                    await _operation(rpc)(kms, request, CAROL)
                assert CAROL.principal in info.value.message, rpc
        assert kms.store.snapshot() == before  # nothing changed

    run(tmp_path, scenario)


def test_retries_of_applied_mutations_get_the_first_answer(tmp_path: Path) -> None:
    """A retry (same request_id, same caller, same parameters) of a mutation that was
    applied already answers like the first attempt, even where the checks it passed
    would now fail (the alias or grant is gone, the caller gave away its permission)."""

    async def scenario(kms: Kms) -> None:
        key_id = await new_key(kms)
        await aliases.create_alias(
            kms, pb.CreateAliasRequest(alias_name="alias/once", target_key_id=key_id), ALICE
        )
        delete = pb.DeleteAliasRequest(alias_name="alias/once", request_id="del-1")
        first = await aliases.delete_alias(kms, delete, ALICE)
        assert (await aliases.delete_alias(kms, delete, ALICE)) == first
        # Another caller reusing the request id gets no replay.
        await refused(aliases.delete_alias(kms, delete, BOB))
        granted = await grant_to(
            kms, key_id, BOB, res.GRANT_OPERATION_ENCRYPT, res.GRANT_OPERATION_RETIRE_GRANT
        )
        retire = pb.RetireGrantRequest(grant_token=granted.grant_token, request_id="ret-1")
        first_retire = await grants.retire_grant(kms, retire, BOB)
        assert (await grants.retire_grant(kms, retire, BOB)) == first_retire
        granted = await grant_to(kms, key_id, BOB, res.GRANT_OPERATION_ENCRYPT)
        revoke = pb.RevokeGrantRequest(key_id=key_id, grant_id=granted.grant_id, request_id="r")
        first_revoke = await grants.revoke_grant(kms, revoke, ALICE)
        assert (await grants.revoke_grant(kms, revoke, ALICE)) == first_revoke
        # Alice gives away kms:PutKeyPolicy; her retry is still answered.
        document = json.dumps({"Statement": [statement("Allow", ALICE, "kms:Encrypt")]})
        put = pb.PutKeyPolicyRequest(
            key_id=key_id,
            policy=document,
            bypass_policy_lockout_safety_check=True,
            request_id="put-1",
        )
        first_put = await policies.put_key_policy(kms, put, ALICE)
        assert (await policies.put_key_policy(kms, put, ALICE)) == first_put
        put.request_id = "put-2"
        await refused(policies.put_key_policy(kms, put, ALICE))

    run(tmp_path, scenario)
