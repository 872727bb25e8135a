"""Checkers for chaos-test histories: linearizability and acknowledged-write durability.

Chaos tests record every client operation with a `HistoryRecorder`, then hand the
history to `check` with a `Model` (`KeyStoreModel` for kmsd's key states), and the
final per-node key sets to `check_acknowledged_present`. See docs/checking.md.

Only the standard library is used, so the checker can run anywhere a history is.
"""

from kmsd.checker.durability import SetCheck, check_acknowledged_present, classify
from kmsd.checker.history import (
    UNKNOWN,
    Handle,
    HistoryRecorder,
    Operation,
    from_jsonl,
    to_jsonl,
)
from kmsd.checker.linearizability import CheckResult, PartitionResult, check
from kmsd.checker.models import DROP, KeyStoreModel, KVModel, Model, RegisterModel

__all__ = [
    "DROP",
    "UNKNOWN",
    "CheckResult",
    "Handle",
    "HistoryRecorder",
    "KVModel",
    "KeyStoreModel",
    "Model",
    "Operation",
    "PartitionResult",
    "RegisterModel",
    "SetCheck",
    "check",
    "check_acknowledged_present",
    "classify",
    "from_jsonl",
    "to_jsonl",
]
