"""kmsd.raft: a pure, deterministic Raft consensus core (etcd-io/raft's design).

Standard library only: no I/O, no clock, no threads. A driver feeds it ticks and
peer messages and processes `Ready` batches (see `kmsd.raft.rawnode` for the
persist -> send -> apply -> advance contract). docs/raft.md explains the design.
"""

from .config import Config
from .errors import (
    CompactedError,
    ConfigError,
    ProposalDropped,
    RaftError,
    ReadIndexDropped,
    RequestDropped,
    SnapshotOutOfDateError,
    SnapshotTemporarilyUnavailableError,
    StorageError,
    UnavailableError,
)
from .rawnode import RawNode
from .storage import MemoryStorage, Storage, bootstrap_entries
from .types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    PeerProgress,
    ProgressState,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
    Status,
)

__all__ = [
    "CompactedError",
    "Config",
    "ConfigError",
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Entry",
    "EntryType",
    "HardState",
    "MemoryStorage",
    "Message",
    "MessageType",
    "PeerProgress",
    "ProgressState",
    "ProposalDropped",
    "RaftError",
    "RawNode",
    "ReadIndexDropped",
    "ReadState",
    "Ready",
    "RequestDropped",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "SnapshotOutOfDateError",
    "SnapshotTemporarilyUnavailableError",
    "SoftState",
    "Status",
    "Storage",
    "StorageError",
    "UnavailableError",
    "bootstrap_entries",
]
