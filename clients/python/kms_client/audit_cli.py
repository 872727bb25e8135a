"""`kmsctl audit verify FILE...` and `kmsctl audit tail FILE [--follow]`: offline tools
over a node's audit files (docs/audit.md). No server is contacted; standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from kms_client.audit_verify import (
    ChainChecker,
    audit_files,
    describe,
    file_seq,
    parse_record,
    verify,
)

POLL_SECONDS = 0.2


def configure(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Adds the `audit` command and its subcommands."""
    audit = sub.add_parser(
        "audit",
        help="check or follow a node's audit log (offline, no server needed)",
        allow_abbrev=False,
    )
    actions = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "verify",
        help="check the hash chain of audit files; name the first broken record",
        description="Checks audit files as one chain: every record's hash, and that each"
        " follows the one before (seq and prev), across files. Files named"
        " audit-<seq>.jsonl are taken in their order; a directory means all audit files"
        " in it. Prints 'OK: N records' (exit 0) or 'BROKEN at FILE:LINE (seq S): why'"
        " (exit 1).",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="audit files or a directory")
    tail = actions.add_parser(
        "tail",
        help="print the last records of an audit log, human-readably; --follow for more",
    )
    tail.add_argument("file", metavar="FILE", help="an audit file, or a node's audit directory")
    tail.add_argument(
        "-n", "--lines", type=int, default=10, help="records to show first (default 10; 0: all)"
    )
    tail.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing records as they are appended, across file rotation (Ctrl-C stops)",
    )
    tail.add_argument(
        "--raw", action="store_true", help="print the JSON lines as they are, not described"
    )
    return audit


def run_verify(files: list[str], out: TextIO) -> int:
    """`kmsctl audit verify`: 0 if the chain is intact, 1 if not."""
    result = verify(files)
    bad = result.first_bad
    if bad is not None:
        seq = "?" if bad.seq is None else str(bad.seq)
        where = bad.file or "(no files)"
        print(f"BROKEN at {where}:{bad.line} (seq {seq}): {bad.why}", file=out)
        if result.records:
            print(f"  the {result.records} records before it are intact", file=out)
        return 1
    print(f"OK: {result.records} records", file=out)
    if result.records:
        print(
            f"  {result.files} file(s), seq {result.first_seq}..{result.last_seq},"
            f" last hash {result.last_hash}",
            file=out,
        )
    if result.records and not result.from_genesis:
        print(
            f"  note: the chain starts at seq {result.first_seq}, not 1: the files before it"
            " were not given, so its first link was not checked",
            file=out,
        )
    for recovery in result.recoveries:
        detail = json.dumps(dict(recovery.detail), sort_keys=True)
        print(
            f"  note: recovery record at {recovery.file}:{recovery.line} (seq {recovery.seq}):"
            f" {detail}",
            file=out,
        )
    return 0


def _newest(path: Path) -> Path | None:
    files = audit_files(path)
    return files[-1] if files else None


class Follower:
    """Reads an audit log's records as they are appended, across rotation: when the
    current file has nothing new and a later audit file exists beside it, moves on."""

    def __init__(self, path: Path, emit: Callable[[str], None], raw: bool = False) -> None:
        self.path = path
        self._emit = emit
        self._raw = raw
        self._offset = 0
        self._partial = b""
        self._chain = ChainChecker()
        self._line = 0

    def _show(self, line: bytes) -> None:
        self._line += 1
        if self._raw:
            self._emit(line.decode("utf-8", "replace"))
            return
        record, why = parse_record(line)
        if why:
            self._emit(f"!! {self.path.name}:{self._line}: bad record: {why}")
            return
        broken = self._chain.follow(record)
        if broken:
            self._emit(f"!! {self.path.name}:{self._line}: chain broken: {broken}")
        self._emit(describe(record))

    def start(self, last: int) -> None:
        """Shows the last `last` records (0: all) of the current file."""
        data = self.path.read_bytes()
        complete, newline, self._partial = data.rpartition(b"\n")
        self._offset = len(data)
        lines = complete.split(b"\n") if newline else []
        if last and len(lines) > last:
            self._line = len(lines) - last
            lines = lines[-last:]
        for line in lines:
            self._show(line)

    def _read_more(self) -> bool:
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        if not data:
            return False
        self._offset += len(data)
        complete, newline, self._partial = (self._partial + data).rpartition(b"\n")
        if newline:
            for line in complete.split(b"\n"):
                self._show(line)
        return True

    def poll(self) -> bool:
        """Shows what was appended since the last call; True if anything was read."""
        if self._read_more():
            return True
        current = file_seq(self.path.name)
        if current is None:
            return False
        later = [p for p in audit_files(self.path.parent) if (file_seq(p.name) or 0) > current]
        if not later:
            return False
        # The writer closes a file before it creates the next, so this one is complete
        # now: read what was appended since the read above, then move on.
        self._read_more()
        if self._partial:
            self._emit(f"!! {self.path.name}: ends inside a record ({len(self._partial)} bytes)")
        self.path, self._offset, self._partial, self._line = later[0], 0, b"", 0
        return True


def run_tail(
    file: str,
    lines: int,
    follow: bool,
    raw: bool,
    out: TextIO,
    *,
    stop: Callable[[], bool] = lambda: False,
    poll_seconds: float = POLL_SECONDS,
) -> int:
    """`kmsctl audit tail`. With `follow`, runs until Ctrl-C or until `stop()` is true."""
    path = Path(file)
    if path.is_dir():
        newest = _newest(path)
        if newest is None:
            print(f"error: no audit files in {path}", file=sys.stderr)
            return 1
        path = newest

    def emit(text: str) -> None:
        print(text, file=out, flush=True)

    follower = Follower(path, emit, raw)
    try:
        follower.start(max(0, lines))
        while follow and not stop():
            if not follower.poll():
                time.sleep(poll_seconds)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs one `kmsctl audit` action; returns the exit status."""
    if args.audit_command == "verify":
        return run_verify(args.files, sys.stdout)
    return run_tail(args.file, args.lines, args.follow, args.raw, sys.stdout)
