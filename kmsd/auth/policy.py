"""Key policies: parsing, validating and evaluating AWS-style JSON policy documents.

A key policy is the JSON document AWS KMS uses (docs/security.md):

    {"Version": "2012-10-17",
     "Statement": [{"Sid": "...", "Effect": "Allow" | "Deny",
                    "Principal": "*" | {"AWS": "<principal>" | [...]},
                    "Action" | "NotAction": "kms:Encrypt" | "kms:*" | [...],
                    "Resource" | "NotResource": "*" | "<key ARN pattern>" | [...],
                    "Condition": {"StringEquals": {"kms:EncryptionContext:k": "v"}}}]}

Principals are the strings mutual TLS gives callers (a client certificate's URI SAN,
else its CN) and match exactly; `"*"` matches every authenticated caller (never the
anonymous one of plaintext mode); `arn:aws:iam::<account>:root` (or the bare account
id) names the configured administrators, as AWS delegates to the account. Actions
and resources take `*` and `?` wildcards; actions match case-insensitively.

`parse_policy` refuses anything else with MalformedPolicyDocumentError naming the
statement and element (`Statement[1].Effect: must be Allow or Deny`); `evaluate`
answers DENY when a matching statement denies (explicit deny wins), ALLOW when one
allows, NONE otherwise (the caller's grants and administrator status decide then).
Pure: no gRPC, no I/O.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kmsd.auth.conditions import Condition, Lookup, parse_condition_block, wildcard
from kmsd.errors import MalformedPolicyDocumentError

MAX_POLICY_BYTES = 32 * 1024
VERSIONS = ("2012-10-17", "2008-10-17")
POLICY_NAME = "default"
_ALLOWED_CHARS = re.compile(r"[\t\n\r\x20-\xff]*")
_ACTION = re.compile(r"kms:[A-Za-z*?]+", re.IGNORECASE)
_PRINCIPAL_KINDS = ("AWS", "Service", "Federated", "CanonicalUser")
_STATEMENT_ELEMENTS = frozenset(
    {"Sid", "Effect", "Principal", "Action", "NotAction", "Resource", "NotResource", "Condition"}
)
_DOCUMENT_ELEMENTS = frozenset({"Version", "Id", "Statement"})


class Decision(enum.Enum):
    """What a policy says about one request."""

    DENY = "deny"
    ALLOW = "allow"
    NONE = "none"


@dataclass(frozen=True)
class AccessRequest:
    """One request as a policy sees it."""

    principal: str
    authenticated: bool  # False for the anonymous caller of plaintext mode
    is_admin: bool  # one of [auth].administrators: the account's root
    action: str  # "kms:Encrypt"
    resource: str  # the key ARN
    lookup: Lookup  # condition keys (lowercased) -> the request's values


@dataclass(frozen=True)
class Statement:
    """One parsed statement."""

    sid: str
    allow: bool
    any_principal: bool  # "*" or {"AWS": "*"}
    root_principal: bool  # the account's root: the administrators
    principals: frozenset[str]
    actions: tuple[re.Pattern[str], ...]
    not_action: bool
    resources: tuple[re.Pattern[str], ...]
    not_resource: bool
    conditions: tuple[Condition, ...]

    def applies(self, request: AccessRequest) -> bool:
        """Whether this statement covers `request` (principal, action, resource, conditions)."""
        if not (
            (self.any_principal and request.authenticated)
            or (self.root_principal and request.is_admin)
            or request.principal in self.principals
        ):
            return False
        if any(p.fullmatch(request.action) for p in self.actions) == self.not_action:
            return False
        if any(p.fullmatch(request.resource) for p in self.resources) == self.not_resource:
            return False
        return all(c.matches(request.lookup) for c in self.conditions)


@dataclass(frozen=True)
class Policy:
    """A parsed key policy."""

    text: str
    statements: tuple[Statement, ...]


def evaluate(policy: Policy, request: AccessRequest) -> Decision:
    """DENY if a statement denies the request, else ALLOW if one allows it, else NONE."""
    allowed = False
    for statement in policy.statements:
        if statement.applies(request):
            if not statement.allow:
                return Decision.DENY
            allowed = True
    return Decision.ALLOW if allowed else Decision.NONE


def _malformed(where: str, what: str) -> MalformedPolicyDocumentError:
    return MalformedPolicyDocumentError("policy", f"{where}: {what}" if where else what)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _malformed("", f"the JSON object has the key '{key}' twice")
        seen[key] = value
    return seen


def _strings(where: str, value: Any) -> list[str]:
    """A string or a non-empty list of non-empty strings."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _malformed(where, "must not be an empty list")
    for item in items:
        if not isinstance(item, str) or not item:
            raise _malformed(where, "must be a non-empty string or a list of them")
    return items


def _principal(where: str, value: Any, account: str) -> tuple[bool, bool, frozenset[str]]:
    """(any, root, exact principals) of a Principal element."""
    if value == "*":
        return True, False, frozenset()
    if not isinstance(value, dict) or not value:
        raise _malformed(where, 'must be "*" or an object such as {"AWS": "<principal>"}')
    any_principal = root = False
    exact: set[str] = set()
    for kind, entries in value.items():
        at = f"{where}.{kind}"
        if kind not in _PRINCIPAL_KINDS:
            raise _malformed(at, f"unknown principal type (known: {', '.join(_PRINCIPAL_KINDS)})")
        for entry in _strings(at, entries):
            if kind != "AWS":
                continue  # AWS service and federated principals never call kmsd
            if entry == "*":
                any_principal = True
            elif entry in (root_arn(account), account):
                root = True
            elif entry.startswith("arn:aws:iam::") and entry.endswith(":root"):
                continue  # another account's root: nobody here
            else:
                exact.add(entry)
    return any_principal, root, frozenset(exact)


