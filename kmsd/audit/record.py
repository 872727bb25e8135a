"""Audit records: what one request leaves behind, and its canonical encoding.

The format (fields, canonical JSON, hash, chain) is defined once, in
`kms_client.audit_verify`; this module builds records from request outcomes and
encodes them fast enough for the request path. Nothing secret goes in: the event
has no field for plaintext, ciphertext, data keys or key material, and every
string is bounded so that a hostile request cannot make a huge record.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kms_client.audit_verify import FORMAT_VERSION, RECOVERY_OPERATION

MAX_STRING = 2048
"""Longer strings (key references, request ids, sources...) are cut to this many characters."""
MAX_CONTEXT_CHARS = 16 * 1024
"""An encryption context larger than this (keys + values; valid ones are <= 8 KiB) is
not recorded, only its size."""
TRUNCATED_CONTEXT_KEY = "kmsd:truncated"


def bounded(text: str, limit: int = MAX_STRING) -> str:
    """`text`, cut to `limit` characters with a marker saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters]"


def bounded_context(context: Mapping[str, str]) -> dict[str, str]:
    """The encryption context as recorded: in full unless it is oversized (invalid)."""
    size = sum(len(k) + len(v) for k, v in context.items())
    if size <= MAX_CONTEXT_CHARS:
        return dict(context)
    return {TRUNCATED_CONTEXT_KEY: f"{len(context)} pairs, {size} characters: not recorded"}


_last_second: tuple[int, str] = (-1, "")


def rfc3339_ms(ms: int) -> str:
    """Milliseconds since the epoch as RFC 3339 UTC with milliseconds."""
    global _last_second
    seconds, millis = divmod(ms, 1000)
    cached_second, text = _last_second
    if seconds != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, text)
    return f"{text}.{millis:03d}Z"


@dataclass(slots=True)
class AuditEvent:
    """The fields of a record that describe the request (the writer adds the rest:
    v, seq, time, node, prev, hash)."""

    operation: str
    outcome: str = "ok"
    principal: str = ""
    source: str = ""
    key_arn: str | None = None
    request_id: str = ""
    encryption_context: Mapping[str, str] = field(default_factory=dict)
    error_reason: str = ""
    aws_exception: str = ""
    detail: Mapping[str, Any] | None = None


_random_bits = random.getrandbits  # the ids are not secrets; os.urandom costs a syscall


def new_request_id() -> str:
    """A random UUID (version 4 form) for a request that carries no request_id."""
    h = f"{_random_bits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def recovery_event(detail: Mapping[str, Any]) -> AuditEvent:
    """The record kmsd writes after cutting audit bytes (a torn tail, a failed write)."""
    return AuditEvent(operation=RECOVERY_OPERATION, principal="kmsd", detail=dict(detail))


canonical_json = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode
"""JSON in the records' canonical form (kms_client.audit_verify.canonical), made once."""


def encode(event: AuditEvent, *, seq: int, time_ms: int, node: int, prev: str) -> tuple[bytes, str]:
    """The record's line (canonical JSON and a newline) and its hash.

    Equal to `canonical(record) + b"\\n"` with `hash = record_hash(record)` (a test
    checks it), but serializes once: the fields sorting before "hash" and those after
    it are dumped separately, and the hash is spliced in between.
    """
    head = {
        "aws_exception": bounded(event.aws_exception),
        "detail": None if event.detail is None else dict(event.detail),
        "encryption_context": bounded_context(event.encryption_context),
        "error_reason": bounded(event.error_reason),
    }
    tail = {
        "key_arn": None if event.key_arn is None else bounded(event.key_arn),
        "node": node,
        "operation": bounded(event.operation),
        "outcome": event.outcome,
        "prev": prev,
        "principal": bounded(event.principal),
        "request_id": bounded(event.request_id),
        "seq": seq,
        "source": bounded(event.source),
        "time": rfc3339_ms(time_ms),
        "v": FORMAT_VERSION,
    }
    front = canonical_json(head)[:-1]
    back = canonical_json(tail)[1:]
    digest = hashlib.sha256(f"{front},{back}".encode()).hexdigest()
    return f'{front},"hash":"{digest}",{back}\n'.encode(), digest
