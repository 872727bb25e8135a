"""Grants: which operations a grant allows, its encryption-context constraints, the
rules for creating grants from grants, and grant tokens.

As in AWS KMS:

- A grant allows its grantee the operations it lists, on one key. Constraints
  (EncryptionContextEquals / EncryptionContextSubset) restrict the operations that
  take an encryption context; DescribeKey, CreateGrant and RetireGrant ignore them.
  In a constraint, keys compare case-insensitively and values case-sensitively.
- A grantee whose grant includes CreateGrant may create grants for the same key
  with the same or fewer operations and constraints at least as strict.
- A grant token is opaque to clients. kmsd's carries the grant id and the log index
  the grant was committed at: a node that receives it waits until it has applied
  that index, then evaluates the grant from its state, so a new grant is usable at
  once on every node. A token gives no permission by itself (the grant must exist
  and name the caller as grantee), so it is not secret.

Pure: no gRPC, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import resources_pb2 as res

from kmsd.errors import InvalidGrantTokenError

# The operations AWS allows in grants for symmetric encryption keys.
SYMMETRIC_OPERATIONS: frozenset[int] = frozenset(
    {
        res.GRANT_OPERATION_DECRYPT,
        res.GRANT_OPERATION_ENCRYPT,
        res.GRANT_OPERATION_GENERATE_DATA_KEY,
        res.GRANT_OPERATION_GENERATE_DATA_KEY_WITHOUT_PLAINTEXT,
        res.GRANT_OPERATION_RE_ENCRYPT_FROM,
        res.GRANT_OPERATION_RE_ENCRYPT_TO,
        res.GRANT_OPERATION_GENERATE_DATA_KEY_PAIR,
        res.GRANT_OPERATION_GENERATE_DATA_KEY_PAIR_WITHOUT_PLAINTEXT,
        res.GRANT_OPERATION_CREATE_GRANT,
        res.GRANT_OPERATION_RETIRE_GRANT,
        res.GRANT_OPERATION_DESCRIBE_KEY,
    }
)
# Operations that take no encryption context: constraints do not apply to them.
CONSTRAINT_EXEMPT: frozenset[int] = frozenset(
    {
        res.GRANT_OPERATION_DESCRIBE_KEY,
        res.GRANT_OPERATION_CREATE_GRANT,
        res.GRANT_OPERATION_RETIRE_GRANT,
    }
)

# kms:<Action> of each grant operation (the AWS operation name).
OPERATION_NAMES: dict[int, str] = {
    value.number: "".join(
        part.capitalize() for part in value.name.removeprefix("GRANT_OPERATION_").split("_")
    )
    for value in res.GrantOperation.DESCRIPTOR.values
    if value.number
}
# "kms:Decrypt" -> GRANT_OPERATION_DECRYPT
_ACTION_OPERATIONS: dict[str, int] = {f"kms:{n}": op for op, n in OPERATION_NAMES.items()}

MAX_CONSTRAINT_PAIRS = 8
MAX_CONSTRAINT_VALUE = 384
GRANT_ID = re.compile(r"[0-9a-f]{64}")
_TOKEN_MAGIC = b"KG\x01"
_TOKEN_BYTES = len(_TOKEN_MAGIC) + 32 + 8


def operation_of(action: str) -> int:
    """The grant operation of a `kms:` action, or 0 when no grant can allow it."""
    return _ACTION_OPERATIONS.get(action, 0)


def has_constraints(constraints: res.GrantConstraints) -> bool:
    return bool(constraints.encryption_context_equals or constraints.encryption_context_subset)


def _folded(context: Mapping[str, str]) -> dict[str, str] | None:
    """The context with lowercased keys; None when two keys differ only by case (a
    constraint cannot tell which one it means, so it is not satisfied)."""
    folded = {k.lower(): v for k, v in context.items()}
    return folded if len(folded) == len(context) else None


def constraints_satisfied(constraints: res.GrantConstraints, context: Mapping[str, str]) -> bool:
    """Whether a request's encryption context satisfies a grant's constraints."""
    equals = constraints.encryption_context_equals
    subset = constraints.encryption_context_subset
    if not equals and not subset:
        return True
    folded = _folded(context)
    if folded is None:
        return False
    if equals and _folded(equals) != folded:
        return False
    return all(folded.get(k.lower()) == v for k, v in subset.items())


def grant_allows(grant: fsm.GrantRecord, action: str, context: Mapping[str, str] | None) -> bool:
    """Whether `grant` allows `action` (kms:Decrypt...) with this encryption context
    (None for operations that take none)."""
    operation = operation_of(action)
    if not operation or operation not in grant.operations:
        return False
    if operation in CONSTRAINT_EXEMPT or not has_constraints(grant.constraints):
        return True
    return constraints_satisfied(grant.constraints, context or {})


def at_least_as_strict(child: res.GrantConstraints, parent: res.GrantConstraints) -> bool:
    """Whether constraints `child` allow no context that `parent` refuses."""
    if not has_constraints(parent):
        return True
    # CreateGrant refuses constraint keys that differ only by case, so folding is exact.
    parent_equals = _folded(parent.encryption_context_equals) or {}
    parent_subset = _folded(parent.encryption_context_subset) or {}
    child_equals = _folded(child.encryption_context_equals) or {}
    child_subset = _folded(child.encryption_context_subset) or {}
    if child_equals:
        if not all(child_equals.get(k) == v for k, v in child_subset.items()):
            return True  # the child allows no context at all
        # Exactly one context is allowed: it must satisfy the parent.
        return (not parent_equals or parent_equals == child_equals) and all(
            child_equals.get(k) == v for k, v in parent_subset.items()
        )
    if parent_equals:
        return False  # the child allows many contexts, the parent one
    return all(child_subset.get(k) == v for k, v in parent_subset.items())


def may_delegate(
    parent: fsm.GrantRecord, operations: Iterable[int], constraints: res.GrantConstraints
) -> bool:
    """Whether the grantee of `parent` (a grant with CreateGrant) may create a grant with
    these operations and constraints: no operation it lacks, constraints as strict."""
    if res.GRANT_OPERATION_CREATE_GRANT not in parent.operations:
        return False
    if not set(operations) <= set(parent.operations):
        return False
    return at_least_as_strict(constraints, parent.constraints)


@dataclass(frozen=True)
class GrantToken:
    """What a grant token says: which grant, committed at which log index."""

    grant_id: str
    index: int


def encode_token(grant_id: str, index: int) -> str:
    """The grant token of `grant_id` committed at log `index`."""
    raw = _TOKEN_MAGIC + bytes.fromhex(grant_id) + index.to_bytes(8, "big")
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, field: str = "grant_tokens") -> GrantToken:
    """Parses a token `encode_token` made; InvalidGrantTokenError for anything else."""
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii") + b"=" * (-len(token) % 4))
    except (binascii.Error, UnicodeError, ValueError):
        raw = b""
    if len(raw) != _TOKEN_BYTES or not raw.startswith(_TOKEN_MAGIC):
        raise InvalidGrantTokenError(field, "is not a grant token this service issued")
    body = raw[len(_TOKEN_MAGIC) :]
    return GrantToken(grant_id=body[:32].hex(), index=int.from_bytes(body[32:], "big"))
