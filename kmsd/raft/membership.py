"""The applied membership: voters, learners, and ids known to be removed.

Changes take effect when the driver applies the committed CONF_CHANGE entry
(etcd's apply-time semantics). That is safe with single-server changes because
(1) a leader proposes a change only after it applied every earlier one and
committed an entry of its own term, and (2) a node does not campaign while its
log holds committed conf changes it has not applied yet (see core.Raft._hup).
Removed ids are remembered so their messages are refused: ids are never reused.
"""

from __future__ import annotations

from .types import ConfChange, ConfChangeType, ConfState


class Membership:
    """Mutable membership owned by the core."""

    def __init__(self, conf: ConfState) -> None:
        self.voters: set[int] = set(conf.voters)
        self.learners: set[int] = set(conf.learners)
        self.removed: set[int] = set()

    def conf_state(self) -> ConfState:
        return ConfState(frozenset(self.voters), frozenset(self.learners))

    def members(self) -> set[int]:
        return self.voters | self.learners

    def reset(self, conf: ConfState) -> None:
        """Adopts a snapshot's membership (removed ids stay remembered)."""
        self.voters = set(conf.voters)
        self.learners = set(conf.learners)

    def apply(self, change: ConfChange) -> ConfState:
        """Applies a committed change. Total: a change that does nothing is a no-op,
        so every node applying the same log ends with the same membership."""
        node = change.node_id
        if change.type == ConfChangeType.ADD_VOTER:
            self.learners.discard(node)
            self.voters.add(node)
        elif change.type == ConfChangeType.ADD_LEARNER:
            self.voters.discard(node)
            self.learners.add(node)
        else:
            self.voters.discard(node)
            self.learners.discard(node)
            self.removed.add(node)
        return self.conf_state()

    def refusal(self, change: ConfChange) -> str | None:
        """Why a leader must not propose `change` now, or None if it may."""
        node = change.node_id
        if node <= 0:
            return "node ids are positive"
        if node in self.removed:
            return f"node {node} was removed; ids are never reused"
        if change.type == ConfChangeType.ADD_VOTER and node in self.voters:
            return f"node {node} is already a voter"
        if change.type == ConfChangeType.ADD_LEARNER:
            if node in self.learners:
                return f"node {node} is already a learner"
            if node in self.voters:
                return f"node {node} is a voter; demotion is not supported"
        if change.type == ConfChangeType.REMOVE_NODE:
            if node not in self.members():
                return f"node {node} is not a member"
            if self.voters == {node}:
                return "cannot remove the last voter"
        return None
