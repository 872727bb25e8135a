"""The kmsd audit log format, and its offline verifier: the one definition of both.

Standard library only, so that `kmsctl audit verify` works anywhere the client is
installed, with no kmsd and no server running; kmsd's writer (`kmsd.audit`) imports
the canonical form, the hash and the file naming from here, so writer and verifier
can never disagree. The format is documented in docs/audit.md.

A node's audit log is a directory of JSON-lines files `audit-<16 hex>.jsonl`, the
number being the `seq` of the file's first record. Every line is one record: a JSON
object in canonical form (keys sorted, no whitespace, UTF-8, no escaping beyond
JSON's own) holding exactly the fields of `FIELDS`. Records form one hash chain per
node, across files:

    hash = hex SHA-256 of the canonical form of the record without its `hash` field
    prev = the `hash` of the record before it (64 zeros for seq 1)
    seq  = the seq of the record before it + 1 (the first record has seq 1)

so editing, deleting, inserting or reordering a record, cutting a file short or
leaving a file out breaks the chain at the first record after the damage.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
GENESIS = "0" * 64
"""The `prev` of the first record of a node's chain (seq 1)."""

FILE_RE = re.compile(r"^audit-([0-9a-f]{16})\.jsonl$")
OUTCOMES = ("ok", "error")
RECOVERY_OPERATION = "AuditRecovery"
"""The operation of the records kmsd itself writes when it cut damaged audit bytes."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_context(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


FIELDS: Mapping[str, Callable[[Any], bool]] = {
    "v": _is_int,
    "seq": _is_int,
    "time": lambda v: isinstance(v, str),
    "node": _is_int,
    "principal": lambda v: isinstance(v, str),
    "source": lambda v: isinstance(v, str),
    "operation": lambda v: isinstance(v, str),
    "key_arn": lambda v: v is None or isinstance(v, str),
    "request_id": lambda v: isinstance(v, str),
    "encryption_context": _is_context,
    "outcome": lambda v: v in OUTCOMES,
    "error_reason": lambda v: isinstance(v, str),
    "aws_exception": lambda v: isinstance(v, str),
    "detail": lambda v: v is None or isinstance(v, dict),
    "prev": lambda v: isinstance(v, str) and _HEX64.match(v) is not None,
    "hash": lambda v: isinstance(v, str) and _HEX64.match(v) is not None,
}
"""Every field of a version-1 record, with the check of its type."""


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The canonical serialization: sorted keys, no whitespace, UTF-8 (not \\u-escaped)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical form of `record` without its `hash` field."""
    unhashed = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(unhashed)).hexdigest()


def file_name(first_seq: int) -> str:
    """The name of the audit file whose first record has seq `first_seq`."""
    return f"audit-{first_seq:016x}.jsonl"


def file_seq(name: str) -> int | None:
    """The first seq an audit file's name promises, or None if it is no audit file name."""
    match = FILE_RE.match(name)
    return int(match.group(1), 16) if match else None


def audit_files(directory: Path) -> list[Path]:
    """The audit files of a directory, in chain order."""
    named = [(file_seq(p.name), p) for p in directory.iterdir() if p.is_file()]
    return [p for seq, p in sorted((s, p) for s, p in named if s is not None)]


def parse_record(line: bytes) -> tuple[dict[str, Any], str]:
    """Parses and checks one line (without its newline) on its own: JSON, canonical
    form, fields, version and hash. Returns (record, "") or ({...}, why it is bad)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        return {}, f"not a JSON record ({type(error).__name__}: {error})"
    if not isinstance(record, dict):
        return {}, "not a JSON object"
    missing = [name for name in FIELDS if name not in record]
    if missing:
        return record, f"missing field(s) {', '.join(missing)}"
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        return record, f"unknown field(s) {', '.join(unknown)}"
    for name, check in FIELDS.items():
        if not check(record[name]):
            return record, f"field {name} has a wrong type or value"
    if record["v"] != FORMAT_VERSION:
        return record, f"unsupported format version {record['v']}"
    try:
        again = canonical(record)
    except ValueError:
        return record, "not serializable canonically"
    if again != line:
        return record, "not in canonical form (a byte was changed)"
    if record_hash(record) != record["hash"]:
        return record, "hash does not match the record's contents (the record was changed)"
    return record, ""


class ChainChecker:
    """Checks that records follow each other in one chain; feed them in order."""

    def __init__(self) -> None:
        self.last_seq: int | None = None
        self.last_hash = ""
        self.first_seq: int | None = None

    def follow(self, record: Mapping[str, Any]) -> str:
        """Why `record` cannot follow the records fed so far ("" if it can); it is
        taken as the new end of the chain either way."""
        seq, prev = record["seq"], record["prev"]
        why = ""
        if self.last_seq is None:
            self.first_seq = seq
            if seq < 1:
                why = f"seq {seq} is not a positive number"
            elif seq == 1 and prev != GENESIS:
                why = "the first record of the chain (seq 1) must have prev = 64 zeros"
            elif seq > 1 and prev == GENESIS:
                why = f"prev is the chain's start (64 zeros) but seq is {seq}"
        elif seq != self.last_seq + 1:
            if seq <= self.last_seq:
                why = f"seq {seq} follows seq {self.last_seq} (records out of order or repeated)"
            elif seq == self.last_seq + 2:
                why = f"seq {seq} follows seq {self.last_seq} (record {seq - 1} is missing)"
            else:
                why = (
                    f"seq {seq} follows seq {self.last_seq}"
                    f" (records {self.last_seq + 1}..{seq - 1} are missing)"
                )
        elif prev != self.last_hash:
            why = (
                f"prev does not match the hash of record {self.last_seq}"
                " (a record was replaced or changed)"
            )
        self.last_seq, self.last_hash = seq, record["hash"]
        return why


@dataclass(frozen=True)
class BadRecord:
    """Where the chain first breaks: file, 1-based line (0: the file as a whole), why."""

    file: str
    line: int
    why: str
    seq: int | None = None


@dataclass(frozen=True)
class Recovery:
    """A record kmsd wrote after cutting damaged or unacknowledged audit bytes."""

    file: str
    line: int
    seq: int
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of `verify`."""

    ok: bool
    records: int
    first_bad: BadRecord | None = None
    files: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str = ""
    recoveries: Sequence[Recovery] = field(default_factory=tuple)

    @property
    def from_genesis(self) -> bool:
        """True if the chain checked starts at the node's first record (seq 1)."""
        return self.first_seq == 1


