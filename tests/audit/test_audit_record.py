"""kmsd.audit.record: the fast encoder equals the canonical definition; bounds; time."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from kms_client.audit_verify import (
    FIELDS,
    GENESIS,
    canonical,
    parse_record,
    record_hash,
)
from kmsd.audit.record import (
    MAX_STRING,
    TRUNCATED_CONTEXT_KEY,
    AuditEvent,
    bounded,
    bounded_context,
    encode,
    recovery_event,
    rfc3339_ms,
)

# Valid UTF-8 text only (protobuf strings are), including quotes, controls and non-BMP.
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@given(
    operation=text,
    outcome=st.sampled_from(["ok", "error"]),
    principal=text,
    source=text,
    key_arn=st.none() | text,
    request_id=text,
    context=st.dictionaries(text, text, max_size=5),
    reason=text,
    exception=text,
    detail=st.none() | st.dictionaries(text, text | st.integers(), max_size=3),
    seq=st.integers(1, 2**63),
    time_ms=st.integers(0, 253402300799999),
    node=st.integers(1, 2**31),
)
def test_encode_is_the_canonical_form_with_its_hash(
    operation: str,
    outcome: str,
    principal: str,
    source: str,
    key_arn: str | None,
    request_id: str,
    context: dict[str, str],
    reason: str,
    exception: str,
    detail: dict[str, object] | None,
    seq: int,
    time_ms: int,
    node: int,
) -> None:
    event = AuditEvent(
        operation=operation,
        outcome=outcome,
        principal=principal,
        source=source,
        key_arn=key_arn,
        request_id=request_id,
        encryption_context=context,
        error_reason=reason,
        aws_exception=exception,
        detail=detail,
    )
    line, digest = encode(event, seq=seq, time_ms=time_ms, node=node, prev=GENESIS)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert set(record) == set(FIELDS)
    assert canonical(record) + b"\n" == line
    assert record_hash(record) == digest == record["hash"]
    assert parse_record(line[:-1]) == (record, "")
    assert record["encryption_context"] == context


def test_hash_covers_every_field_but_itself() -> None:
    line, digest = encode(AuditEvent(operation="Encrypt"), seq=1, time_ms=0, node=1, prev=GENESIS)
    record = json.loads(line)
    for name in FIELDS:
        if name == "hash":
            continue
        changed = dict(record)
        changed[name] = "x" if record[name] != "x" else "y"
        assert record_hash(changed) != digest, name


def test_time_is_rfc3339_utc_with_milliseconds() -> None:
    assert rfc3339_ms(1_767_225_600_000) == "2026-01-01T00:00:00.000Z"
    assert rfc3339_ms(1_767_225_601_007) == "2026-01-01T00:00:01.007Z"
    assert rfc3339_ms(999) == "1970-01-01T00:00:00.999Z"


def test_oversized_strings_and_contexts_are_bounded() -> None:
    assert bounded("a" * MAX_STRING) == "a" * MAX_STRING
    cut = bounded("a" * (MAX_STRING + 5))
    assert cut.startswith("a" * MAX_STRING) and cut.endswith("[5 more characters]")
    valid = {"k": "v" * 8000}
    assert bounded_context(valid) == valid
    huge = {f"k{i}": "v" * 1000 for i in range(100)}
    assert list(bounded_context(huge)) == [TRUNCATED_CONTEXT_KEY]
    line, _ = encode(
        AuditEvent(operation="Encrypt", key_arn="k" * 100_000, encryption_context=huge),
        seq=1,
        time_ms=0,
        node=1,
        prev=GENESIS,
    )
    assert len(line) < 8 * 1024


def test_recovery_event() -> None:
    event = recovery_event({"event": "torn_tail_cut", "cut_bytes": 3})
    assert event.operation == "AuditRecovery" and event.principal == "kmsd"
    assert event.detail == {"event": "torn_tail_cut", "cut_bytes": 3}
