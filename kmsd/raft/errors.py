"""The Raft core's exceptions (its own tree: `kmsd/raft` imports nothing from kmsd).

Storage errors mirror etcd's sentinel errors; the driver maps the request errors
to the service's error tree (e.g. ProposalDropped -> retry on the leader).
"""

from __future__ import annotations


class RaftError(Exception):
    """Base of every exception raised by `kmsd.raft`."""


class ConfigError(RaftError, ValueError):
    """A Config (or the persisted state it starts from) is invalid."""


class StorageError(RaftError):
    """Base of the errors a Storage raises."""


class CompactedError(StorageError):
    """The requested index is older than the first one kept: it was compacted away."""


class UnavailableError(StorageError):
    """The requested index is beyond the last one stored."""


class SnapshotOutOfDateError(StorageError):
    """The snapshot is not newer than the one already stored."""


class SnapshotTemporarilyUnavailableError(StorageError):
    """No snapshot can be produced right now; the leader retries later."""


class RequestDropped(RaftError):
    """A request was not accepted by this node; it may be retried (elsewhere or later)."""


class ProposalDropped(RequestDropped):
    """A proposal was refused: not the leader, transfer in progress, or a conf change
    is pending / not yet allowed in this term."""


class ReadIndexDropped(RequestDropped):
    """A read-index request was refused because no leader is known."""
