"""Key policy documents: what parses, what is refused (naming the problem), and evaluation."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd.auth.conditions import ContextValue
from kmsd.auth.policy import (
    MAX_POLICY_BYTES,
    AccessRequest,
    Decision,
    default_policy,
    evaluate,
    parse_policy,
)
from kmsd.errors import MalformedPolicyDocumentError

ACCOUNT = "111122223333"
ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
ALICE = "spiffe://kmsd.dev/user/alice"
BOB = "spiffe://kmsd.dev/user/bob"


def doc(*statements: dict[str, Any], **top: Any) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements), **top})


ME = {"AWS": ALICE}


def allow(principal: Any = ME, action: Any = "kms:*", **more: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Principal": principal, "Action": action, "Resource": "*", **more}


def deny(principal: Any = ME, action: Any = "kms:*", **more: Any) -> dict[str, Any]:
    return {"Effect": "Deny", "Principal": principal, "Action": action, "Resource": "*", **more}


def decide(
    text: str,
    action: str = "kms:Encrypt",
    principal: str = ALICE,
    *,
    admin: bool = False,
    authenticated: bool = True,
    resource: str = ARN,
    context: dict[str, ContextValue] | None = None,
) -> Decision:
    values = context or {}
    request = AccessRequest(
        principal=principal,
        authenticated=authenticated,
        is_admin=admin,
        action=action,
        resource=resource,
        lookup=values.get,
    )
    return evaluate(parse_policy(text, ACCOUNT), request)


def malformed(text: str) -> str:
    with pytest.raises(MalformedPolicyDocumentError) as info:
        parse_policy(text, ACCOUNT)
    assert info.value.violations[0].field == "policy"
    return info.value.violations[0].description


# ---- parsing --------------------------------------------------------------------------


def test_the_default_policy_parses_and_names_root_and_creator() -> None:
    text = default_policy(ACCOUNT, ALICE)
    policy = parse_policy(text, ACCOUNT)
    assert [s.sid for s in policy.statements] == [
        "Enable IAM User Permissions",
        "Allow the key creator full access",
    ]
    assert policy.statements[0].root_principal and ALICE in policy.statements[1].principals
    assert decide(text, "kms:PutKeyPolicy") is Decision.ALLOW
    assert decide(text, principal=BOB) is Decision.NONE
    assert decide(text, principal=BOB, admin=True) is Decision.ALLOW
    assert len(parse_policy(default_policy(ACCOUNT, None), ACCOUNT).statements) == 1


def test_single_statement_object_and_lists_everywhere() -> None:
    text = json.dumps(
        {
            "Version": "2012-10-17",
            "Id": "x",
            "Statement": {
                "Sid": "one",
                "Effect": "Allow",
                "Principal": {"AWS": [ALICE, BOB]},
                "Action": ["kms:Encrypt", "kms:Decrypt"],
                "Resource": [ARN],
            },
        }
    )
    assert decide(text, principal=BOB) is Decision.ALLOW
    assert decide(text, "kms:Decrypt") is Decision.ALLOW
    assert decide(text, "kms:ReEncryptFrom") is Decision.NONE
    assert decide(text, resource=ARN.replace("1234abcd", "ffffffff")) is Decision.NONE


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "the policy is empty"),
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('"x"', "must be a JSON object"),
        (doc(allow(), Foo=1), "Foo: unknown policy element"),
        (json.dumps({"Version": "2012-10-17"}), "Statement: required"),
        (doc(), "Statement: needs at least one statement"),
        (doc(allow(), Version="2020-01-01"), "Version: must be 2012-10-17"),
        (doc(allow(), Id=5), "Id: must be a string"),
        (doc({**allow(), "Effect": "allow"}), "Statement[0].Effect: must be Allow or Deny"),
        (doc(allow(), {**allow(), "Effect": None}), "Statement[1].Effect: must be Allow or Deny"),
        (doc({k: v for k, v in allow().items() if k != "Principal"}), "needs a Principal"),
        (doc(allow(principal="alice")), 'Statement[0].Principal: must be "*" or an object'),
        (doc(allow(principal={})), "Statement[0].Principal: must be"),
        (doc(allow(principal={"IAM": "x"})), "Statement[0].Principal.IAM: unknown principal"),
        (doc(allow(principal={"AWS": []})), "Statement[0].Principal.AWS: must not be an empty"),
        (doc(allow(principal={"AWS": [""]})), "Statement[0].Principal.AWS: must be a non-empty"),
        (doc(allow(principal={"AWS": 7})), "Statement[0].Principal.AWS: must be a non-empty"),
        (doc(allow(action="s3:GetObject")), "Statement[0].Action: 's3:GetObject' is not"),
        (doc(allow(action="kms:Encrypt!")), "Statement[0].Action: 'kms:Encrypt!' is not"),
        (doc(allow(action=[])), "Statement[0].Action: must not be an empty list"),
        (doc({**allow(), "NotAction": "kms:Decrypt"}), "exactly one of Action and NotAction"),
        (doc({k: v for k, v in allow().items() if k != "Action"}), "exactly one of Action"),
        (doc({k: v for k, v in allow().items() if k != "Resource"}), "exactly one of Resource"),
        (doc({**allow(), "Resource": "key/x"}), "Statement[0].Resource: 'key/x' is not"),
        (doc({**allow(), "NotPrincipal": "*"}), "Statement[0].NotPrincipal: unknown statement"),
        (doc({**allow(), "Sid": 3}), "Statement[0].Sid: must be a string"),
        (doc({**allow(), "Sid": "a"}, {**allow(), "Sid": "a"}), "the Sid 'a' is used twice"),
        (doc(allow(), "not an object"), "Statement[1]: must be an object"),
        ('{"Version": "2012-10-17", "Version": "2012-10-17"}', "has the key 'Version' twice"),
        ("[" * 5000 + "]" * 5000, "not valid JSON: nested too deeply"),
    ],
)
def test_malformed_documents_name_the_problem(text: str, problem: str) -> None:
    assert problem in malformed(text)


def test_size_and_character_limits_as_aws() -> None:
    padding = " " * (MAX_POLICY_BYTES - len(doc(allow())))
    assert parse_policy(doc(allow()) + padding, ACCOUNT)  # exactly 32 KiB is fine
    assert "at most 32768" in malformed(doc(allow()) + padding + " ")
    assert "U+0100" in malformed(doc(allow()).replace(ALICE, "\u0100"))
    assert "U+0000" in malformed(doc(allow()) + "\x00")
    # Latin-1 characters are allowed, as in AWS.
    assert parse_policy(doc(allow(principal={"AWS": "spiffe://x/j\u00e9r\u00f4me"})), ACCOUNT)


# ---- evaluation -----------------------------------------------------------------------


def test_default_deny_and_explicit_deny_wins() -> None:
    text = doc(allow(), deny(action="kms:Decrypt"))
    assert decide(text, "kms:Encrypt") is Decision.ALLOW
    assert decide(text, "kms:Decrypt") is Decision.DENY
    assert decide(text, "kms:Encrypt", principal=BOB) is Decision.NONE
    # A Deny for everyone binds administrators too.
    assert decide(doc(deny(principal="*")), admin=True) is Decision.DENY


@pytest.mark.parametrize(
    ("pattern", "action", "matches"),
    [
        ("kms:*", "kms:Encrypt", True),
        ("*", "kms:ScheduleKeyDeletion", True),
        ("kms:Encrypt", "kms:encrypt", True),  # actions are case-insensitive
        ("KMS:ENCRYPT", "kms:Encrypt", True),
        ("kms:Generate*", "kms:GenerateDataKeyWithoutPlaintext", True),
        ("kms:Generate*", "kms:Encrypt", False),
        ("kms:ReEncrypt*", "kms:ReEncryptFrom", True),
        ("kms:?ncrypt", "kms:Encrypt", True),
        ("kms:?ncrypt", "kms:Decrypt", False),
        ("kms:Describe?ey", "kms:DescribeKey", True),
        ("kms:Encrypt", "kms:EncryptX", False),
    ],
)
def test_action_wildcards(pattern: str, action: str, matches: bool) -> None:
    expected = Decision.ALLOW if matches else Decision.NONE
    assert decide(doc(allow(action=pattern)), action) is expected


def test_not_action_and_not_resource() -> None:
    text = doc(
        {
            "Effect": "Allow",
            "Principal": {"AWS": ALICE},
            "NotAction": ["kms:Decrypt", "kms:Re*"],
            "Resource": "*",
        }
    )
    assert decide(text, "kms:Encrypt") is Decision.ALLOW
    assert decide(text, "kms:Decrypt") is Decision.NONE
    assert decide(text, "kms:ReEncryptTo") is Decision.NONE
    other = "arn:aws:kms:us-east-1:111122223333:key/other"
    text = doc(
        {"Effect": "Deny", "Principal": "*", "Action": "kms:*", "NotResource": other},
        allow(),
    )
    assert decide(text) is Decision.DENY
    assert decide(text, resource=other) is Decision.ALLOW


def test_resource_patterns() -> None:
    wildcard = doc({**allow(), "Resource": "arn:aws:kms:*:111122223333:key/*"})
    assert decide(wildcard) is Decision.ALLOW
    assert decide(wildcard, resource="arn:aws:kms:us-east-1:999999999999:key/x") is Decision.NONE


def test_principals() -> None:
    everyone = doc(allow(principal="*"))
    assert decide(everyone, principal=BOB) is Decision.ALLOW
    assert decide(doc(allow(principal={"AWS": "*"})), principal=BOB) is Decision.ALLOW
    # "*" means every authenticated caller, never the anonymous one of plaintext mode.
    assert decide(everyone, principal="anonymous", authenticated=False) is Decision.NONE
    named = doc(allow(principal={"AWS": "anonymous"}))
    assert decide(named, principal="anonymous", authenticated=False) is Decision.ALLOW
    # The account's root (ARN or bare account id) is the administrators.
    for root in (f"arn:aws:iam::{ACCOUNT}:root", ACCOUNT):
        text = doc(allow(principal={"AWS": root}))
        assert decide(text, principal=BOB) is Decision.NONE
        assert decide(text, principal=BOB, admin=True) is Decision.ALLOW
    other_root = doc(allow(principal={"AWS": "arn:aws:iam::999999999999:root"}))
    assert decide(other_root, admin=True) is Decision.NONE
    # Service principals are accepted (AWS policies have them) and never match.
    service = doc(allow(principal={"Service": "logs.amazonaws.com", "AWS": BOB}))
    assert decide(service, principal="logs.amazonaws.com") is Decision.NONE
    assert decide(service, principal=BOB) is Decision.ALLOW
    # Principals match exactly (case-sensitive, no wildcards).
    assert decide(doc(allow(principal={"AWS": ALICE.upper()}))) is Decision.NONE
    assert decide(doc(allow(principal={"AWS": "spiffe://kmsd.dev/user/*"}))) is Decision.NONE


def test_encryption_context_conditions_in_statements() -> None:
    text = doc(
        allow(),
        deny(
            action="kms:Encrypt",
            Condition={"StringEquals": {"kms:EncryptionContext:env": "prod"}},
        ),
    )
    assert decide(text, context={"kms:encryptioncontext:env": "prod"}) is Decision.DENY
    assert decide(text, context={"kms:encryptioncontext:env": "dev"}) is Decision.ALLOW
    assert decide(text) is Decision.ALLOW


def test_conditions_of_one_statement_all_hold() -> None:
    text = doc(
        allow(
            Condition={
                "StringEquals": {"kms:CallerAccount": ACCOUNT, "kms:EncryptionContext:a": "1"},
                "Bool": {"kms:GrantIsForAWSResource": "false"},
            }
        )
    )
    full: dict[str, ContextValue] = {
        "kms:calleraccount": ACCOUNT,
        "kms:encryptioncontext:a": "1",
        "kms:grantisforawsresource": False,
    }
    assert decide(text, context=full) is Decision.ALLOW
    for missing in full:
        partial = {k: v for k, v in full.items() if k != missing}
        assert decide(text, context=partial) is Decision.NONE, missing


# ---- fuzz -----------------------------------------------------------------------------

_ATOMS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.sampled_from(
        ["Allow", "Deny", "*", "kms:*", "kms:Encrypt", "2012-10-17", ALICE, ARN, "true", ""]
    ),
    st.text(max_size=8),
)
_KEYS = st.sampled_from(
    [
        "Version",
        "Statement",
        "Sid",
        "Effect",
        "Principal",
        "AWS",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Condition",
        "StringEquals",
        "ForAnyValue:StringLike",
        "Null",
        "kms:EncryptionContext:k",
        "kms:EncryptionContextKeys",
    ]
) | st.text(max_size=6)
_JSON = st.recursive(
    _ATOMS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(document=_JSON, context=st.dictionaries(st.sampled_from(["kms:encryptioncontext:k",
       "kms:encryptioncontextkeys", "kms:calleraccount"]), st.text(max_size=3) |
       st.lists(st.text(max_size=3), max_size=3)))  # fmt: skip
def test_any_json_parses_or_is_malformed_never_crashes(document: Any, context: Any) -> None:
    try:
        text = json.dumps(document)
    except ValueError:
        return
    try:
        policy = parse_policy(text, ACCOUNT)
    except MalformedPolicyDocumentError as error:
        assert error.violations[0].field == "policy" and error.violations[0].description
        return
    request = AccessRequest(ALICE, True, False, "kms:Encrypt", ARN, context.get)
    assert evaluate(policy, request) in Decision
