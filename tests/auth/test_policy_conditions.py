"""Condition operators: every supported operator, set prefixes, IfExists, absent keys,
and refusals of what kmsd does not evaluate."""

from __future__ import annotations

from typing import Any

import pytest

from kmsd.auth.conditions import Condition, ContextValue, parse_condition_block
from kmsd.errors import MalformedPolicyDocumentError


def one(operator: str, key: str, values: Any) -> Condition:
    (condition,) = parse_condition_block("C", {operator: {key: values}})
    return condition


def holds(operator: str, values: Any, request: ContextValue | None, key: str = "k:x") -> bool:
    context: dict[str, ContextValue] = {} if request is None else {key.lower(): request}
    return one(operator, key, values).matches(context.get)


@pytest.mark.parametrize(
    ("operator", "values", "request_value", "expected"),
    [
        ("StringEquals", "a", "a", True),
        ("StringEquals", "a", "A", False),
        ("StringEquals", ["a", "b"], "b", True),
        ("StringEquals", "a", None, False),
        ("StringNotEquals", "a", "b", True),
        ("StringNotEquals", "a", "a", False),
        ("StringNotEquals", "a", None, True),  # absent keys satisfy negated operators
        ("StringEqualsIgnoreCase", "Prod", "pROD", True),
        ("StringEqualsIgnoreCase", "Prod", "dev", False),
        ("StringNotEqualsIgnoreCase", "Prod", "PROD", False),
        ("StringNotEqualsIgnoreCase", "Prod", "dev", True),
        ("StringLike", "app-*", "app-7", True),
        ("StringLike", "app-?", "app-77", False),
        ("StringLike", "a*c", "abbbc", True),
        ("StringLike", "a.c", "abc", False),  # only * and ? are special
        ("StringLike", "[ab]", "a", False),
        ("StringLike", "A*", "abc", False),  # case-sensitive
        ("StringLike", "x", None, False),
        ("StringNotLike", "app-*", "web-1", True),
        ("StringNotLike", "app-*", "app-1", False),
        ("StringNotLike", "app-*", None, True),
        ("ArnLike", "arn:aws:kms:*:111122223333:key/*", "arn:aws:kms:eu:111122223333:key/1", True),
        ("ArnEquals", "arn:aws:kms:*", "arn:aws:s3:::b", False),
        ("ArnNotLike", "arn:aws:kms:*", "arn:aws:s3:::b", True),
        ("ArnNotEquals", "arn:x", "arn:x", False),
        ("Bool", "true", True, True),
        ("Bool", True, True, True),
        ("Bool", "false", True, False),
        ("Bool", "TRUE", "true", True),
        ("Bool", "true", None, False),
        ("Null", "true", None, True),
        ("Null", "true", "x", False),
        ("Null", "false", "x", True),
        ("Null", False, None, False),
        ("StringEqualsIfExists", "a", None, True),
        ("StringEqualsIfExists", "a", "b", False),
        ("StringLikeIfExists", "a*", "ab", True),
        ("BoolIfExists", "false", None, True),
        ("StringEquals", 5, "5", True),  # numbers and booleans compare as strings
    ],
)
def test_operators(operator: str, values: Any, request_value: Any, expected: bool) -> None:
    assert holds(operator, values, request_value) is expected


@pytest.mark.parametrize(
    ("operator", "values", "request_values", "expected"),
    [
        ("ForAnyValue:StringEquals", ["a", "b"], ["x", "b"], True),
        ("ForAnyValue:StringEquals", ["a", "b"], ["x", "y"], False),
        ("ForAnyValue:StringEquals", ["a"], [], False),
        ("ForAnyValue:StringEquals", ["a"], None, False),
        ("ForAllValues:StringEquals", ["a", "b"], ["a", "b"], True),
        ("ForAllValues:StringEquals", ["a", "b"], ["a", "c"], False),
        ("ForAllValues:StringEquals", ["a"], [], True),  # vacuously true, as in AWS
        ("ForAllValues:StringEquals", ["a"], None, True),
        ("ForAllValues:StringLike", ["app-*"], ["app-1", "app-2"], True),
        ("ForAnyValue:StringNotEquals", ["a"], ["a", "b"], True),
        ("ForAnyValue:StringNotEquals", ["a"], ["a"], False),
        ("ForAllValues:StringNotEquals", ["a"], ["b", "c"], True),
        ("ForAllValues:StringNotEquals", ["a"], ["b", "a"], False),
        ("ForAnyValue:StringEqualsIgnoreCase", ["A"], ["a"], True),
        # Without a set prefix, a multi-valued key: positive operators need one value to
        # match; negated ones need no value to match.
        ("StringEquals", ["a"], ["x", "a"], True),
        ("StringNotEquals", ["a"], ["x", "a"], False),
        ("StringNotEquals", ["a"], ["x", "y"], True),
    ],
)
def test_set_operators_on_multi_valued_keys(
    operator: str, values: Any, request_values: Any, expected: bool
) -> None:
    assert holds(operator, values, request_values) is expected


def test_condition_keys_are_case_insensitive_and_values_are_not() -> None:
    condition = one("StringEquals", "kms:EncryptionContext:Department", "Finance")
    assert condition.key == "kms:encryptioncontext:department"
    assert condition.matches({"kms:encryptioncontext:department": "Finance"}.get)
    assert not condition.matches({"kms:encryptioncontext:department": "finance"}.get)


def test_unknown_condition_keys_are_simply_absent() -> None:
    assert not holds("StringEquals", "x", None, key="kms:ViaService")
    assert holds("StringNotEquals", "x", None, key="aws:SourceVpc")


@pytest.mark.parametrize(
    ("block", "problem"),
    [
        ("x", "C: must be an object of condition operators"),
        ({"StringEquals": "x"}, "C.StringEquals: must be an object of condition keys"),
        ({"StringEquals": {}}, "C.StringEquals: must be an object of condition keys"),
        ({"StringEqual": {"k:x": "a"}}, "'StringEqual' is not a condition operator"),
        ({"NumericLessThan": {"k:x": "1"}}, "NumericLessThan is not supported"),
        ({"DateGreaterThan": {"k:x": "1"}}, "DateGreaterThan is not supported"),
        ({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}, "IpAddress is not supported"),
        ({"ForSomeValues:StringEquals": {"k:x": "a"}}, "'ForSomeValues' is not a set operator"),
        ({"StringEquals": {"nocolon": "a"}}, "a condition key is 'prefix:name'"),
        ({"StringEquals": {"k:x": []}}, "C.StringEquals.k:x: needs at least one value"),
        ({"StringEquals": {"k:x": {"a": 1}}}, "must be strings, booleans or numbers"),
        ({"StringEquals": {"k:x": None}}, "must be strings, booleans or numbers"),
        ({"Bool": {"k:x": "yes"}}, "Bool values must be true or false"),
        ({"Null": {"k:x": ["true", "false"]}}, "Null takes exactly one value"),
        ({"ForAnyValue:Null": {"k:x": "true"}}, "Null takes no set operator"),
    ],
)
def test_malformed_conditions_name_the_problem(block: Any, problem: str) -> None:
    with pytest.raises(MalformedPolicyDocumentError) as info:
        parse_condition_block("C", block)
    assert problem in info.value.violations[0].description
