"""A linearizability checker: Wing & Gong's search, Lowe's memoization, Porcupine's
P-compositionality (docs/checking.md; reference/replication.md §3.2).

A history is linearizable if every operation can be given a point in time, between
its call and its return, such that applying the operations one at a time in that
order to the sequential model yields exactly the outputs the clients saw.

The search walks a doubly linked list of call and return events sorted by time. At a
call it tries to linearize that operation next (the model must accept its output); if
it can, it "lifts" the call and its return out of the list and starts again from the
front. Reaching a return means an operation that must already have taken effect has
not, so the search backtracks to the last choice. A set of (linearized operations,
model state) pairs already explored prunes orders that reach the same configuration.
The history is first split by the model's `partition`, since linearizability is
local: the whole is linearizable exactly when every per-key part is.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from kmsd.checker.history import UNKNOWN, Operation
from kmsd.checker.models import DROP, Model

S = TypeVar("S", bound=Hashable)

# How many search steps pass between two looks at the clock.
_CLOCK_EVERY = 1024
# How many operations of the prefix an explanation shows.
_SHOWN_PREFIX = 8
# How many concurrent alternatives an explanation lists.
_SHOWN_OTHERS = 12


@dataclass(frozen=True)
class PartitionResult:
    """The verdict on one partition (one key) of the history.

    When `ok` is True, `linearization` is a witness order of every operation. When it
    is False, `linearization` is the longest linearizable prefix the search found,
    `state` is the model state after it, and `blocking` is the operation whose return
    was reached without any legal place for it. When None, the time budget ran out.
    """

    key: Hashable | None
    ok: bool | None
    operations: tuple[Operation, ...]
    linearization: tuple[Operation, ...]
    state: object
    blocking: Operation | None
    explanation: str
    explored: int


@dataclass(frozen=True)
class CheckResult:
    """The verdict on a whole history.

    `ok` is True (linearizable), False (not: see `counterexamples`), or None (the time
    budget ran out before a verdict; no violation was found in the partitions
    checked). `dropped` lists the operations that constrain nothing and were removed
    before the search: definite failures, indeterminate reads, and operations the
    model placed in no partition (an indeterminate create).
    """

    ok: bool | None
    partitions: tuple[PartitionResult, ...]
    dropped: tuple[Operation, ...]
    elapsed_s: float
    counterexamples: tuple[PartitionResult, ...] = field(init=False)

    def __post_init__(self) -> None:
        bad = tuple(p for p in self.partitions if p.ok is False)
        object.__setattr__(self, "counterexamples", bad)

    @property
    def explanation(self) -> str:
        """A readable report: the verdict and, per failing partition, why."""
        checked = len(self.partitions)
        ops = sum(len(p.operations) for p in self.partitions)
        head = (
            f"{ops} operations in {checked} partition(s), {len(self.dropped)} dropped, "
            f"checked in {self.elapsed_s:.3f}s: "
        )
        if self.ok:
            return head + "linearizable"
        if self.ok is None:
            undecided = [repr(p.key) for p in self.partitions if p.ok is None]
            return head + f"timed out; undecided partitions: {', '.join(undecided)}"
        return (
            head + "NOT linearizable\n\n" + "\n\n".join(p.explanation for p in self.counterexamples)
        )


class _TimedOut(Exception):
    def __init__(self, explored: int) -> None:
        super().__init__(explored)
        self.explored = explored


def check(
    history: Iterable[Operation],
    model: Model[S],
    timeout_s: float | None = None,
) -> CheckResult:
    """Checks `history` against `model`; `timeout_s` bounds the whole check."""
    started = time.monotonic()
    deadline = None if timeout_s is None else started + timeout_s
    partitions: dict[Hashable | None, list[Operation]] = {}
    dropped: list[Operation] = []
    for operation in history:
        if operation.ok is False:
            dropped.append(operation)
            continue
        if operation.indeterminate and model.is_read_only(operation.op):
            dropped.append(operation)
            continue
        output = UNKNOWN if operation.indeterminate else operation.output
        key = model.partition(operation.op, operation.args, output)
        if key is DROP:
            dropped.append(operation)
            continue
        partitions.setdefault(key, []).append(operation)

    origin = min((o.call for ops in partitions.values() for o in ops), default=0)
    results: dict[Hashable | None, PartitionResult] = {}
    # Smallest first: one huge partition that eats the budget must not hide a
    # violation in the others.
    for key, ops in sorted(partitions.items(), key=lambda item: len(item[1])):
        if deadline is not None and time.monotonic() > deadline:
            results[key] = _undecided(key, ops, 0)
        else:
            results[key] = _check_partition(key, ops, model, deadline, origin)

    ordered = tuple(results[key] for key in partitions)
    verdicts = {r.ok for r in ordered}
    ok = False if False in verdicts else None if None in verdicts else True
    return CheckResult(ok, ordered, tuple(dropped), time.monotonic() - started)


def _undecided(key: Hashable | None, ops: Sequence[Operation], explored: int) -> PartitionResult:
    return PartitionResult(
        key=key,
        ok=None,
        operations=tuple(ops),
        linearization=(),
        state=None,
        blocking=None,
        explanation=f"partition {key!r}: timed out after {explored} search steps",
        explored=explored,
    )


def _check_partition(
    key: Hashable | None,
    ops: Sequence[Operation],
    model: Model[S],
    deadline: float | None,
    origin: int,
) -> PartitionResult:
    try:
        found = _search(ops, model, deadline)
    except _TimedOut as timed_out:
        return _undecided(key, ops, timed_out.explored)
    witness, state, blocking, explored = found
    linearization = tuple(ops[i] for i in witness)
    if blocking is None:
        return PartitionResult(
            key, True, tuple(ops), linearization, state, None, "linearizable", explored
        )
    explanation = _explain(key, ops, model, witness, state, blocking, origin)
    return PartitionResult(
        key, False, tuple(ops), linearization, state, ops[blocking], explanation, explored
    )


def _search(
    ops: Sequence[Operation], model: Model[S], deadline: float | None
) -> tuple[list[int], S, int | None, int]:
    """Wing & Gong with Lowe's cache over one partition.

    Returns (order, state, blocking, steps): on success `order` lists every operation
    index in a legal order and `blocking` is None; on failure `order` is the longest
    linearizable prefix found, `state` the model state after it, and `blocking` the
    operation whose return the search hit first from that prefix.
    """
    n = len(ops)
    events = sorted(
        [(o.call, 0, i) for i, o in enumerate(ops)]
        + [(o.ret_or_inf, 1, i) for i, o in enumerate(ops)]
    )
    # Node 0 is the list head; the k-th event is node k. A next pointer of 0 is the end,
    # since nothing ever links back to the head. Calls sort before returns at equal
    # times, so touching intervals count as concurrent (the permissive reading).
    size = 2 * n + 1
    nxt = list(range(1, size)) + [0]
    prv = [0] + list(range(size - 1))
    node_op = [0] * size
    is_call = [False] * size
    match = [0] * size
    call_node = [0] * n
    for k, (_, kind, i) in enumerate(events, start=1):
        node_op[k] = i
        if kind == 0:
            is_call[k] = True
            call_node[i] = k
        else:
            match[call_node[i]] = k

    names = [o.op for o in ops]
    args = [o.args for o in ops]
    outputs = [UNKNOWN if o.indeterminate else o.output for o in ops]
    bits = [1 << i for i in range(n)]
    step = model.step
    waits_for = _symmetric_predecessors(ops)

    state = model.init()
    linearized = 0
    stack: list[tuple[int, S]] = []
    cache: set[tuple[int, S]] = set()
    # The deepest configuration seen: recorded when the search first hits a return
    # from it, i.e. just before it backtracks, so success never pays for a copy.
    best_depth = 0
    best_fresh = True
    best: tuple[list[int], S, int] | None = None
    steps = 0

    entry = nxt[0]
    while nxt[0]:
        steps += 1
        if deadline is not None and steps % _CLOCK_EVERY == 0 and time.monotonic() > deadline:
            raise _TimedOut(steps)
        if is_call[entry]:
            i = node_op[entry]
            before_me = waits_for[i]
            if before_me >= 0 and not linearized & bits[before_me]:
                entry = nxt[entry]
                continue
            legal, after = step(state, names[i], args[i], outputs[i])
            if legal:
                reached = (linearized | bits[i], after)
                if reached not in cache:
                    cache.add(reached)
                    stack.append((entry, state))
                    state, linearized = after, reached[0]
                    ret = match[entry]
                    for node in (entry, ret):
                        before, following = prv[node], nxt[node]
                        nxt[before] = following
                        if following:
                            prv[following] = before
                    if len(stack) > best_depth:
                        best_depth, best_fresh = len(stack), True
                    entry = nxt[0]
                    continue
            entry = nxt[entry]
            continue
        if best_fresh and len(stack) == best_depth:
            best = ([node_op[c] for c, _ in stack], state, node_op[entry])
            best_fresh = False
        if not stack:
            assert best is not None
            return best[0], best[1], best[2], steps
        entry, state = stack.pop()
        linearized ^= bits[node_op[entry]]
        # Re-link in the reverse order of the unlinking (dancing links).
        for node in (match[entry], entry):
            nxt[prv[node]] = node
            following = nxt[node]
            if following:
                prv[following] = node
        entry = nxt[entry]
    return [node_op[c] for c, _ in stack], state, None, steps


def _symmetric_predecessors(ops: Sequence[Operation]) -> list[int]:
    """For each indeterminate operation, the previous identical one (by call), or -1.

    Two indeterminate operations with the same `op` and `args` are interchangeable:
    both may take effect at any time after their calls and the model cannot tell
    them apart. So the search only ever takes them in call order, which turns 2^k
    subsets of k pending retries into k + 1 counts. Without this a partition with
    many timed-out writes explodes exactly when it is not linearizable.
    """
    previous: dict[tuple[str, tuple[object, ...]], int] = {}
    waits_for = [-1] * len(ops)
    for i in sorted(range(len(ops)), key=lambda i: ops[i].call):
        o = ops[i]
        if not o.indeterminate:
            continue
        try:
            waits_for[i] = previous.get((o.op, o.args), -1)
            previous[o.op, o.args] = i
        except TypeError:  # unhashable arguments: no grouping, only slower
            continue
    return waits_for


def _explain(
    key: Hashable | None,
    ops: Sequence[Operation],
    model: Model[S],
    witness: list[int],
    state: S,
    blocking: int,
    origin: int,
) -> str:
    def show(i: int) -> str:
        o = ops[i]
        ret = "never" if o.ret is None else str(o.ret - origin)
        text = model.describe(o.op, o.args, UNKNOWN if o.indeterminate else o.output)
        return f"#{i} client {o.client_id} [{o.call - origin}, {ret}] {text}"

    def verdict(i: int) -> str:
        o = ops[i]
        legal, _ = model.step(state, o.op, o.args, UNKNOWN if o.indeterminate else o.output)
        return "legal here" if legal else "illegal in this state"

    done = set(witness)
    cutoff = ops[blocking].ret_or_inf
    # The operations that were free to go next: called before the blocking one returned.
    candidates = [i for i in range(len(ops)) if i not in done and ops[i].call <= cutoff]
    lines = [f"partition {key!r}: not linearizable ({len(ops)} operations)"]
    lines.append(f"  longest linearizable prefix: {len(witness)} operations, ending with:")
    shown = witness[-_SHOWN_PREFIX:]
    if len(witness) > len(shown):
        lines.append(f"    ... {len(witness) - len(shown)} earlier")
    lines.extend(f"    {show(i)}" for i in shown)
    lines.append(f"  model state after the prefix: {state!r}")
    lines.append(f"  cannot place: {show(blocking)} ({verdict(blocking)})")
    lines.append("    it returned before any legal order could include it.")
    others = [i for i in candidates if i != blocking]
    if others:
        lines.append("  other operations that could have gone next:")
        lines.extend(f"    {show(i)} ({verdict(i)})" for i in others[:_SHOWN_OTHERS])
        if len(others) > _SHOWN_OTHERS:
            lines.append(f"    ... {len(others) - _SHOWN_OTHERS} more")
    return "\n".join(lines)
