"""Grant rules: operations, encryption-context constraints, delegation, tokens, and the
authorizer's evaluation order (roles, explicit deny, grants, lockout check)."""

from __future__ import annotations

import json

import pytest
from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import resources_pb2 as res

from kmsd.auth import identity
from kmsd.auth.authorizer import ANONYMOUS, Authorizer, Caller
from kmsd.auth.grants import (
    OPERATION_NAMES,
    SYMMETRIC_OPERATIONS,
    at_least_as_strict,
    constraints_satisfied,
    decode_token,
    encode_token,
    grant_allows,
    may_delegate,
    operation_of,
)
from kmsd.auth.policy import default_policy, parse_policy
from kmsd.config import AuthConfig
from kmsd.errors import InvalidGrantTokenError

ACCOUNT = "111122223333"
ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/k"
ALICE = Caller("spiffe://kmsd.dev/user/alice")
BOB = Caller("spiffe://kmsd.dev/user/bob")
ADMIN = Caller("spiffe://kmsd.dev/admin")
GRANT_ID = "ab" * 32


def grant(
    *operations: int,
    equals: dict[str, str] | None = None,
    subset: dict[str, str] | None = None,
    grantee: str = BOB.principal,
) -> fsm.GrantRecord:
    record = fsm.GrantRecord(
        grant_id=GRANT_ID, key_id="k", grantee_principal=grantee, operations=operations
    )
    if equals or subset:
        record.constraints.CopyFrom(
            res.GrantConstraints(
                encryption_context_equals=equals or {}, encryption_context_subset=subset or {}
            )
        )
    return record


def constraints(
    equals: dict[str, str] | None = None, subset: dict[str, str] | None = None
) -> res.GrantConstraints:
    return res.GrantConstraints(
        encryption_context_equals=equals or {}, encryption_context_subset=subset or {}
    )


def test_operation_names_mirror_aws() -> None:
    assert OPERATION_NAMES[res.GRANT_OPERATION_RE_ENCRYPT_FROM] == "ReEncryptFrom"
    assert OPERATION_NAMES[res.GRANT_OPERATION_GENERATE_DATA_KEY_WITHOUT_PLAINTEXT] == (
        "GenerateDataKeyWithoutPlaintext"
    )
    assert len(OPERATION_NAMES) == 17
    assert operation_of("kms:Decrypt") == res.GRANT_OPERATION_DECRYPT
    assert operation_of("kms:PutKeyPolicy") == 0
    assert res.GRANT_OPERATION_SIGN not in SYMMETRIC_OPERATIONS
    assert len(SYMMETRIC_OPERATIONS) == 11


def test_grant_allows_only_its_operations() -> None:
    g = grant(res.GRANT_OPERATION_ENCRYPT, res.GRANT_OPERATION_DESCRIBE_KEY)
    assert grant_allows(g, "kms:Encrypt", {})
    assert grant_allows(g, "kms:DescribeKey", None)
    assert not grant_allows(g, "kms:Decrypt", {})
    assert not grant_allows(g, "kms:PutKeyPolicy", None)


def test_equals_constraint() -> None:
    rule = constraints(equals={"Tenant": "a", "app": "x"})
    assert constraints_satisfied(rule, {"tenant": "a", "app": "x"})  # keys: any case
    assert constraints_satisfied(rule, {"TENANT": "a", "APP": "x"})
    assert not constraints_satisfied(rule, {"tenant": "A", "app": "x"})  # values: exact
    assert not constraints_satisfied(rule, {"tenant": "a"})
    assert not constraints_satisfied(rule, {"tenant": "a", "app": "x", "more": "1"})
    assert not constraints_satisfied(rule, {})
    # A context with keys differing only by case is ambiguous: refused.
    assert not constraints_satisfied(rule, {"tenant": "a", "Tenant": "a", "app": "x"})


def test_subset_constraint() -> None:
    rule = constraints(subset={"Tenant": "a"})
    assert constraints_satisfied(rule, {"tenant": "a"})
    assert constraints_satisfied(rule, {"tenant": "a", "more": "1"})
    assert not constraints_satisfied(rule, {"tenant": "b"})
    assert not constraints_satisfied(rule, {})