def _lines(path: Path) -> Iterable[bytes]:
    with path.open("rb") as fh:
        yield from fh


def _ordered(paths: Sequence[Path]) -> list[Path]:
    """Audit file names sort by their first seq; other names keep the given order."""
    if all(file_seq(p.name) is not None for p in paths):
        return sorted(paths, key=lambda p: file_seq(p.name) or 0)
    return list(paths)


def verify(paths: Sequence[str | Path]) -> VerifyResult:
    """Checks a set of audit files as one chain, offline. Files named
    `audit-<seq>.jsonl` are taken in the order of their number, others as given;
    a directory stands for the audit files in it."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        files.extend(audit_files(path) if path.is_dir() else [path])
    files = _ordered(files)
    chain = ChainChecker()
    count = 0
    recoveries: list[Recovery] = []

    def result(bad: BadRecord | None) -> VerifyResult:
        return VerifyResult(
            ok=bad is None,
            records=count,
            first_bad=bad,
            files=len(files),
            first_seq=chain.first_seq,
            last_seq=chain.last_seq,
            last_hash=chain.last_hash,
            recoveries=tuple(recoveries),
        )

    if not files:
        return result(BadRecord("", 0, "no audit files given"))
    for position, path in enumerate(files):
        name = str(path)
        promised = file_seq(path.name)
        line_no = 0
        try:
            for raw in _lines(path):
                line_no += 1
                if not raw.endswith(b"\n"):
                    what = "the file" if position == len(files) - 1 else "a file before the last"
                    return result(
                        BadRecord(
                            name,
                            line_no,
                            f"incomplete last line: {what} ends inside a record (cut short,"
                            " or torn by a crash: kmsd cuts a torn tail when it restarts)",
                        )
                    )
                record, why = parse_record(raw[:-1])
                seq = record.get("seq") if _is_int(record.get("seq")) else None
                if why:
                    return result(BadRecord(name, line_no, why, seq))
                if line_no == 1 and promised is not None and promised != record["seq"]:
                    return result(
                        BadRecord(
                            name,
                            line_no,
                            f"the file name says its first record is seq {promised}, but it is"
                            f" seq {record['seq']} (records cut from its start, or renamed)",
                            seq,
                        )
                    )
                before = chain.last_seq
                why = chain.follow(record)
                if why:
                    if line_no == 1 and before is not None and record["seq"] > before + 1:
                        why += "; a file of the set is missing, or the one before was cut short"
                    return result(BadRecord(name, line_no, why, seq))
                count += 1
                if record["operation"] == RECOVERY_OPERATION and record["detail"] is not None:
                    recoveries.append(Recovery(name, line_no, record["seq"], record["detail"]))
        except OSError as error:
            return result(BadRecord(name, 0, f"cannot read: {error.strerror or error}"))
        if line_no == 0 and position < len(files) - 1:
            return result(BadRecord(name, 0, "empty file in the middle of the set"))
    return result(None)


def describe(record: Mapping[str, Any]) -> str:
    """One record as one human-readable line (kmsctl audit tail)."""
    parts = [
        str(record.get("time", "?")),
        f"#{record.get('seq', '?')}",
        f"node {record.get('node', '?')}",
        str(record.get("operation", "?")),
    ]
    if record.get("outcome") == "ok":
        parts.append("ok")
    else:
        parts.append(f"ERROR {record.get('aws_exception', '')} ({record.get('error_reason', '')})")
    if record.get("key_arn"):
        parts.append(f"key={record['key_arn']}")
    parts.append(f"principal={record.get('principal') or '-'}")
    parts.append(f"source={record.get('source') or '-'}")
    if record.get("request_id"):
        parts.append(f"request_id={record['request_id']}")
    context = record.get("encryption_context")
    if context:
        parts.append("context=" + json.dumps(context, sort_keys=True, ensure_ascii=False))
    if record.get("detail"):
        parts.append("detail=" + json.dumps(record["detail"], sort_keys=True, ensure_ascii=False))
    return "  ".join(parts)
