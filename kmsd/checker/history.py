"""Histories of client operations, and a recorder that builds them during a chaos run.

A history is a list of `Operation`s, each the interval from the moment a client sent a
request (`call`) to the moment it saw the answer (`ret`), with what it saw (`output`).
The three outcomes follow Jepsen's `:ok` / `:fail` / `:info`:

* `ok=True`: the operation completed and `output` is what the server answered. A
  *definite* error that the specification predicts (e.g. "KMSInvalidStateException"
  from DisableKey on a key pending deletion) is an ordinary output, not a failure.
* `ok=False`: the operation definitely had no effect (a validation error, NotLeader
  before forwarding). The checker ignores it; it is kept only so saved histories are
  complete.
* `ok=None`, `ret=None`: indeterminate (timeout, connection reset, UNAVAILABLE after
  forwarding). It may or may not have taken effect, and may take effect at any time
  after `call`; the checker treats `ret` as +infinity and the output as `UNKNOWN`.

Timestamps come from one clock in one process: either `time.monotonic_ns()` or a
logical counter. Only their order matters.
"""

from __future__ import annotations

import enum
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final


class _Unknown(enum.Enum):
    UNKNOWN = "UNKNOWN"

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown.UNKNOWN
"""The output the checker hands a model for an indeterminate operation."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation: its interval in time and what the client observed."""

    client_id: int
    op: str
    args: tuple[object, ...]
    call: int
    ret: int | None
    output: object
    ok: bool | None

    def __post_init__(self) -> None:
        # A malformed record would silently change the real-time order the checker
        # relies on, so reject it where it is made rather than deep inside a search.
        if (self.ret is None) != (self.ok is None):
            raise ValueError(f"ret and ok must both be None or both be set: {self!r}")
        if self.ret is not None and self.ret < self.call:
            raise ValueError(f"operation returns before it is called: {self!r}")

    @property
    def indeterminate(self) -> bool:
        """True if the client never learned whether the operation took effect."""
        return self.ok is None

    @property
    def ret_or_inf(self) -> float:
        """The return time, +infinity for an indeterminate operation."""
        return math.inf if self.ret is None else self.ret

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict; tuples become lists (`from_json` turns them back)."""
        return {
            "client_id": self.client_id,
            "op": self.op,
            "args": _to_jsonable(self.args),
            "call": self.call,
            "ret": self.ret,
            "output": _to_jsonable(self.output),
            "ok": self.ok,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Operation:
        """The inverse of `to_json`. Lists load as tuples so values stay hashable."""
        args = _from_jsonable(data["args"])
        if not isinstance(args, tuple):
            raise ValueError(f"args must be a list: {data!r}")
        client_id, call, ret, ok = data["client_id"], data["call"], data["ret"], data["ok"]
        if not isinstance(client_id, int) or not isinstance(call, int):
            raise ValueError(f"client_id and call must be integers: {data!r}")
        if ret is not None and not isinstance(ret, int):
            raise ValueError(f"ret must be an integer or null: {data!r}")
        if ok is not None and not isinstance(ok, bool):
            raise ValueError(f"ok must be a boolean or null: {data!r}")
        return cls(
            client_id=client_id,
            op=str(data["op"]),
            args=args,
            call=call,
            ret=ret,
            output=_from_jsonable(data["output"]),
            ok=ok,
        )


def _to_jsonable(value: object) -> object:
    if isinstance(value, tuple | list):
        return [_to_jsonable(v) for v in value]
    if value is UNKNOWN:
        return None
    return value


def _from_jsonable(value: object) -> object:
    if isinstance(value, list):
        return tuple(_from_jsonable(v) for v in value)
    return value


def _freeze(value: object) -> object:
    # Lists become tuples when recorded, as they do when loaded from JSON, so a
    # history compares equal to its saved copy and its values stay hashable.
    if isinstance(value, tuple | list):
        return tuple(_freeze(v) for v in value)
    return value


def to_jsonl(history: Iterable[Operation], path: str | Path) -> None:
    """Writes one JSON object per line, so a failed chaos run can be re-checked later."""
    with open(path, "w", encoding="utf-8") as out:
        for operation in history:
            out.write(json.dumps(operation.to_json(), sort_keys=True) + "\n")


def from_jsonl(path: str | Path) -> list[Operation]:
    """Reads a history written by `to_jsonl`; blank lines are skipped."""
    history: list[Operation] = []
    with open(path, encoding="utf-8") as source:
        for number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            try:
                history.append(Operation.from_json(data))
            except (KeyError, ValueError) as error:
                raise ValueError(f"{path}:{number}: {error}") from error
    return history


@dataclass(frozen=True, slots=True)
class Handle:
    """An invoked, not yet completed operation; pass it back to the recorder."""

    index: int


@dataclass(slots=True)
class _Pending:
    client_id: int
    op: str
    args: tuple[object, ...]
    call: int


class HistoryRecorder:
    """Records operations from many clients, threads or asyncio tasks, on one clock.

    Every method takes a lock for a few microseconds and never awaits, so it is safe
    from threads and cheap enough to call from an event loop. Timestamps are made
    strictly increasing, so no two events tie and each `ret` is after its `call`: the
    order of events is the order in which this recorder saw them.
    """

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last = -1
        self._slots: list[_Pending | Operation] = []
        self._open = 0

    def _now(self) -> int:
        # Called with the lock held: a tie with the previous event is broken by +1 so
        # that "returned before called" never becomes "concurrent" or the reverse.
        now = max(self._clock(), self._last + 1)
        self._last = now
        return now

    def invoke(self, client_id: int, op: str, args: Sequence[object] = ()) -> Handle:
        """Call just before sending the request."""
        with self._lock:
            self._slots.append(_Pending(client_id, op, tuple(map(_freeze, args)), self._now()))
            self._open += 1
            return Handle(len(self._slots) - 1)

    def _finish(self, handle: Handle, output: object, ok: bool | None) -> Operation:
        with self._lock:
            pending = self._slots[handle.index]
            if not isinstance(pending, _Pending):
                raise ValueError(f"operation {handle.index} was already completed")
            operation = Operation(
                client_id=pending.client_id,
                op=pending.op,
                args=pending.args,
                call=pending.call,
                ret=None if ok is None else self._now(),
                output=_freeze(output),
                ok=ok,
            )
            self._slots[handle.index] = operation
            self._open -= 1
            return operation

    def complete(self, handle: Handle, output: object) -> Operation:
        """Call just after the answer arrived; `output` is a value or AWS error name.

        Lists in `output` (and in `args`, at `invoke`) are stored as tuples.
        """
        return self._finish(handle, output, True)

    def fail(self, handle: Handle, error: object) -> Operation:
        """The operation definitely had no effect; the checker will ignore it."""
        return self._finish(handle, error, False)

    def fail_indeterminate(self, handle: Handle) -> Operation:
        """The client cannot tell whether the operation took effect (timeout, reset)."""
        return self._finish(handle, None, None)

    @property
    def pending(self) -> int:
        """How many invoked operations have not been completed yet."""
        with self._lock:
            return self._open

    def history(self) -> list[Operation]:
        """All operations in invocation order; still-pending ones count as indeterminate."""
        with self._lock:
            return [
                slot
                if isinstance(slot, Operation)
                else Operation(slot.client_id, slot.op, slot.args, slot.call, None, None, None)
                for slot in self._slots
            ]

    def to_jsonl(self, path: str | Path) -> None:
        """Saves `history()` as JSON lines (see `from_jsonl`)."""
        to_jsonl(self.history(), path)
