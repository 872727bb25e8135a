"""Sequential specifications for the linearizability checker.

A model says what one operation may return from a state and what state it leaves.
The checker only ever asks a model these questions; it knows nothing about keys.

* `RegisterModel` (one read/write/CAS register) and `KVModel` (a map of registers,
  partitioned by key) are the textbook objects the checker's self-tests use.
* `KeyStoreModel` is the key-state part of kmsd (AWS's key-state table), partitioned
  by key id.

States must be hashable and immutable: the checker memoizes (linearized set, state).
A step called with `output is UNKNOWN` is an indeterminate operation: it must be legal
from every state and leave the state the operation would leave if it took effect.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from typing import Final, Protocol, TypeVar

from kmsd.checker.history import UNKNOWN

S = TypeVar("S", bound=Hashable)


class _Drop(enum.Enum):
    DROP = "DROP"

    def __repr__(self) -> str:
        return "DROP"


DROP: Final = _Drop.DROP
"""Returned by `Model.partition` for an operation that constrains nothing and can go."""


class Model(Protocol[S]):
    """The sequential specification of an object (Porcupine's `Model`)."""

    def init(self) -> S:
        """The initial state."""
        ...

    def step(self, state: S, op: str, args: tuple[object, ...], output: object) -> tuple[bool, S]:
        """Whether `output` is legal for `op(args)` in `state`, and the next state."""
        ...

    def partition(self, op: str, args: tuple[object, ...], output: object) -> Hashable | None:
        """The independent object the operation touches (P-compositionality).

        Operations with different keys never constrain each other, so each key is
        checked alone. `None` puts the operation in one shared partition (a model
        that does not partition returns `None` always); `DROP` removes it. `output`
        is `UNKNOWN` for an indeterminate operation.
        """
        ...

    def is_read_only(self, op: str) -> bool:
        """True if `op` never changes the state; indeterminate reads are then dropped."""
        ...

    def describe(self, op: str, args: tuple[object, ...], output: object) -> str:
        """A short human-readable rendering, e.g. `disable(k1) -> ok`."""
        ...


def _call(op: str, args: tuple[object, ...], output: object) -> str:
    shown = "?" if output is UNKNOWN else repr(output) if not isinstance(output, str) else output
    return f"{op}({', '.join(map(repr, args))}) -> {shown}"


class RegisterModel:
    """One register: `write(v)`, `read() -> v`, `cas(old, new) -> bool`.

    The output of a write is ignored (any acknowledgement will do).
    """

    def __init__(self, initial: Hashable = None) -> None:
        self._initial = initial

    def init(self) -> Hashable:
        return self._initial

    def step(
        self, state: Hashable, op: str, args: tuple[object, ...], output: object
    ) -> tuple[bool, Hashable]:
        if op == "write":
            return True, _hashable(args[0])
        if op == "read":
            return output is UNKNOWN or output == state, state
        if op == "cas":
            swapped = state == args[0]
            legal = output is UNKNOWN or output == swapped
            return legal, _hashable(args[1]) if swapped else state
        raise ValueError(f"RegisterModel has no operation {op!r}")

    def partition(self, op: str, args: tuple[object, ...], output: object) -> Hashable | None:
        return None

    def is_read_only(self, op: str) -> bool:
        return op == "read"

    def describe(self, op: str, args: tuple[object, ...], output: object) -> str:
        return _call(op, args, output)


KVState = frozenset[tuple[Hashable, Hashable]]


class KVModel:
    """A map of independent registers: `put(k, v)`, `get(k) -> v`, `cas(k, old, new)`.

    Absent keys read as `initial`. With `partitioned=False` the whole history is one
    search; the self-tests use that to check that partitioning changes no verdict.
    """

    def __init__(self, initial: Hashable = None, partitioned: bool = True) -> None:
        self._initial = initial
        self._partitioned = partitioned

    def init(self) -> KVState:
        return frozenset()

    def step(
        self, state: KVState, op: str, args: tuple[object, ...], output: object
    ) -> tuple[bool, KVState]:
        key = _hashable(args[0])
        values = dict(state)
        current = values.get(key, self._initial)
        if op == "get":
            return output is UNKNOWN or output == current, state
        if op == "put":
            values[key] = _hashable(args[1])
            return True, frozenset(values.items())
        if op == "cas":
            swapped = current == args[1]
            if swapped:
                values[key] = _hashable(args[2])
            return output is UNKNOWN or output == swapped, frozenset(values.items())
        raise ValueError(f"KVModel has no operation {op!r}")

    def partition(self, op: str, args: tuple[object, ...], output: object) -> Hashable | None:
        return _hashable(args[0]) if self._partitioned else None

    def is_read_only(self, op: str) -> bool:
        return op == "get"

    def describe(self, op: str, args: tuple[object, ...], output: object) -> str:
        return _call(op, args, output)


def _hashable(value: object) -> Hashable:
    if not isinstance(value, Hashable):
        raise TypeError(f"model values must be hashable, got {value!r}")
    return value


# Key states, spelled as AWS spells them; ABSENT is "never created".
ENABLED: Final = "Enabled"
DISABLED: Final = "Disabled"
PENDING_DELETION: Final = "PendingDeletion"
ABSENT: Final = "NotFound"

OK: Final = "ok"
NOT_FOUND: Final = "NotFoundException"
DISABLED_EXCEPTION: Final = "DisabledException"
INVALID_STATE: Final = "KMSInvalidStateException"

# A client may report a missing key either way; both mean the same observation.
_NOT_FOUND_SPELLINGS: Final = frozenset({ABSENT, NOT_FOUND})

KeyStoreState = tuple[tuple[str, str], ...]

# (operation, key state) -> (expected output, next state). Mirrors the AWS key-state
# table as kmsd implements it (kmsd/fsm/key_states.py); the self-tests compare them.
_TABLE: Final[dict[tuple[str, str], tuple[str, str]]] = {
    ("enable", ENABLED): (OK, ENABLED),
    ("enable", DISABLED): (OK, ENABLED),
    ("enable", PENDING_DELETION): (INVALID_STATE, PENDING_DELETION),
    ("disable", ENABLED): (OK, DISABLED),
    ("disable", DISABLED): (OK, DISABLED),
    ("disable", PENDING_DELETION): (INVALID_STATE, PENDING_DELETION),
    ("schedule_deletion", ENABLED): (OK, PENDING_DELETION),
    ("schedule_deletion", DISABLED): (OK, PENDING_DELETION),
    ("schedule_deletion", PENDING_DELETION): (INVALID_STATE, PENDING_DELETION),
    ("cancel_deletion", ENABLED): (INVALID_STATE, ENABLED),
    ("cancel_deletion", DISABLED): (INVALID_STATE, DISABLED),
    ("cancel_deletion", PENDING_DELETION): (OK, DISABLED),
    ("describe", ENABLED): (ENABLED, ENABLED),
    ("describe", DISABLED): (DISABLED, DISABLED),
    ("describe", PENDING_DELETION): (PENDING_DELETION, PENDING_DELETION),
    ("encrypt_allowed", ENABLED): (OK, ENABLED),
    ("encrypt_allowed", DISABLED): (DISABLED_EXCEPTION, DISABLED),
    ("encrypt_allowed", PENDING_DELETION): (INVALID_STATE, PENDING_DELETION),
}

KEY_OPERATIONS: Final = frozenset(op for op, _ in _TABLE)
"""The operations on an existing key id; `create` is the other one."""


class KeyStoreModel:
    """The key states of kmsd, per key id.

    Operations (outputs are plain strings):

    * `create()` -> the new key id (chosen by the server); the key starts Enabled.
      Its partition is its output, so an indeterminate create, whose id nobody
      learned, is dropped: no other operation can name that key.
    * `enable(id)`, `disable(id)`, `schedule_deletion(id)`, `cancel_deletion(id)`
      -> "ok" or "KMSInvalidStateException", per AWS's key-state table.
    * `describe(id)` -> "Enabled" | "Disabled" | "PendingDeletion" | "NotFound".
    * `encrypt_allowed(id)` -> "ok" (Enabled) | "DisabledException" (Disabled) |
      "KMSInvalidStateException" (PendingDeletion).

    Any operation on a never-created id returns "NotFoundException" (or "NotFound";
    the two spellings are accepted interchangeably). The end of a deletion's waiting
    period (the key disappearing) is not modelled: chaos runs use real waiting periods
    of 7+ days.
    """

    def __init__(self, partitioned: bool = True) -> None:
        self._partitioned = partitioned

    def init(self) -> KeyStoreState:
        return ()

    def step(
        self, state: KeyStoreState, op: str, args: tuple[object, ...], output: object
    ) -> tuple[bool, KeyStoreState]:
        keys = dict(state)
        if op == "create":
            if output is UNKNOWN:
                return True, state
            key_id = str(output)
            # A server must never hand out an id twice.
            if key_id in keys:
                return False, state
            keys[key_id] = ENABLED
            return True, tuple(sorted(keys.items()))
        key_id = str(args[0])
        current = keys.get(key_id, ABSENT)
        expected, after = self.expect(op, current)
        if output is UNKNOWN:
            legal = True
        elif expected in _NOT_FOUND_SPELLINGS:
            legal = output in _NOT_FOUND_SPELLINGS
        else:
            legal = output == expected
        if after == current:
            return legal, state
        keys[key_id] = after
        return legal, tuple(sorted(keys.items()))

    @staticmethod
    def expect(op: str, key_state: str) -> tuple[str, str]:
        """The output `op` must return on a key in `key_state`, and the state after."""
        if key_state == ABSENT:
            if op not in KEY_OPERATIONS:
                raise ValueError(f"KeyStoreModel has no operation {op!r}")
            return (ABSENT if op == "describe" else NOT_FOUND), ABSENT
        try:
            return _TABLE[op, key_state]
        except KeyError:
            raise ValueError(f"KeyStoreModel has no operation {op!r}") from None

    def partition(self, op: str, args: tuple[object, ...], output: object) -> Hashable | None:
        if op == "create":
            return DROP if output is UNKNOWN else (str(output) if self._partitioned else None)
        return str(args[0]) if self._partitioned else None

    def is_read_only(self, op: str) -> bool:
        return op in ("describe", "encrypt_allowed")

    def describe(self, op: str, args: tuple[object, ...], output: object) -> str:
        return _call(op, args, output)
