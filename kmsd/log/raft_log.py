"""RaftLog: a `CommandLog` replicated by Raft; the asyncio driver of the pure Raft core.

One task owns the `RawNode` and runs etcd's Ready loop:

    1. persist the Ready's snapshot, entries and HardState with one fdatasync for the
       whole batch. A leader does it on the I/O thread, so the event loop keeps serving
       meanwhile (what arrives during the fsync is batched into the next Ready: group
       commit); any other node does it inline, saving two thread hand-offs, because it
       has nothing to overlap with its fsync. A commit-only HardState (`must_sync`
       False) costs no I/O of its own: it is written, unsynced, with the next batch
       (the commit index is recoverable from the cluster; etcd does the same);
    2. mirror them into the MemoryStorage the core reads;
    3. send the Ready's messages: only now, after the fsync (a vote or an append
       acknowledgement never leaves before what it promises is on disk), unless the
       core marked the batch `early_send_ok` (a leader's APPENDs, thesis §10.2.1: the
       core counts the leader's own entries only once `advance` says they are on its
       disk), or the Ready had nothing to make durable; those leave before the fsync,
       so the followers' fsyncs overlap the leader's;
    4. apply the snapshot and committed entries to the state machine, resolve
       proposals and read requests;
    5. advance.

A command is proposed inside an envelope naming the node and a sequence number
(counted from a random start in each process, so a restarted node never mistakes an
entry of its previous life for a new proposal), so the node that asked for it
resolves its own waiter when it applies the entry,
whether it proposed it as leader or forwarded it to the leader. While no leader is
known (an election), or the leader it forwarded to turns out dead or deposed, a
proposal waits for the next leader within its timeout rather than fail: a client
then sees a slower write, not an error and a backoff. A proposal whose leader changes
after it reached one fails with UnavailableError: it may or may not commit later,
which is why mutating requests carry a request_id.

Reads: `read_barrier` is ReadIndex (linearizable). With `allow_stale_s`, a node
whose applied state is provably at most that old answers from it at once. The
proof: a read index obtained for a request sent at time T (its own monotonic clock,
so a pause or a slow link only makes it older), once applied, shows the state is as
new as T. Every ReadIndex counts; while bounded-staleness reads keep coming
(`fresh_within` is asked) the node also sends a read-index probe whenever its proof
is half the asked bound old, and stops probing once they stop (an idle cluster then
exchanges only heartbeats). Otherwise a read goes through ReadIndex, which fails
when there is no quorum.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from kms.raft.v1 import wal_pb2

from kmsd.errors import UnavailableError, ValidationError
from kmsd.log.base import (
    Applied,
    BeforeCompaction,
    SnapshotPolicy,
    StateMachine,
    collect_politely,
)
from kmsd.log.raft_disk import Member, RaftDisk, cluster_snapshot, founding_log
from kmsd.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    EntryType,
    HardState,
    MemoryStorage,
    Message,
    ProposalDropped,
    RaftError,
    RawNode,
    Ready,
    Role,
    Status,
)
from kmsd.transport.base import LeaderUnreachable, Overloaded, Transport

log = logging.getLogger(__name__)

_ENVELOPE = struct.Struct(">BQQ")  # version, proposing node id, sequence number
_ENVELOPE_VERSION = 1
# How many applied membership changes keep their outcome for the proposer to read.
_CONF_OUTCOMES_KEPT = 64


@dataclass(frozen=True)
class RaftSettings:
    """Timing and sizing of a Raft node. Ticks are `tick_seconds` long."""

    tick_seconds: float = 0.05
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
    # Freshness probes stop this long after the last bounded-staleness read.
    probe_idle_s: float = 5.0
    # Group commit on the leader: see RaftLog._hold_proposals. 0 turns it off.
    proposal_wait_s: float = 0.004
    max_batch_proposals: int = 512


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
        before_compaction: BeforeCompaction | None = None,
    ) -> None:
        """`before_compaction` runs before a snapshot, the node's own or one installed
        from the leader, replaces applied entries (see `kmsd.log.base`)."""
        self._before_compaction = before_compaction
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
        # Snapshots are encoded and written here, while the Ready loop goes on.
        self._snap_io = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"kmsd-raft-{node_id}-snap"
        )
        self._snapshot_task: asyncio.Task[None] | None = None
        self._snapshot_written: _OwnSnapshot | None = None
        self._storage: MemoryStorage | None = None
        self._raw: RawNode | None = None
        self._members: dict[int, Member] = {}
        self._applied = 0
        self._snapshot_index = 0
        self._snapshots = SnapshotPolicy(self.settings.snapshot_every)
        self._role = Role.FOLLOWER
        self._leader = 0
        self._wake = asyncio.Event()
        self._tick_due = False
        self._next_tick = 0.0
        self._tick_timer: asyncio.TimerHandle | None = None
        self._inbox: deque[Message] = deque()
        self._proposals: deque[tuple[bytes, asyncio.Future[int]]] = deque()
        self._conf_changes: deque[tuple[ConfChange, asyncio.Future[int]]] = deque()
        # Applied CONF_CHANGE entries by index: their data, and why the change was
        # skipped (None if it took effect); see _change_conf.
        self._conf_outcomes: dict[int, tuple[bytes, str | None]] = {}
        self._reads: deque[bytes] = deque()
        self._deferred_reads: list[bytes] = []
        # A read's waiter and when it was asked (its answer proves freshness as of then).
        self._read_waiters: dict[bytes, tuple[asyncio.Future[int], float]] = {}
        self._pending: dict[bytes, asyncio.Future[Applied]] = {}
        # Proposals not yet handed to a leader (waiting for one): a leader change must
        # not fail them, it is what they wait for.
        self._unsubmitted: set[bytes] = set()
        self._leader_waiters: list[asyncio.Future[None]] = []
        self._waiting_followers: set[int] = set()  # see _apply
        self._last_proposed = 0  # the last index this node proposed as leader
        self._held_since: float | None = None  # see _hold_proposals
        self._apply_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # A commit-only HardState not written yet; it goes out with the next write.
        self._unsaved_hard_state: HardState | None = None
        # Each life of a node numbers its proposals from a random start: after a restart
        # the node still applies entries its previous life proposed, and a sequence
        # restarting at 1 would match them to its new proposals (wrong results).
        self._seq = int.from_bytes(os.urandom(8)) >> 2
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._stopping = False
        # Bounded staleness, measured on this node's own monotonic clock: a read index
        # asked for at time T, once this node has applied it, proves the local state is
        # at least as new as T, whatever the link delay or a process pause was.
        self._probe: tuple[bytes, float] | None = None
        self._fresh_as_of = float("-inf")
        self._fresh_pending: list[tuple[int, float]] = []  # (read index, asked at)
        self._probe_until = float("-inf")  # probe while bounded-staleness reads come
        self._probe_every = 0.0

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
        self._transport.bind(self)
        await self._transport.start()
        self._task = asyncio.create_task(self._run(), name=f"raft-{self.node_id}")

    async def stop(self) -> None:
        if self._task is not None and not self._stopping and self.is_leader():
            await self._hand_over_leadership()
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._snapshot_task is not None:
            # Its file is complete or not there; unrecorded, it is still found on start.
            await asyncio.gather(self._snapshot_task, return_exceptions=True)
        self._snap_io.shutdown(wait=True)
        await self._transport.stop()
        self._fail_all(UnavailableError("the node is stopping"))
        loop = asyncio.get_running_loop()
        if self._unsaved_hard_state is not None and self._failure is None:
            await loop.run_in_executor(
                self._io, self._disk.persist, None, [], self._unsaved_hard_state, False
            )
            self._unsaved_hard_state = None
        await loop.run_in_executor(self._io, self._disk.close)
        self._io.shutdown(wait=True)

    async def _hand_over_leadership(self) -> None:
        """A leader that stops hands its leadership to the most up-to-date active voter
        first (bounded by an election timeout), so the cluster does not wait out an
        election: a rolling restart then costs a round trip, not a second."""
        assert self._raw is not None
        status = self._raw.status()
        candidates = [
            (progress.match, node_id)
            for node_id, progress in status.progress.items()
            if node_id != self.node_id and node_id in status.conf.voters and progress.recent_active
        ]
        if not candidates:
            return
        _, target = max(candidates)
        log.info("node %d: stopping; handing leadership to node %d", self.node_id, target)
        try:
            self._raw.transfer_leader(target)
        except (RaftError, ValueError):
            return
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.election_ticks * self.settings.tick_seconds
        # Done once another node leads (not merely once this one stepped down), so
        # that the cluster never waits out an election for this stop.
        if not await self._leader_changed_before(deadline, self.node_id):
            log.info("node %d: leadership transfer to %d timed out", self.node_id, target)

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
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Applied] = loop.create_future()
        deadline = loop.time() + self.settings.request_timeout_s
        self._pending[key] = done
        self._unsubmitted.add(key)
        try:
            await self._submit(envelope, deadline)
            self._unsubmitted.discard(key)
            # asyncio.timeout rather than wait_for: no extra task per write.
            async with asyncio.timeout_at(deadline):
                return await done
        except TimeoutError:
            if key in self._unsubmitted:
                raise self._no_leader() from None
            raise UnavailableError(
                "the command was not committed in time; it may still commit: retry with the"
                " same request_id"
            ) from None
        finally:
            self._pending.pop(key, None)
            self._unsubmitted.discard(key)

    async def _submit(self, envelope: bytes, deadline: float) -> None:
        """Hands `envelope` to a leader: proposes it here if this node leads, forwards it
        otherwise. Waits (until `deadline`) for a leader while there is none, or when
        the one it tried is gone or deposed."""
        loop = asyncio.get_running_loop()
        while True:
            self._check_running()
            leader = self._leader
            try:
                if self.is_leader():
                    await self._enqueue_proposal(envelope)
                    return
                if leader:
                    timeout = max(0.0, deadline - loop.time())
                    await self._transport.forward(leader, envelope, timeout)
                    return
            except LeaderUnreachable:
                if self._leader != leader:
                    continue  # it already changed: try the new one at once
            # Look again after an election timeout even without a change (an abandoned
            # leadership transfer, a link that came back).
            retry_at = loop.time() + self.settings.election_ticks * self.settings.tick_seconds
            await self._leader_changed_before(min(deadline, retry_at), leader)
            if loop.time() >= deadline:
                raise self._no_leader()

    async def _leader_changed_before(self, deadline: float, old: int | None = None) -> bool:
        """Waits until a leader other than `old` is known (with `old` None: until the
        leader changes at all); False if `deadline` passed first."""
        loop = asyncio.get_running_loop()
        while old is None or self._leader in (old, 0):
            waiter: asyncio.Future[None] = loop.create_future()
            self._leader_waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                return False
            finally:
                if waiter in self._leader_waiters:
                    self._leader_waiters.remove(waiter)
            self._check_running()
            if old is None:
                return True
        return True

    async def read_barrier(self, allow_stale_s: float = 0.0) -> int:
        """See the module docstring."""
        self._check_running()
        if allow_stale_s > 0 and self.fresh_within(allow_stale_s):
            return self._applied
        loop = asyncio.get_running_loop()
        context = self._rng.randbytes(16)
        done: asyncio.Future[int] = loop.create_future()
        self._read_waiters[context] = (done, loop.time())
        self._reads.append(context)
        self._wake.set()
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                index = await done
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
            async with asyncio.timeout(timeout or self.settings.request_timeout_s):
                await done
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

    @property
    def snapshot_index(self) -> int:
        """The index of this node's latest snapshot (0: none yet)."""
        return self._snapshot_index

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
        """Proposes `change` and returns its index once applied here. ValidationError
        (naming node_id) if this node's applied membership refuses it (checked on any
        node, before anything is proposed), if the leader's core refuses it, or if it
        committed but was skipped when applied (an invalid change that slipped through:
        every node skips it)."""
        self._check_running()
        assert self._raw is not None
        refusal = self._raw.conf_change_refusal(change)
        if refusal is not None:
            raise ValidationError("node_id", refusal)
        if not self.is_leader():
            raise self._not_leader()
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._conf_changes.append((change, done))
        self._wake.set()
        index = await asyncio.wait_for(done, self.settings.request_timeout_s)
        await self.wait_applied(index)
        outcome = self._conf_outcomes.get(index)
        if outcome is None:
            raise UnavailableError(
                f"the membership change at index {index} was overtaken by a leader change;"
                " check `kmsctl cluster status` before retrying"
            )
        data, skipped = outcome
        if data != change.encode():
            raise UnavailableError(
                "leadership changed before the membership change committed; it did not"
                " take effect: retry"
            )
        if skipped is not None:
            raise ValidationError("node_id", f"the change committed but was skipped: {skipped}")
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
            raise Overloaded("too many proposals queued; retry later", retry_after_seconds=0.5)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._proposals.append((envelope, done))
        self._wake.set()
        return await done

    def _on_tick_timer(self) -> None:
        # A timer, not a timeout on the wake-up wait: the loop then waits on one event
        # without setting up a timeout per wake-up. After a long stall it ticks once
        # rather than catch up in a burst.
        loop = asyncio.get_running_loop()
        tick = self.settings.tick_seconds
        self._next_tick = max(self._next_tick + tick, loop.time() + tick / 2)
        self._tick_timer = loop.call_at(self._next_tick, self._on_tick_timer)
        self._tick_due = True
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._next_tick = loop.time() + self.settings.tick_seconds
        self._tick_timer = loop.call_at(self._next_tick, self._on_tick_timer)
        raw = self._raw
        assert raw is not None
        wake = self._wake
        try:
            while not self._stopping:
                await wake.wait()
                wake.clear()
                self._take_inputs()
                while raw.has_ready() and not self._stopping:
                    await self._handle_ready(raw.ready())
                    self._take_inputs()
                if not self._stopping:
                    await self._maybe_snapshot()  # records a snapshot written meanwhile
        except Exception as error:  # a persistence failure or a bug: stop, never ack
            self._fatal(error)
        finally:
            if self._tick_timer is not None:
                self._tick_timer.cancel()

    def _take_inputs(self) -> None:
        # Ticks are taken here too, between Readies: under steady load the loop may
        # never go back to waiting, and a node that stops ticking stops heartbeating.
        if self._tick_due:
            self._tick_due = False
            self._tick()
        self._feed()

    def _tick(self) -> None:
        assert self._raw is not None
        self._raw.tick()
        if self._deferred_reads:
            self._reads.extend(self._deferred_reads)
            self._deferred_reads.clear()
        now = asyncio.get_running_loop().time()
        if now < self._probe_until and now - self._fresh_as_of >= self._probe_every:
            self._probe_freshness(now)
        if self._role == Role.LEADER:
            self._maybe_promote(self._raw.status())

    def _probe_freshness(self, now: float) -> None:
        """Starts a read-index probe unless one is under way (a lost one expires)."""
        assert self._raw is not None
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

    def _hold_proposals(self) -> bool:
        """Whether new proposals should wait for the batch in flight (group commit).

        Every batch costs the leader a Ready, an fsync, a write to each follower and
        the handling of their acks, whatever its size, and that fixed cost is most of
        the leader's Raft work per write. So while a batch is being replicated,
        proposals that arrive wait, at most `proposal_wait_s`, until it is applied,
        then go as one batch. A lone write never waits: nothing is in flight."""
        wait = self.settings.proposal_wait_s
        if (
            wait <= 0
            or self._last_proposed <= self._applied
            or len(self._proposals) >= self.settings.max_batch_proposals
        ):
            return False
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._held_since is None:
            self._held_since = now
            loop.call_at(now + wait, self._wake.set)
        return now < self._held_since + wait

    def _feed(self) -> None:
        """Hands queued inputs to the core."""
        raw = self._raw
        assert raw is not None
        inbox = self._inbox
        while inbox:
            raw.step(inbox.popleft())
        if self._proposals and not self._hold_proposals():
            batch = list(self._proposals)
            self._proposals.clear()
            self._held_since = None
            try:
                indexes = raw.propose_batch([envelope for envelope, _ in batch])
            except ProposalDropped as error:
                for _, done in batch:
                    _settle(done, exception=self._not_leader(str(error)))
            else:
                for (_, done), index in zip(batch, indexes, strict=True):
                    _settle(done, result=index)
                self._last_proposed = indexes[-1]
        while self._conf_changes:
            change, done = self._conf_changes.popleft()
            try:
                _settle(done, result=raw.propose_conf_change(change))
            except RaftError as error:  # not leader, or another change is pending
                _settle(done, exception=UnavailableError(f"membership change refused: {error}"))
            except ValueError as error:  # e.g. a removed id, or the last voter
                _settle(done, exception=ValidationError("node_id", str(error)))
                log.info(
                    "node %d: refused %s of node %d: %s",
                    self.node_id,
                    change.type.name,
                    change.node_id,
                    error,
                )
        deferred: list[bytes] = []
        while self._reads:
            context = self._reads.popleft()
            try:
                raw.read_index(context)
            except RaftError:
                # No leader yet (an election): wait for one, within the read's timeout,
                # rather than fail a read that a new leader answers in a second.
                waiting = self._read_waiters.get(context)
                if waiting is not None and not waiting[0].done():
                    deferred.append(context)
        self._deferred_reads.extend(deferred)

    async def _handle_ready(self, ready: Ready) -> None:
        storage = self._storage
        raw = self._raw
        assert storage is not None and raw is not None
        if ready.snapshot is not None and self._before_compaction is not None:
            # The leader's snapshot replaces this node's log: what is still to be
            # derived from its applied entries must be durable first (else fatal).
            self._before_compaction()
        # must_sync covers entries, a snapshot and a term or vote change; what is left
        # (a moved commit index) needs no write of its own.
        durable = ready.must_sync or ready.snapshot is not None or bool(ready.entries)
        send_first = bool(ready.messages) and (ready.early_send_ok or not durable)
        if send_first:
            self._transport.send(ready.messages)
            if durable:
                # Let the peer tasks start their writes before the I/O thread, which
                # needs the GIL to frame the records, competes with them.
                await asyncio.sleep(0)
        if durable:
            hard_state = ready.hard_state or self._unsaved_hard_state
            self._unsaved_hard_state = None
            role = ready.soft_state.role if ready.soft_state is not None else self._role
            if role == Role.LEADER:
                await asyncio.get_running_loop().run_in_executor(
                    self._io,
                    self._disk.persist,
                    ready.snapshot,
                    ready.entries,
                    hard_state,
                    True,
                )
            else:
                self._disk.persist(ready.snapshot, ready.entries, hard_state, True)
        elif ready.hard_state is not None:
            self._unsaved_hard_state = ready.hard_state
        if ready.snapshot is not None:
            storage.apply_snapshot(ready.snapshot)
        if ready.entries:
            storage.append(ready.entries)
        if ready.hard_state is not None:
            storage.set_hard_state(ready.hard_state)
        if ready.soft_state is not None:
            self._on_soft_state(ready.soft_state.leader, ready.soft_state.role)
        if ready.messages and not send_first:
            self._transport.send(ready.messages)
            if ready.committed_entries:
                # Let the peer tasks write (a follower's ack is what the leader waits
                # for) before applying, which takes the event loop for a while.
                await asyncio.sleep(0)
        if ready.snapshot is not None:
            self._restore(ready.snapshot.data, ready.snapshot.meta.index)
        for entry in ready.committed_entries:
            self._apply(entry)
        if self._waiting_followers:
            for node_id in self._waiting_followers:
                self._transport.hurry(node_id)
            self._waiting_followers.clear()
        for read in ready.read_states:
            self._on_read_state(read.index, read.context)
        raw.advance(ready)
        self._wake_appliers()
        await self._maybe_snapshot()

    def _on_read_state(self, index: int, context: bytes) -> None:
        if self._probe is not None and context == self._probe[0]:
            self._fresh_pending.append((index, self._probe[1]))
            self._probe = None
            return
        waiting = self._read_waiters.get(context)
        if waiting is not None:
            done, asked_at = waiting
            _settle(done, result=index)
            self._fresh_pending.append((index, asked_at))

    def _on_soft_state(self, leader: int, role: Role) -> None:
        if (leader, role) == (self._leader, self._role):
            return
        log.info("node %d: role %s, leader %d", self.node_id, role.name, leader)
        lost = self._leader != leader or (self._role == Role.LEADER and role != Role.LEADER)
        self._leader, self._role = leader, role
        self._last_proposed = 0  # a new role: nothing of ours is in flight any more
        if lost:
            # Proposals in flight under the old leader may or may not commit; those
            # still waiting for a leader are not in flight anywhere.
            error = UnavailableError(
                "leadership changed before the command committed; it may still commit:"
                " retry with the same request_id"
            )
            for key, done in self._pending.items():
                if key not in self._unsubmitted:
                    _settle(done, exception=error)
            # Reads are only delayed: ask the new leader (their timeout still bounds them).
            self._reads.extend(c for c, (w, _) in self._read_waiters.items() if not w.done())
        waiters, self._leader_waiters = self._leader_waiters, []
        for waiter in waiters:
            _settle(waiter, result=None)

    def _apply(self, entry: Entry) -> None:
        if entry.type == EntryType.NORMAL and len(entry.data) >= _ENVELOPE.size:
            key = entry.data[: _ENVELOPE.size]
            result = self._sm.apply(entry.index, entry.data[_ENVELOPE.size :])
            self._snapshots.applied(len(entry.data))
            waiter = self._pending.get(key)
            if waiter is not None:
                _settle(waiter, result=Applied(entry.index, result))
            elif self._role == Role.LEADER:
                # A follower's forwarded proposal: that follower answers its client once
                # it applies the entry, so it must hear of the commit without delay.
                proposer = _ENVELOPE.unpack_from(entry.data)[1]
                if proposer != self.node_id:
                    self._waiting_followers.add(proposer)
        elif entry.type == EntryType.CONF_CHANGE:
            self._apply_conf_change(entry)
        self._applied = entry.index

    def _apply_conf_change(self, entry: Entry) -> None:
        assert self._raw is not None
        change = ConfChange.decode(entry.data)
        # Deterministic: the refusal depends only on the applied membership, the same
        # on every node at this index; the core skips a refused change likewise.
        skipped = self._raw.conf_change_refusal(change)
        self._raw.apply_conf_change(change)
        self._conf_outcomes[entry.index] = (entry.data, skipped)
        while len(self._conf_outcomes) > _CONF_OUTCOMES_KEPT:
            del self._conf_outcomes[next(iter(self._conf_outcomes))]
        if skipped is not None:
            log.warning(
                "node %d: skipped %s of node %d at index %d: %s",
                self.node_id,
                change.type.name,
                change.node_id,
                entry.index,
                skipped,
            )
            return
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
        self._snapshots.taken(len(data))

    def _wake_appliers(self) -> None:
        if self._fresh_pending:
            still_pending: list[tuple[int, float]] = []
            for index, asked_at in self._fresh_pending:
                if self._applied >= index:
                    self._fresh_as_of = max(self._fresh_as_of, asked_at)
                else:
                    still_pending.append((index, asked_at))
            # Bounded: with nothing applied for a while (no leader), reads keep coming.
            self._fresh_pending = still_pending[-64:]
        if not self._apply_waiters:
            return
        still: list[tuple[int, asyncio.Future[None]]] = []
        for index, done in self._apply_waiters:
            if self._applied >= index:
                _settle(done, result=None)
            elif not done.done():
                still.append((index, done))
        self._apply_waiters = still

    async def _maybe_snapshot(self) -> None:
        """Records a snapshot written meanwhile, and starts the next one when due.

        A snapshot is frozen here, between applies (so it is exactly the state at the
        applied index), then encoded and its file written on the snapshot thread while
        the Ready loop goes on: the loop only pays for freezing, and later for
        recording the snapshot (a WAL marker and the compaction, on the I/O thread that
        owns the WAL)."""
        if self._snapshot_written is not None:
            await self._record_snapshot()
        if self._snapshot_task is not None or not self._snapshots.due(
            self._applied - self._snapshot_index
        ):
            return
        if not self._snapshots.settled(self._before_compaction):
            return
        storage, raw = self._storage, self._raw
        assert storage is not None and raw is not None
        index = self._applied
        frozen = _OwnSnapshot(index, storage.term(index), raw.status().conf, b"")
        members = list(self._members.values())
        started = time.monotonic()
        state = self._sm.freeze()
        frozen_in = time.monotonic() - started
        self._snapshots.started()
        self._snapshot_task = asyncio.create_task(
            self._write_snapshot(frozen, members, state, frozen_in),
            name=f"raft-{self.node_id}-snapshot",
        )

    async def _write_snapshot(
        self,
        frozen: _OwnSnapshot,
        members: list[Member],
        state: Iterator[bytes],
        frozen_in: float,
    ) -> None:
        started = time.monotonic()

        def encode_and_write() -> bytes:
            data = cluster_snapshot(collect_politely(state), frozen.conf, members)
            self._disk.write_snapshot(frozen.index, frozen.term, data)
            return data

        try:
            data = await asyncio.get_running_loop().run_in_executor(self._snap_io, encode_and_write)
        except Exception as error:  # a snapshot that cannot be written: fail-stop
            self._fatal(error)
            return
        finally:
            self._snapshot_task = None
        self._snapshots.finished(len(data))
        log.info(
            "node %d: snapshot at index %d: %.1f MB, frozen in %.1f ms, encoded and written"
            " in %.0f ms",
            self.node_id,
            frozen.index,
            len(data) / 1e6,
            frozen_in * 1e3,
            (time.monotonic() - started) * 1e3,
        )
        self._snapshot_written = replace(frozen, data=data)
        self._wake.set()  # record it even if nothing else happens

    async def _record_snapshot(self) -> None:
        written, self._snapshot_written = self._snapshot_written, None
        storage = self._storage
        assert written is not None and storage is not None
        if written.index <= storage.snapshot().meta.index:
            log.info(
                "node %d: own snapshot at %d superseded by the leader's at %d",
                self.node_id,
                written.index,
                storage.snapshot().meta.index,
            )
            return
        snapshot = storage.create_snapshot(written.index, written.conf, written.data)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._io, self._disk.mark_snapshot, written.index, snapshot.meta.term
        )
        self._snapshot_index = written.index
        compact_to = written.index - self.settings.trailing_entries
        if compact_to >= storage.first_index():
            storage.compact(compact_to)
            await loop.run_in_executor(self._io, self._disk.compact, compact_to)

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
                except ValueError as error:  # invalid for the membership: never crash
                    log.warning("node %d: not promoting %d: %s", self.node_id, node_id, error)
                return

    # -- helpers ------------------------------------------------------------------------

    def fresh_within(self, seconds: float) -> bool:
        """True if this node's applied state is provably at most `seconds` old: it
        applied the read index of a request it made less than `seconds` ago.

        Being asked is what keeps the probes going (see the module docstring): one
        starts on a tick once the proof is `seconds / 2` old, so it is renewed well
        before it lapses while reads keep coming."""
        now = asyncio.get_running_loop().time()
        self._probe_until = now + self.settings.probe_idle_s
        self._probe_every = seconds / 2
        return now - self._fresh_as_of <= seconds

    def _check_running(self) -> None:
        if self._failure is not None:
            raise UnavailableError(f"log failed: {self._failure}")
        if self._stopping or self._task is None:
            raise UnavailableError("the node is not running")

    def _not_leader(self, why: str = "") -> UnavailableError:
        address = self.leader_address()
        # LeaderUnreachable: a follower that forwarded here waits for the next leader.
        return LeaderUnreachable(
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
            *(done for done, _ in self._read_waiters.values()),
            *self._leader_waiters,
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
        self._wake.set()
        self._fail_all(UnavailableError(f"log failed: {error}"))
        if self._on_fatal is not None:
            self._on_fatal(error)


@dataclass(frozen=True)
class _OwnSnapshot:
    """A snapshot of this node's state at applied `index` (`data` empty until encoded)."""

    index: int
    term: int
    conf: ConfState
    data: bytes


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
