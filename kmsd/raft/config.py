"""`Config`: a node's Raft parameters, validated when constructed."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class Config:
    """Parameters of one Raft node. Times are in ticks (the driver decides a tick's length).

    - election_tick: followers campaign after a random timeout in
      [election_tick, 2 * election_tick) without hearing from a leader; a leader with
      check_quorum steps down after election_tick ticks without a quorum.
      etcd suggests election_tick = 10 * heartbeat_tick.
    - heartbeat_tick: a leader sends heartbeats every heartbeat_tick ticks.
    - max_size_per_msg: byte budget of the entries in one APPEND (at least one entry).
    - max_inflight_msgs: unacknowledged APPENDs per follower in REPLICATE state.
    - max_committed_size_per_ready: byte budget of committed_entries in one Ready.
    - pre_vote / check_quorum: thesis §9.6 and the leader lease check; keep both on.
    - applied: the index the state machine already reflects on start. The driver
      restores its state machine from storage.snapshot(), so the core starts at
      max(applied, snapshot index) and hands out the committed entries after it.
    """

    id: int
    election_tick: int = 10
    heartbeat_tick: int = 1
    max_size_per_msg: int = 1 << 20
    max_inflight_msgs: int = 256
    pre_vote: bool = True
    check_quorum: bool = True
    applied: int = 0
    max_committed_size_per_ready: int = 1 << 22

    def __post_init__(self) -> None:
        if self.id <= 0:
            raise ConfigError("id must be a positive integer")
        if self.heartbeat_tick <= 0:
            raise ConfigError("heartbeat_tick must be positive")
        if self.election_tick <= self.heartbeat_tick:
            raise ConfigError("election_tick must be greater than heartbeat_tick")
        if self.max_size_per_msg <= 0:
            raise ConfigError("max_size_per_msg must be positive")
        if self.max_inflight_msgs <= 0:
            raise ConfigError("max_inflight_msgs must be positive")
        if self.max_committed_size_per_ready <= 0:
            raise ConfigError("max_committed_size_per_ready must be positive")
        if self.applied < 0:
            raise ConfigError("applied must not be negative")