def _actions(where: str, value: Any) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for action in _strings(where, value):
        if action != "*" and not _ACTION.fullmatch(action):
            raise _malformed(
                where, f"'{action[:80]}' is not '*' or 'kms:<Operation>' (wildcards * and ?)"
            )
        patterns.append(wildcard(action, ignore_case=True))
    return tuple(patterns)


def _resources(where: str, value: Any) -> tuple[re.Pattern[str], ...]:
    patterns = []
    for resource in _strings(where, value):
        if resource != "*" and not resource.startswith("arn:"):
            raise _malformed(where, f"'{resource[:80]}' is not '*' or a key ARN")
        patterns.append(wildcard(resource))
    return tuple(patterns)


def _either(where: str, body: dict[str, Any], name: str) -> tuple[str, Any]:
    """The element `name` or `Not<name>`, exactly one of them."""
    negated = f"Not{name}"
    if (name in body) == (negated in body):
        raise _malformed(where, f"needs exactly one of {name} and {negated}")
    return (name, body[name]) if name in body else (negated, body[negated])


def _statement(where: str, body: Any, account: str) -> Statement:
    if not isinstance(body, dict):
        raise _malformed(where, "must be an object")
    for element in body:
        if element not in _STATEMENT_ELEMENTS:
            raise _malformed(f"{where}.{element}", "unknown statement element")
    sid = body.get("Sid", "")
    if not isinstance(sid, str):
        raise _malformed(f"{where}.Sid", "must be a string")
    effect = body.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise _malformed(f"{where}.Effect", "must be Allow or Deny")
    if "Principal" not in body:
        raise _malformed(where, "needs a Principal (a key policy names who it applies to)")
    any_principal, root, exact = _principal(f"{where}.Principal", body["Principal"], account)
    action_name, action_value = _either(where, body, "Action")
    resource_name, resource_value = _either(where, body, "Resource")
    conditions: tuple[Condition, ...] = ()
    if "Condition" in body:
        conditions = parse_condition_block(f"{where}.Condition", body["Condition"])
    return Statement(
        sid=sid,
        allow=effect == "Allow",
        any_principal=any_principal,
        root_principal=root,
        principals=exact,
        actions=_actions(f"{where}.{action_name}", action_value),
        not_action=action_name == "NotAction",
        resources=_resources(f"{where}.{resource_name}", resource_value),
        not_resource=resource_name == "NotResource",
        conditions=conditions,
    )


def check_text(text: str) -> None:
    """AWS's limits on the document as text: 1-32768 bytes of tab, LF, CR, U+0020-U+00FF."""
    if not text:
        raise _malformed("", "the policy is empty")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_POLICY_BYTES:
        raise _malformed("", f"the policy is {size} bytes; at most {MAX_POLICY_BYTES}")
    if not _ALLOWED_CHARS.fullmatch(text):
        bad = next(c for c in text if not _ALLOWED_CHARS.fullmatch(c))
        raise _malformed(
            "",
            f"character U+{ord(bad):04X} is not allowed (only tab, line feed, carriage"
            " return and U+0020-U+00FF)",
        )


def parse_policy(text: str, account: str) -> Policy:
    """Parses and validates a key policy; raises MalformedPolicyDocumentError naming
    what is wrong. `account` is the cluster's account id (for the root principal)."""
    check_text(text)
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as error:
        raise _malformed(
            "", f"not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    except RecursionError:
        raise _malformed("", "not valid JSON: nested too deeply") from None
    if not isinstance(document, dict):
        raise _malformed("", "the policy must be a JSON object")
    for element in document:
        if element not in _DOCUMENT_ELEMENTS:
            raise _malformed(element, "unknown policy element (known: Version, Id, Statement)")
    version = document.get("Version", VERSIONS[0])
    if version not in VERSIONS:
        raise _malformed("Version", f"must be {VERSIONS[0]} (or {VERSIONS[1]})")
    if "Id" in document and not isinstance(document["Id"], str):
        raise _malformed("Id", "must be a string")
    if "Statement" not in document:
        raise _malformed("Statement", "required")
    raw = document["Statement"]
    bodies: Sequence[Any] = raw if isinstance(raw, list) else [raw]
    if not bodies:
        raise _malformed("Statement", "needs at least one statement")
    statements = tuple(
        _statement(f"Statement[{n}]", body, account) for n, body in enumerate(bodies)
    )
    sids = [s.sid for s in statements if s.sid]
    for sid in sids:
        if sids.count(sid) > 1:
            raise _malformed("Statement", f"the Sid '{sid[:80]}' is used twice")
    return Policy(text=text, statements=statements)


def root_arn(account: str) -> str:
    """The principal AWS uses for "the account": here, the administrators."""
    return f"arn:aws:iam::{account}:root"


# Every key created without a policy by the same caller gets the same document: built
# once (the indented json.dumps costs more than the rest of a CreateKey's handler).
@functools.lru_cache(maxsize=1024)
def default_policy(account: str, creator: str | None) -> str:
    """The key policy of a key created without one: AWS's default (the account's root,
    here the administrators, may do everything) plus full access for its creator."""
    statements: list[dict[str, Any]] = [
        {
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": {"AWS": root_arn(account)},
            "Action": "kms:*",
            "Resource": "*",
        }
    ]
    if creator:
        statements.append(
            {
                "Sid": "Allow the key creator full access",
                "Effect": "Allow",
                "Principal": {"AWS": creator},
                "Action": "kms:*",
                "Resource": "*",
            }
        )
    document = {"Version": VERSIONS[0], "Id": "key-default-1", "Statement": statements}
    return json.dumps(document, indent=2)
