"""The applied membership: voters, learners, and ids known to be removed.

Changes take effect when the driver applies the committed CONF_CHANGE entry
(etcd's apply-time semantics). That is safe with single-server changes because
(1) a leader proposes a change only after it applied every earlier one and
committed an entry of its own term, and (2) a node does not campaign while its
log holds committed conf changes it has not applied yet (see core.Raft._hup).
Removed ids are remembered so their messages are refused: ids are never reused.
They are part of the ConfState, so snapshots carry them and a node restarted from
(or installing) a snapshot still refuses them.

Applying is deterministic and never fails: a committed change that the applied
membership refuses (`refusal`: e.g. re-adding a removed id) is skipped, identically
on every node, since every node applies the same log to the same membership. The
rules above make every change a leader proposes pass that check when applied; the
skip guards against anything that slipped through (a leader that had forgotten a
removal, a change proposed by an older version).
"""

from __future__ import annotations

from .types import ConfChange, ConfChangeType, ConfState


class Membership:
    """Mutable membership owned by the core."""

    def __init__(self, conf: ConfState) -> None:
        self.voters: set[int] = set(conf.voters)
        self.learners: set[int] = set(conf.learners)
        self.removed: set[int] = set(conf.removed) - self.voters - self.learners

    def conf_state(self) -> ConfState:
        return ConfState(frozenset(self.voters), frozenset(self.learners), frozenset(self.removed))

    def members(self) -> set[int]:
        return self.voters | self.learners

    def reset(self, conf: ConfState) -> None:
        """Adopts a snapshot's membership. Removed ids add up: the ones this node
        knew stay remembered (a snapshot from before removed ids were recorded has
        none), unless the snapshot names them as members (it is authoritative)."""
        self.voters = set(conf.voters)
        self.learners = set(conf.learners)
        self.removed = (self.removed | conf.removed) - self.voters - self.learners

    def apply(self, change: ConfChange) -> ConfState:
        """Applies a committed change; a change `refusal` refuses is skipped (a no-op),
        so every node applying the same log ends with the same membership."""
        if self.refusal(change) is not None:
            return self.conf_state()
        node = change.node_id
        if change.type == ConfChangeType.ADD_VOTER:
            self.learners.discard(node)
            self.voters.add(node)
        elif change.type == ConfChangeType.ADD_LEARNER:
            self.learners.add(node)
        else:
            self.voters.discard(node)
            self.learners.discard(node)
            self.removed.add(node)
        return self.conf_state()

    def refusal(self, change: ConfChange) -> str | None:
        """Why a leader must not propose `change` now, or None if it may. Also why a
        committed `change` is skipped when applied (see the module docstring)."""
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
