"""Majority-quorum arithmetic over a set of voters (pure functions).

Learners never appear here: callers pass the voter set only, so a learner can
neither vote nor count towards a commit or a read-index quorum.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from enum import Enum


class VoteResult(Enum):
    """The outcome of an election tally so far."""

    PENDING = 0
    WON = 1
    LOST = 2


def majority(voters: Collection[int]) -> int:
    """How many voters make a quorum."""
    return len(voters) // 2 + 1


def committed_index(voters: Collection[int], match: Mapping[int, int]) -> int:
    """The highest index acknowledged by a quorum of voters (0 without voters)."""
    if not voters:
        return 0
    acked = sorted((match.get(v, 0) for v in voters), reverse=True)
    return acked[majority(voters) - 1]


def vote_result(voters: Collection[int], votes: Mapping[int, bool]) -> VoteResult:
    """WON once a quorum granted, LOST once a quorum can no longer be reached."""
    if not voters:
        return VoteResult.LOST
    granted = sum(1 for v in voters if votes.get(v) is True)
    missing = sum(1 for v in voters if v not in votes)
    if granted >= majority(voters):
        return VoteResult.WON
    if granted + missing >= majority(voters):
        return VoteResult.PENDING
    return VoteResult.LOST


def has_quorum(voters: Collection[int], members: Collection[int]) -> bool:
    """Whether `members` include a quorum of `voters`."""
    return bool(voters) and sum(1 for v in voters if v in members) >= majority(voters)


def quorum_age(voters: Collection[int], ages: Mapping[int, int]) -> int | None:
    """The smallest age such that a quorum of voters was heard from within it."""
    if not voters:
        return None
    known = sorted(ages[v] for v in voters if v in ages)
    if len(known) < majority(voters):
        return None
    return known[majority(voters) - 1]