def test_constraints_apply_only_to_operations_that_take_a_context() -> None:
    g = grant(
        res.GRANT_OPERATION_DECRYPT,
        res.GRANT_OPERATION_DESCRIBE_KEY,
        res.GRANT_OPERATION_RETIRE_GRANT,
        res.GRANT_OPERATION_CREATE_GRANT,
        equals={"tenant": "a"},
    )
    assert grant_allows(g, "kms:Decrypt", {"tenant": "a"})
    assert not grant_allows(g, "kms:Decrypt", {"tenant": "b"})
    assert not grant_allows(g, "kms:Decrypt", None)
    for exempt in ("kms:DescribeKey", "kms:RetireGrant", "kms:CreateGrant"):
        assert grant_allows(g, exempt, None), exempt


@pytest.mark.parametrize(
    ("child", "parent", "strict"),
    [
        (constraints(), constraints(), True),
        (constraints(equals={"a": "1"}), constraints(), True),
        (constraints(), constraints(subset={"a": "1"}), False),
        (constraints(subset={"a": "1"}), constraints(subset={"a": "1"}), True),
        (constraints(subset={"A": "1", "b": "2"}), constraints(subset={"a": "1"}), True),
        (constraints(subset={"a": "2"}), constraints(subset={"a": "1"}), False),
        (constraints(equals={"a": "1", "b": "2"}), constraints(subset={"a": "1"}), True),
        (constraints(equals={"b": "2"}), constraints(subset={"a": "1"}), False),
        (constraints(equals={"a": "1"}), constraints(equals={"A": "1"}), True),
        (constraints(equals={"a": "1", "b": "2"}), constraints(equals={"a": "1"}), False),
        (constraints(subset={"a": "1"}), constraints(equals={"a": "1"}), False),
        # A child that allows no context at all is as strict as anything.
        (constraints(equals={"a": "1"}, subset={"a": "2"}), constraints(equals={"b": "1"}), True),
    ],
)
def test_constraints_at_least_as_strict(
    child: res.GrantConstraints, parent: res.GrantConstraints, strict: bool
) -> None:
    assert at_least_as_strict(child, parent) is strict


def test_delegation_needs_create_grant_and_no_more_operations() -> None:
    parent = grant(
        res.GRANT_OPERATION_CREATE_GRANT, res.GRANT_OPERATION_ENCRYPT, subset={"tenant": "a"}
    )
    assert may_delegate(parent, [res.GRANT_OPERATION_ENCRYPT], constraints(subset={"tenant": "a"}))
    assert not may_delegate(parent, [res.GRANT_OPERATION_DECRYPT], constraints(subset={"x": "a"}))
    assert not may_delegate(parent, [res.GRANT_OPERATION_ENCRYPT], constraints())
    no_create = grant(res.GRANT_OPERATION_ENCRYPT)
    assert not may_delegate(no_create, [res.GRANT_OPERATION_ENCRYPT], constraints())


def test_tokens_round_trip_and_refuse_anything_else() -> None:
    token = encode_token(GRANT_ID, 2**40 + 3)
    assert decode_token(token).grant_id == GRANT_ID
    assert decode_token(token).index == 2**40 + 3
    assert encode_token(GRANT_ID, 7) != encode_token(GRANT_ID, 8)
    for bad in ("", "t", "!!!!", token[:-1], token + "A", "é" * 58, token.upper()):
        with pytest.raises(InvalidGrantTokenError):
            decode_token(bad)


# ---- the authorizer -------------------------------------------------------------------


def authorizer(**config: object) -> Authorizer:
    return Authorizer(AuthConfig(**config), ACCOUNT)  # type: ignore[arg-type]


def test_anonymous_is_the_identity_modules() -> None:
    assert ANONYMOUS == identity.ANONYMOUS
    assert not Caller(identity.ANONYMOUS).authenticated


