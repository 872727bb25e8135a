"""The history recorder: one clock, many threads or tasks, and JSONL round trips."""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path

import pytest

from kmsd.checker import HistoryRecorder, Operation, from_jsonl, to_jsonl


def test_complete_fail_and_indeterminate_outcomes() -> None:
    recorder = HistoryRecorder()
    a = recorder.invoke(0, "disable", ("k1",))
    b = recorder.invoke(1, "create", ())
    c = recorder.invoke(2, "describe", ["k1"])
    assert recorder.pending == 3
    done = recorder.complete(a, "ok")
    failed = recorder.fail(b, "ValidationException")
    lost = recorder.fail_indeterminate(c)
    assert recorder.pending == 0
    assert (done.ok, done.output, done.args) == (True, "ok", ("k1",))
    assert (failed.ok, failed.output) == (False, "ValidationException")
    assert (lost.ok, lost.ret, lost.indeterminate) == (None, None, True)
    assert lost.args == ("k1",)  # lists become tuples
    assert recorder.history() == [done, failed, lost]


def test_a_handle_completes_once() -> None:
    recorder = HistoryRecorder()
    handle = recorder.invoke(0, "read")
    recorder.complete(handle, 1)
    with pytest.raises(ValueError, match="already completed"):
        recorder.fail_indeterminate(handle)


def test_pending_operations_are_reported_as_indeterminate() -> None:
    recorder = HistoryRecorder()
    recorder.invoke(0, "write", (1,))
    [operation] = recorder.history()
    assert operation.indeterminate and operation.output is None


def test_timestamps_are_strictly_increasing_even_on_a_coarse_clock() -> None:
    recorder = HistoryRecorder(clock=lambda: 42)
    handles = [recorder.invoke(i, "read") for i in range(3)]
    for handle in reversed(handles):
        recorder.complete(handle, 0)
    calls = [o.call for o in recorder.history()]
    rets = [o.ret for o in recorder.history()]
    assert calls == [42, 43, 44]
    assert rets == [47, 46, 45]


def test_logical_counter_clock() -> None:
    counter = itertools.count()
    recorder = HistoryRecorder(clock=lambda: next(counter))
    recorder.complete(recorder.invoke(0, "read"), None)
    [operation] = recorder.history()
    assert (operation.call, operation.ret) == (0, 1)


def _all_event_times(history: list[Operation]) -> list[int]:
    times = [o.call for o in history] + [o.ret for o in history if o.ret is not None]
    return times


def test_threads_record_consistently() -> None:
    recorder = HistoryRecorder()

    def client(client_id: int) -> None:
        for n in range(300):
            handle = recorder.invoke(client_id, "write", (n,))
            if n % 50 == 0:
                recorder.fail_indeterminate(handle)
            else:
                recorder.complete(handle, "ok")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = recorder.history()
    assert len(history) == 2400
    times = _all_event_times(history)
    assert len(set(times)) == len(times)
    for client_id in range(8):
        mine = [o for o in history if o.client_id == client_id]
        assert [o.args[0] for o in mine] == list(range(300))
        # One operation at a time per client: each call follows the previous return.
        for before, after in itertools.pairwise(mine):
            assert before.ret is None or before.ret < after.call
    assert sum(o.indeterminate for o in history) == 8 * 6


def test_asyncio_tasks_record_consistently() -> None:
    recorder = HistoryRecorder()

    async def client(client_id: int) -> None:
        for n in range(100):
            handle = recorder.invoke(client_id, "read", ())
            await asyncio.sleep(0)
            recorder.complete(handle, n)

    async def main() -> None:
        await asyncio.gather(*(client(i) for i in range(8)))

    asyncio.run(main())
    history = recorder.history()
    assert len(history) == 800
    times = _all_event_times(history)
    assert len(set(times)) == len(times)
    # Tasks interleave, so operations from different clients overlap.
    assert any(a.client_id != b.client_id for a, b in itertools.pairwise(history))


def test_jsonl_round_trip(tmp_path: Path) -> None:
    recorder = HistoryRecorder()
    recorder.complete(recorder.invoke(0, "put", ("k", ("nested", 1))), ("a", ["b"]))
    recorder.fail(recorder.invoke(1, "create", ()), "LimitExceededException")
    recorder.fail_indeterminate(recorder.invoke(2, "disable", ("k",)))
    recorder.invoke(3, "describe", ("k",))
    path = tmp_path / "history.jsonl"
    recorder.to_jsonl(path)
    loaded = from_jsonl(path)
    assert loaded == recorder.history()
    assert loaded[0].output == ("a", ("b",))
    to_jsonl(loaded, tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text() == path.read_text()


def test_from_jsonl_reports_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = '{"args": [], "call": 1, "client_id": 0, "ok": true, "op": "read", "output": 0, '
    path.write_text(good + '"ret": 2}\n\n' + good + '"ret": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: .*returns before"):
        from_jsonl(path)


@pytest.mark.parametrize(
    ("ret", "ok"),
    [(None, True), (5, None), (0, True)],
)
def test_malformed_operations_are_rejected(ret: int | None, ok: bool | None) -> None:
    with pytest.raises(ValueError):
        Operation(0, "read", (), 1, ret, None, ok)
