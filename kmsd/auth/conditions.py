"""The Condition element of a key policy: parsing and evaluating condition operators.

Supported operators, as in the AWS policy language: StringEquals, StringNotEquals,
StringEqualsIgnoreCase, StringNotEqualsIgnoreCase, StringLike, StringNotLike (`*`
and `?` wildcards), ArnEquals, ArnNotEquals, ArnLike, ArnNotLike (wildcards, like
StringLike), Bool and Null; each may carry the `ForAnyValue:` or `ForAllValues:`
set prefix (for multi-valued keys such as `kms:EncryptionContextKeys`) and the
`IfExists` suffix. Other AWS operators (Numeric*, Date*, IpAddress, Binary) are
refused rather than mis-evaluated.

Condition keys are case-insensitive (`kms:EncryptionContext:Dept` and
`kms:encryptioncontext:dept` are one key); values are compared case-sensitively
except by the `IgnoreCase` operators. The request's values come from a lookup
function (the extension point: the service layer decides which keys a request
has); a key the request does not have behaves as in AWS: positive operators do not
match, negated ones (`StringNotEquals`...) and `ForAllValues:` match, `IfExists`
matches, `Null: true` matches. Unknown keys are simply absent.

Everything here is pure and imports no gRPC.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from kmsd.errors import MalformedPolicyDocumentError

#: A request's value for a condition key: one string, a bool, or a list of strings
#: (multi-valued keys such as kms:EncryptionContextKeys).
ContextValue = str | bool | Sequence[str]
#: Looks a lowercased condition key up in the request; None when the request lacks it.
Lookup = Callable[[str], ContextValue | None]

# base operator -> (how values compare, negated)
_OPERATORS: dict[str, tuple[str, bool]] = {
    "StringEquals": ("equals", False),
    "StringNotEquals": ("equals", True),
    "StringEqualsIgnoreCase": ("equals-ci", False),
    "StringNotEqualsIgnoreCase": ("equals-ci", True),
    "StringLike": ("like", False),
    "StringNotLike": ("like", True),
    "ArnEquals": ("like", False),
    "ArnNotEquals": ("like", True),
    "ArnLike": ("like", False),
    "ArnNotLike": ("like", True),
    "Bool": ("bool", False),
    "Null": ("null", False),
}
_SET_PREFIXES = ("ForAnyValue", "ForAllValues")
_UNSUPPORTED = ("Numeric", "Date", "IpAddress", "NotIpAddress", "Binary")
MAX_CONDITION_KEY = 256


def _malformed(where: str, what: str) -> MalformedPolicyDocumentError:
    return MalformedPolicyDocumentError("policy", f"{where}: {what}")


@lru_cache(maxsize=4096)
def wildcard(pattern: str, ignore_case: bool = False) -> re.Pattern[str]:
    """`pattern` with `*` (any run of characters) and `?` (one character) as a regex."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL | (re.IGNORECASE if ignore_case else 0))


@dataclass(frozen=True)
class Condition:
    """One condition key under one operator, with the values the policy allows."""

    operator: str  # as written, e.g. "ForAnyValue:StringLike"
    compare: str  # equals | equals-ci | like | bool | null
    negated: bool
    set_op: str  # "" | "ForAnyValue" | "ForAllValues"
    if_exists: bool
    key: str  # lowercased
    values: tuple[str, ...]

    def _one(self, value: str) -> bool:
        """Whether one request value matches any policy value (before negation)."""
        if self.compare == "equals":
            return value in self.values
        if self.compare == "equals-ci":
            folded = value.casefold()
            return any(folded == v.casefold() for v in self.values)
        if self.compare == "like":
            return any(wildcard(v).fullmatch(value) for v in self.values)
        # bool
        return value.lower() in (v.lower() for v in self.values)

    def matches(self, lookup: Lookup) -> bool:
        """Whether the request (seen through `lookup`) satisfies this condition."""
        raw = lookup(self.key)
        request_values = _as_list(raw)
        if self.compare == "null":
            absent = not request_values
            return absent if self.values[0] == "true" else not absent
        if not request_values:
            if self.if_exists or self.set_op == "ForAllValues":
                return True
            if self.set_op == "ForAnyValue":
                return False
            return self.negated
        results = [self._one(v) != self.negated for v in request_values]
        if self.set_op == "ForAllValues":
            return all(results)
        if self.set_op == "ForAnyValue" or not self.negated:
            return any(results)
        # A negated operator on a multi-valued key without a set prefix: no value may
        # match any of the policy's values.
        return all(results)


def _as_list(raw: ContextValue | None) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, bool):
        return ["true" if raw else "false"]
    if isinstance(raw, str):
        return [raw]
    return list(raw)


def _scalar(where: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    raise _malformed(where, "condition values must be strings, booleans or numbers")


def _operator(where: str, name: str) -> tuple[str, bool, str, bool]:
    """(compare, negated, set prefix, if_exists) of an operator name; refuses others."""
    set_op = ""
    base = name
    prefix, sep, rest = name.partition(":")
    if sep:
        if prefix not in _SET_PREFIXES:
            raise _malformed(
                where, f"'{prefix}' is not a set operator (use ForAnyValue or ForAllValues)"
            )
        set_op, base = prefix, rest
    if_exists = base.endswith("IfExists") and base != "IfExists"
    if if_exists:
        base = base.removesuffix("IfExists")
    known = _OPERATORS.get(base)
    if known is None:
        if base.startswith(_UNSUPPORTED):
            raise _malformed(where, f"the condition operator {base} is not supported by kmsd")
        raise _malformed(where, f"'{name}' is not a condition operator")
    compare, negated = known
    if compare == "null" and (set_op or if_exists):
        raise _malformed(where, "Null takes no set operator and no IfExists")
    return compare, negated, set_op, if_exists


def parse_condition_block(where: str, block: Any) -> tuple[Condition, ...]:
    """The conditions of a statement's Condition element (`where` names it in errors)."""
    if not isinstance(block, dict):
        raise _malformed(where, "must be an object of condition operators")
    conditions: list[Condition] = []
    for name, keys in block.items():
        at = f"{where}.{name}"
        if not isinstance(name, str) or not name:
            raise _malformed(where, "condition operators must be non-empty strings")
        compare, negated, set_op, if_exists = _operator(at, name)
        if not isinstance(keys, dict) or not keys:
            raise _malformed(at, "must be an object of condition keys and values")
        for key, raw in keys.items():
            key_at = f"{at}.{key}"
            if not key or ":" not in key or len(key) > MAX_CONDITION_KEY:
                raise _malformed(
                    key_at, "a condition key is 'prefix:name', such as kms:EncryptionContextKeys"
                )
            items = raw if isinstance(raw, list) else [raw]
            if not items:
                raise _malformed(key_at, "needs at least one value")
            values = tuple(_scalar(key_at, item) for item in items)
            if compare in ("bool", "null"):
                values = tuple(v.lower() for v in values)
                if any(v not in ("true", "false") for v in values):
                    raise _malformed(key_at, f"{name} values must be true or false")
                if compare == "null" and len(values) != 1:
                    raise _malformed(key_at, "Null takes exactly one value")
            conditions.append(
                Condition(
                    operator=name,
                    compare=compare,
                    negated=negated,
                    set_op=set_op,
                    if_exists=if_exists,
                    key=key.lower(),
                    values=values,
                )
            )
    return tuple(conditions)