def test_roles() -> None:
    auth = authorizer(
        administrators=(ADMIN.principal,),
        operators=("spiffe://kmsd.dev/ops",),
        key_creators=("spiffe://kmsd.dev/user/*",),
    )
    assert auth.is_admin(ADMIN) and not auth.is_admin(ALICE)
    assert auth.is_operator(Caller("spiffe://kmsd.dev/ops")) and not auth.is_operator(ADMIN)
    assert auth.may_use_account(ALICE) and auth.may_use_account(ADMIN)
    assert not auth.may_use_account(Caller("spiffe://other/carol"))
    # "*" means anyone authenticated, not the anonymous caller of plaintext mode.
    assert authorizer().may_use_account(ALICE)
    assert not authorizer().may_use_account(Caller(ANONYMOUS))
    assert authorizer(key_creators=(ANONYMOUS,)).may_use_account(Caller(ANONYMOUS))
    off = authorizer(enabled=False)
    assert off.may_use_account(Caller(ANONYMOUS)) and off.is_operator(Caller(ANONYMOUS))


def test_evaluation_order() -> None:
    auth = authorizer(administrators=(ADMIN.principal,))
    policy = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": ALICE.principal}, "Action": "kms:*",
                 "Resource": "*"},
                {"Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*"},
            ],
        }
    )  # fmt: skip
    none: dict[str, str] = {}

    def verdict(caller: Caller, action: str, grants: list[fsm.GrantRecord]) -> bool:
        return auth.decide(caller, action, ARN, policy, grants, none.get, {}).allowed

    assert verdict(ALICE, "kms:Encrypt", [])
    assert not verdict(ALICE, "kms:Decrypt", [])  # explicit deny
    assert not verdict(ADMIN, "kms:Decrypt", [])  # binds administrators too
    assert verdict(ADMIN, "kms:Encrypt", [])  # administrators need no Allow
    assert not verdict(BOB, "kms:Encrypt", [])  # default deny
    assert verdict(BOB, "kms:Encrypt", [grant(res.GRANT_OPERATION_ENCRYPT)])
    assert not verdict(BOB, "kms:Decrypt", [grant(res.GRANT_OPERATION_DECRYPT)])  # deny wins
    denied = auth.decide(BOB, "kms:Encrypt", ARN, policy, [], none.get)
    assert denied.why == "no key policy statement or grant allows it"
    assert authorizer(enabled=False).decide(BOB, "kms:Decrypt", ARN, policy, [], none.get).allowed
    # Keys from before key policies (empty policy): administrators only.
    assert not auth.decide(ALICE, "kms:Encrypt", ARN, "", [], none.get).allowed
    assert auth.decide(ADMIN, "kms:Encrypt", ARN, "", [], none.get).allowed


def test_policy_lockout_safety_check() -> None:
    auth = authorizer(administrators=(ADMIN.principal,))
    none: dict[str, str] = {}
    mine = parse_policy(default_policy(ACCOUNT, ALICE.principal), ACCOUNT)
    assert auth.allows_policy_change(ALICE, ARN, mine, none.get)
    only_use = parse_policy(
        json.dumps(
            {
                "Statement": {
                    "Effect": "Allow",
                    "Principal": {"AWS": ALICE.principal},
                    "Action": ["kms:Encrypt", "kms:Decrypt"],
                    "Resource": "*",
                }
            }
        ),
        ACCOUNT,
    )
    assert not auth.allows_policy_change(ALICE, ARN, only_use, none.get)
    assert auth.allows_policy_change(ADMIN, ARN, only_use, none.get)  # no Allow needed
    deny_all = parse_policy(
        json.dumps(
            {"Statement": {"Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "*"}}
        ),
        ACCOUNT,
    )
    assert not auth.allows_policy_change(ADMIN, ARN, deny_all, none.get)
    assert authorizer(enabled=False).allows_policy_change(ALICE, ARN, deny_all, none.get)


def test_an_unparsable_stored_policy_falls_back_to_administrators_only() -> None:
    auth = authorizer(administrators=(ADMIN.principal,))
    none: dict[str, str] = {}
    assert not auth.decide(ALICE, "kms:Encrypt", ARN, "{not json", [], none.get).allowed
    assert auth.decide(ADMIN, "kms:Encrypt", ARN, "{not json", [], none.get).allowed
