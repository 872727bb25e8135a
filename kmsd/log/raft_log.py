"""RaftLog: a `CommandLog` replicated by Raft; the asyncio driver of the pure Raft core.

One task owns the `RawNode` and runs etcd's Ready loop:

    1. persist the Ready's snapshot, entries and HardState, with one fdatasync for the
       whole batch, on the I/O thread (the event loop keeps serving meanwhile; what
       arrives during the fsync is batched into the next Ready: group commit);
    2. mirror them into the MemoryStorage the core reads;
    3. only then send the Ready's messages (a vote or an append acknowledgement never
       leaves before what it promises is on disk);
    4. apply the snapshot and committed entries to the state machine, resolve
       proposals and read requests;
    5. advance.

A command is proposed inside an envelope naming the node and a sequence number,
so the node that asked for it resolves its own waiter when it applies the entry,
whether it proposed it as leader or forwarded it to the leader. A proposal whose
leader changes before it commits fails with UnavailableError: it may or may not
commit later, which is why mutating requests carry a request_id.

Reads: `read_barrier` is ReadIndex (linearizable). With `allow_stale_s`, a node
whose applied state is provably at most that old answers from it at once: every
tick the node sends a read-index probe, and once it has applied the probe's index
its state is as new as the probe's send time (its own monotonic clock, so a pause
or a slow link only makes it older). Otherwise it goes through ReadIndex, which
fails when there is no quorum.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kms.raft.v1 import wal_pb2

from kmsd.errors import UnavailableError, ValidationError
from kmsd.log.base import Applied, StateMachine
from kmsd.log.raft_disk import Member, RaftDisk, founding_log
from kmsd.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    MemoryStorage,
    Message,
    ProposalDropped,
    RaftError,
    RawNode,
    Ready,
    Role,
    Status,
)
from kmsd.transport.base import Transport
from kmsd.transport.codec import conf_to_proto

log = logging.getLogger(__name__)

_ENVELOPE = struct.Struct(">BQQ")  # version, proposing node id, sequence number
_ENVELOPE_VERSION = 1


@dataclass(frozen=True)
class RaftSettings:
    """Timing and sizing of a Raft node. Ticks are `tick_seconds` long."""

    tick_seconds: float = 0.1
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    snapshot_every: int = 10_000
    # Entries kept behind a snapshot so a briefly lagging follower catches up from the
    # log rather than a whole snapshot.
    trailing_entries: int = 1_000
    request_timeout_s: float = 5.0
    # A learner is promoted once it is this close to the leader's last index.
    promote_within: int = 100
    # Proposals waiting for the core; beyond this the node sheds load.
    max_queued_proposals: int = 10_000


class RaftLog:
    """A replicated `CommandLog`; see the module docstring."""

    def __init__(
        self,
        node_id: int,
        data_dir: Path,
        state_machine: StateMachine,
        transport: Transport,
        *,
        founders: Sequence[Member] = (),
        known_members: Sequence[Member] = (),
        settings: RaftSettings | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.settings = settings or RaftSettings()
        self._sm = state_machine
        self._transport = transport
        self._founders = list(founders)
        # Where to reach peers before the log says: a joining node must answer the
        # leader before it has replayed the membership entries that name it.
        self._known = list(founders) + list(known_members)
        self._on_fatal = on_fatal
        self._rng = rng or random.Random()
        self._disk = RaftDisk(data_dir)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kmsd-raft-{node_id}")
        self._storage: MemoryStorage | None = None
        self._raw: RawNode | None = None
        self._members: dict[int, Member] = {}
        self._applied = 0
        self._snapshot_index = 0
        self._role = Role.FOLLOWER
        self._leader = 0
        self._term = 0
        self._wake = asyncio.Event()
        self._inbox: deque[Message] = deque()
        self._proposals: deque[tuple[bytes, asyncio.Future[int]]] = deque()
        self._conf_changes: deque[tuple[ConfChange, asyncio.Future[int]]] = deque()
        self._reads: deque[bytes] = deque()
        self._deferred_reads: list[bytes] = []
        self._read_waiters: dict[bytes, asyncio.Future[int]] = {}
        self._pending: dict[bytes, asyncio.Future[Applied]] = {}
        self._apply_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._stopping = False
        # Bounded staleness, measured on this node's own monotonic clock: a read-index
        # probe sent at time T whose index this node has applied proves the local state
        # is at least as new as T, whatever the link delay or a process pause was.
        self._probe: tuple[bytes, float] | None = None
        self._probe_index: tuple[int, float] | None = None
        self._fresh_as_of = float("-inf")

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        storage, fresh = await loop.run_in_executor(self._io, self._disk.open)
        if fresh and self._founders:
            entries, hard_state = founding_log(self._founders)
            await loop.run_in_executor(
                self._io, self._disk.persist, None, entries, hard_state, True
            )
            storage.append(entries)
            storage.set_hard_state(hard_state)
        self._storage = storage
        snapshot = storage.snapshot()
        if snapshot.meta.index > 0:
            # The snapshot's membership is authoritative (it may have removed founders).
            self._restore(snapshot.data, snapshot.meta.index)
        else:
            for member in self._known:
                self._members.setdefault(member.id, member)
        self._transport.set_members(self._members)
        self._raw = RawNode(
            Config(
                id=self.node_id,
                election_tick=self.settings.election_ticks,
                heartbeat_tick=self.settings.heartbeat_ticks,
                applied=self._applied,
            ),
            storage,
            self._rng,
        )
        self._term = self._raw.term
        self._transport.bind(self)
        await self._transport.start()
        self._task = asyncio.create_task(self._run(), name=f"raft-{self.node_id}")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._transport.stop()
        self._fail_all(UnavailableError("the node is stopping"))
        await asyncio.get_running_loop().run_in_executor(self._io, self._disk.close)
        self._io.shutdown(wait=True)

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    @property
    def tail_repair(self) -> object | None:
        """What start-up cut from a torn WAL tail, if anything."""
        return self._disk.tail_repair

    # -- CommandLog ---------------------------------------------------------------------

    def is_leader(self) -> bool:
        return self._role == Role.LEADER

    async def propose(self, command: bytes) -> Applied:
        self._check_running()
        self._seq += 1
        envelope = _ENVELOPE.pack(_ENVELOPE_VERSION, self.node_id, self._seq) + command
        key = envelope[: _ENVELOPE.size]
        done: asyncio.Future[Applied] = asyncio.get_running_loop().create_future()
        self._pending[key] = done
        try:
            if self.is_leader():
                await self._enqueue_proposal(envelope)
            elif self._leader:
                await self._transport.forward(
                    self._leader, envelope, self.settings.request_timeout_s
                )
            else:
                raise self._no_leader()
            return await asyncio.wait_for(done, self.settings.request_timeout_s)
        except TimeoutError:
            raise UnavailableError(
                "the command was not committed in time; it may still commit: retry with the"
                " same request_id"
            ) from None
        finally:
            self._pending.pop(key, None)

    async def read_barrier(self, allow_stale_s: float = 0.0) -> int:
        """See the module docstring."""
        self._check_running()
        if allow_stale_s > 0 and self.fresh_within(allow_stale_s):
            return self._applied
        context = self._rng.randbytes(16)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._read_waiters[context] = done
        self._reads.append(context)
        self._wake.set()
        try:
            index = await asyncio.wait_for(done, self.settings.request_timeout_s)
        except TimeoutError:
            raise self._no_leader() from None
        finally:
            self._read_waiters.pop(context, None)
        await self.wait_applied(index)
        return index

    async def wait_applied(self, index: int, timeout: float | None = None) -> None:
        """Returns once this node applied `index` (read-your-writes on any node)."""
        if self._applied >= index:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._apply_waiters.append((index, done))
        try:
            await asyncio.wait_for(done, timeout or self.settings.request_timeout_s)
        except TimeoutError:
            raise UnavailableError(
                f"this node has applied up to {self._applied}, not yet {index}"
            ) from None

    # -- cluster operations ---------------------------------------------------------------

    @property
    def leader_id(self) -> int:
        return self._leader

    @property
    def members(self) -> dict[int, Member]:
        return dict(self._members)

    @property
    def applied_index(self) -> int:
        return self._applied

    def status(self) -> Status:
        assert self._raw is not None
        return self._raw.status()

    def leader_address(self) -> str:
        member = self._members.get(self._leader)
        return member.client_address if member is not None else ""

    async def add_member(self, member: Member) -> int:
        """Adds `member` as a learner; the leader promotes it to voter once caught up."""
        change = ConfChange(ConfChangeType.ADD_LEARNER, member.id, member.encode())
        return await self._change_conf(change)

    async def remove_member(self, node_id: int) -> int:
        return await self._change_conf(ConfChange(ConfChangeType.REMOVE_NODE, node_id))

    def transfer_leadership(self, to: int) -> None:
        assert self._raw is not None
        if not self.is_leader():
            raise self._not_leader()
        self._raw.transfer_leader(to)
        self._wake.set()

    async def _change_conf(self, change: ConfChange) -> int:
        self._check_running()
        if not self.is_leader():
            raise self._not_leader()
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._conf_changes.append((change, done))
        self._wake.set()
        index = await asyncio.wait_for(done, self.settings.request_timeout_s)
        await self.wait_applied(index)
        return index

    # -- transport callbacks (PeerHandler) ----------------------------------------------

    def receive(self, message: Message) -> None:
        if self._stopping:
            return
        self._inbox.append(message)
        self._wake.set()

    async def accept_forwarded(self, envelope: bytes) -> int:
        self._check_running()
        if not self.is_leader():
            raise self._not_leader()
        return await self._enqueue_proposal(envelope)

    def report_unreachable(self, node_id: int) -> None:
        if self._raw is not None:
            self._raw.report_unreachable(node_id)

    def report_snapshot(self, node_id: int, ok: bool) -> None:
        if self._raw is not None:
            self._raw.report_snapshot(node_id, ok)
            self._wake.set()

    # -- the loop -------------------------------------------------------------------------

    async def _enqueue_proposal(self, envelope: bytes) -> int:
        if len(self._proposals) >= self.settings.max_queued_proposals:
            raise UnavailableError(
                "too many proposals queued; retry later", retry_after_seconds=0.5
            )
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._proposals.append((envelope, done))
        self._wake.set()
        return await done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        tick = self.settings.tick_seconds
        next_tick = loop.time() + tick
        try:
            while not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, next_tick - loop.time()))
                self._wake.clear()
                now = loop.time()
                if now >= next_tick:
                    self._tick()
                    # After a long stall, tick once rather than catch up in a burst.
                    next_tick = max(next_tick + tick, now + tick / 2)
                self._feed()
                assert self._raw is not None
                while self._raw.has_ready() and not self._stopping:
                    await self._handle_ready(self._raw.ready())
                    self._feed()
        except Exception as error:  # a persistence failure or a bug: stop, never ack
            self._fatal(error)

    def _tick(self) -> None:
        assert self._raw is not None
        self._raw.tick()
        if self._deferred_reads:
            self._reads.extend(self._deferred_reads)
            self._deferred_reads.clear()
        status = self._raw.status()
        self._probe_freshness()
        if status.role == Role.LEADER:
            self._maybe_promote(status)

    def _probe_freshness(self) -> None:
        """Starts a read-index probe unless one is under way (a lost one expires)."""
        assert self._raw is not None
        now = asyncio.get_running_loop().time()
        lost_after = 2 * self.settings.election_ticks * self.settings.tick_seconds
        if self._probe is not None and now - self._probe[1] < lost_after:
            return
        context = b"probe:" + self._rng.randbytes(8)
        try:
            self._raw.read_index(context)
        except RaftError:
            self._probe = None  # no leader known: stay unfresh until there is one
            return
        self._probe = (context, now)

    def _feed(self) -> None:
        """Hands queued inputs to the core."""
        raw = self._raw
        assert raw is not None
        while self._inbox:
            raw.step(self._inbox.popleft())
        if self._proposals:
            batch = list(self._proposals)
            self._proposals.clear()
            try:
                indexes = raw.propose_batch([envelope for envelope, _ in batch])
            except ProposalDropped as error:
                for _, done in batch:
                    _settle(done, exception=self._not_leader(str(error)))
            else:
                for (_, done), index in zip(batch, indexes, strict=True):
                    _settle(done, result=index)
        while self._conf_changes:
            change, done = self._conf_changes.popleft()
            try:
                _settle(done, result=raw.propose_conf_change(change))
            except RaftError as error:  # not leader, or another change is pending
                _settle(done, exception=UnavailableError(f"membership change refused: {error}"))
            except ValueError as error:  # e.g. a removed id, or the last voter
                _settle(done, exception=ValidationError("node_id", str(error)))
        deferred: list[bytes] = []
        while self._reads:
            context = self._reads.popleft()
            try:
                raw.read_index(context)
            except RaftError:
                # No leader yet (an election): wait for one, within the read's timeout,
                # rather than fail a read that a new leader answers in a second.
                waiter = self._read_waiters.get(context)
                if waiter is not None and not waiter.done():
                    deferred.append(context)
        self._deferred_reads.extend(deferred)

    async def _handle_ready(self, ready: Ready) -> None:
        loop = asyncio.get_running_loop()
        storage = self._storage
        raw = self._raw
        assert storage is not None and raw is not None
        await loop.run_in_executor(
            self._io,
            self._disk.persist,
            ready.snapshot,
            ready.entries,
            ready.hard_state,
            ready.must_sync,
        )
        if ready.snapshot is not None:
            storage.apply_snapshot(ready.snapshot)
        storage.append(ready.entries)
        if ready.hard_state is not None:
            storage.set_hard_state(ready.hard_state)
            self._term = ready.hard_state.term
        if ready.soft_state is not None:
            self._on_soft_state(ready.soft_state.leader, ready.soft_state.role)
        self._transport.send(ready.messages)
        if ready.snapshot is not None:
            self._restore(ready.snapshot.data, ready.snapshot.meta.index)
        for entry in ready.committed_entries:
            self._apply(entry)
        for read in ready.read_states:
            if self._probe is not None and read.context == self._probe[0]:
                self._probe_index = (read.index, self._probe[1])
                self._probe = None
                continue
            waiter = self._read_waiters.get(read.context)
            if waiter is not None:
                _settle(waiter, result=read.index)
        raw.advance(ready)
        self._wake_appliers()
        await self._maybe_snapshot()

    def _on_soft_state(self, leader: int, role: Role) -> None:
        if (leader, role) == (self._leader, self._role):
            return
        log.info("node %d: role %s, leader %d", self.node_id, role.name, leader)
        lost = self._leader != leader or (self._role == Role.LEADER and role != Role.LEADER)
        self._leader, self._role = leader, role
        if lost:
            # Proposals in flight under the old leader may or may not commit.
            error = UnavailableError(
                "leadership changed before the command committed; it may still commit:"
                " retry with the same request_id"
            )
            for done in self._pending.values():
                _settle(done, exception=error)
            # Reads are only delayed: ask the new leader (their timeout still bounds them).
            self._reads.extend(c for c, w in self._read_waiters.items() if not w.done())

    def _apply(self, entry: Entry) -> None:
        if entry.type == EntryType.NORMAL and len(entry.data) >= _ENVELOPE.size:
            key = entry.data[: _ENVELOPE.size]
            result = self._sm.apply(entry.index, entry.data[_ENVELOPE.size :])
            waiter = self._pending.get(key)
            if waiter is not None:
                _settle(waiter, result=Applied(entry.index, result))
        elif entry.type == EntryType.CONF_CHANGE:
            self._apply_conf_change(entry)
        self._applied = entry.index

    def _apply_conf_change(self, entry: Entry) -> None:
        assert self._raw is not None
        change = ConfChange.decode(entry.data)
        self._raw.apply_conf_change(change)
        if change.type == ConfChangeType.REMOVE_NODE:
            self._members.pop(change.node_id, None)
        elif change.context:
            self._members[change.node_id] = Member.decode(change.context)
        self._transport.set_members(self._members)
        log.info("node %d: applied %s of node %d", self.node_id, change.type.name, change.node_id)

    def _restore(self, data: bytes, index: int) -> None:
        cluster = wal_pb2.ClusterSnapshot.FromString(data)
        self._sm.restore(cluster.state)
        self._members = {m.id: Member.from_proto(m) for m in cluster.members}
        self._transport.set_members(self._members)
        self._applied = index
        self._snapshot_index = index

    def _wake_appliers(self) -> None:
        if self._probe_index is not None and self._applied >= self._probe_index[0]:
            self._fresh_as_of = max(self._fresh_as_of, self._probe_index[1])
            self._probe_index = None
        still: list[tuple[int, asyncio.Future[None]]] = []
        for index, done in self._apply_waiters:
            if self._applied >= index:
                _settle(done, result=None)
            elif not done.done():
                still.append((index, done))
        self._apply_waiters = still

    async def _maybe_snapshot(self) -> None:
        if self._applied - self._snapshot_index < self.settings.snapshot_every:
            return
        storage, raw = self._storage, self._raw
        assert storage is not None and raw is not None
        index = self._applied
        conf = raw.status().conf
        data = self._cluster_snapshot(conf)
        snapshot = storage.create_snapshot(index, conf, data)
        await asyncio.get_running_loop().run_in_executor(
            self._io, self._disk.save_snapshot, index, snapshot.meta.term, data
        )
        self._snapshot_index = index
        compact_to = index - self.settings.trailing_entries
        if compact_to >= storage.first_index():
            storage.compact(compact_to)
            await asyncio.get_running_loop().run_in_executor(
                self._io, self._disk.compact, compact_to
            )

    def _cluster_snapshot(self, conf: ConfState) -> bytes:
        return wal_pb2.ClusterSnapshot(
            state=self._sm.snapshot(),
            conf=conf_to_proto(conf),
            members=[
                wal_pb2.Member(
                    id=m.id, peer_address=m.peer_address, client_address=m.client_address
                )
                for m in sorted(self._members.values(), key=lambda m: m.id)
            ],
        ).SerializeToString()

    def _maybe_promote(self, status: Status) -> None:
        assert self._raw is not None and self._storage is not None
        last = self._storage.last_index()
        for node_id, progress in status.progress.items():
            if (
                progress.is_learner
                and progress.recent_active
                and progress.match > 0
                and last - progress.match <= self.settings.promote_within
            ):
                try:
                    self._raw.propose_conf_change(
                        ConfChange(
                            ConfChangeType.ADD_VOTER,
                            node_id,
                            self._members[node_id].encode() if node_id in self._members else b"",
                        )
                    )
                    log.info("node %d: promoting learner %d to voter", self.node_id, node_id)
                except RaftError:
                    pass  # another change is pending; try again on a later tick
                return

    # -- helpers ------------------------------------------------------------------------

    def fresh_within(self, seconds: float) -> bool:
        """True if this node's applied state is provably at most `seconds` old: it
        applied the read index of a probe it sent less than `seconds` ago."""
        return asyncio.get_running_loop().time() - self._fresh_as_of <= seconds

    def _check_running(self) -> None:
        if self._failure is not None:
            raise UnavailableError(f"log failed: {self._failure}")
        if self._stopping or self._task is None:
            raise UnavailableError("the node is not running")

    def _not_leader(self, why: str = "") -> UnavailableError:
        address = self.leader_address()
        return UnavailableError(
            f"node {self.node_id} is not the leader"
            + (f"; the leader is node {self._leader} at {address}" if address else "")
            + (f" ({why})" if why else ""),
            leader_address=address,
        )

    def _no_leader(self) -> UnavailableError:
        return UnavailableError(
            f"node {self.node_id} cannot reach a quorum (no known leader); retry later",
            retry_after_seconds=self.settings.tick_seconds * self.settings.election_ticks,
        )

    def _fail_all(self, error: BaseException) -> None:
        futures: list[asyncio.Future[Applied] | asyncio.Future[int] | asyncio.Future[None]] = [
            *self._pending.values(),
            *self._read_waiters.values(),
            *(done for _, done in self._proposals),
            *(done for _, done in self._conf_changes),
            *(done for _, done in self._apply_waiters),
        ]
        for future in futures:
            _settle(future, exception=error)

    def _fatal(self, error: BaseException) -> None:
        log.critical("node %d: Raft log failed, stopping: %s", self.node_id, error)
        self._failure = error
        self._stopping = True
        self._fail_all(UnavailableError(f"log failed: {error}"))
        if self._on_fatal is not None:
            self._on_fatal(error)


def _settle(
    future: asyncio.Future[object]
    | asyncio.Future[int]
    | asyncio.Future[Applied]
    | asyncio.Future[None],
    *,
    result: object = None,
    exception: BaseException | None = None,
) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)  # type: ignore[arg-type]
