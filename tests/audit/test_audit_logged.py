"""Log-backed audit records: a mutation's record is written when its command applies,
its answer does not wait for the record's fsync, a failure writes it again after
recovery, a crash has it written again from the log at the next start, and a snapshot
waits until it is durable."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from audit_records import audit_records
from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

from kms_client.audit_verify import audit_files, verify
from kmsd.app import Node
from kmsd.audit.logged import CURRENT_CALL, LoggedAudit
from kmsd.audit.record import AuditEvent
from kmsd.audit.writer import AuditUnavailable, AuditWriter, last_logged_index
from kmsd.config import config_from_dict
from kmsd_process import KmsdProcess

ARN = "arn:aws:kms:us-east-1:111122223333:key/"


def key_arn(key_id: str) -> str:
    return ARN + key_id


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def event(operation: str = "CreateKey", **fields: Any) -> AuditEvent:
    return AuditEvent(operation=operation, principal="alice", request_id="r", **fields)


def verified(directory: Path) -> list[dict[str, Any]]:
    report = verify(audit_files(directory))
    assert report.ok, report.first_bad
    return audit_records(directory)


# -- the writer -----------------------------------------------------------------------


def test_logged_records_are_chained_and_the_watermark_is_found_at_the_next_start(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        writer = AuditWriter(tmp_path, node_id=1)
        await writer.start()
        assert writer.logged_watermark == 0
        writer.submit_logged(event(detail={"log_index": 3}), 3)
        writer.submit_logged(event(detail={"log_index": 7}), 7)
        await writer.record(event("Encrypt"))  # later records without a log index
        await writer.stop()
        again = AuditWriter(tmp_path, node_id=1)
        await again.start()
        assert again.logged_watermark == 7
        await again.stop()
        # Another node's records (the same directory reused under a new id) do not count.
        other = AuditWriter(tmp_path, node_id=2)
        await other.start()
        assert other.logged_watermark == 0
        await other.stop()

    asyncio.run(main())
    assert [r["detail"] and r["detail"].get("log_index") for r in verified(tmp_path)] == [
        3,
        7,
        None,
    ]
    assert last_logged_index(tmp_path, 1) == 7


def test_settle_makes_logged_records_durable_at_once(tmp_path: Path) -> None:
    synced: list[int] = []
    gate = threading.Event()

    def slow_sync(fd: int) -> None:
        gate.wait(10)  # the sync thread's fsync, held back
        synced.append(fd)

    async def main() -> None:
        writer = AuditWriter(tmp_path, node_id=1, syncer=slow_sync)
        await writer.start()
        writer.submit_logged(event(detail={"log_index": 1}), 1)
        await asyncio.sleep(0)  # the write, then the sync thread waits at the gate
        gate.set()
        writer.settle()  # syncs on the loop (after the thread's sync, holding the file)
        assert synced, "settle returned before any fsync"
        await writer.stop()

    asyncio.run(main())


def test_logged_records_alone_are_synced_within_a_bound_not_per_record(tmp_path: Path) -> None:
    syncs: list[float] = []

    def counting(fd: int) -> None:
        syncs.append(time.monotonic())
        os.fdatasync(fd)

    async def main() -> None:
        writer = AuditWriter(
            tmp_path,
            node_id=1,
            syncer=counting,
            logged_sync_interval_s=0.3,
            logged_sync_records=4,
        )
        await writer.start()
        written = time.monotonic()
        writer.submit_logged(event(detail={"log_index": 1}), 1)
        writer.submit_logged(event(detail={"log_index": 2}), 2)
        await until(lambda: len(syncs) == 1)  # within the interval, not per record
        assert syncs[0] - written >= 0.25
        for index in range(3, 7):  # four more: the count triggers the next fsync
            writer.submit_logged(event(detail={"log_index": index}), index)
            await asyncio.sleep(0)
        await until(lambda: len(syncs) == 2, timeout=0.25)
        await writer.record(event("Encrypt"))  # a waiting caller's fsync covers the rest
        await writer.stop()

    asyncio.run(main())
    assert len(verified(tmp_path)) == 7


def test_a_failed_fsync_writes_logged_records_again_after_recovery(tmp_path: Path) -> None:
    fail = threading.Event()
    fail.set()

    def syncer(fd: int) -> None:
        if fail.is_set():
            fail.clear()
            raise OSError(5, "Input/output error")
        os.fdatasync(fd)

    async def main() -> None:
        writer = AuditWriter(
            tmp_path, node_id=1, syncer=syncer, retry_interval_s=0.05, inline_sync=False
        )
        await writer.start()
        refused = writer.submit(event("Encrypt"))
        writer.submit_logged(event(detail={"log_index": 5}), 5)
        writer.submit_logged(event(detail={"log_index": 6}), 6)
        with pytest.raises(AuditUnavailable):
            await refused
        with pytest.raises(AuditUnavailable):
            writer.settle()  # the log must keep entries 5 and 6 meanwhile
        writer.submit_logged(event(detail={"log_index": 8}), 8)  # during the failure
        await until(lambda: writer.available)
        writer.settle()
        await writer.stop()

    asyncio.run(main())
    records = verified(tmp_path)
    assert [r["operation"] for r in records] == [
        "AuditRecovery",
        "CreateKey",
        "CreateKey",
        "CreateKey",
    ]
    assert [r["detail"]["log_index"] for r in records[1:]] == [5, 6, 8]
    assert records[0]["detail"]["refused_records"] == 1


# -- completing a draft -----------------------------------------------------------------


def command_with_draft(node: int, life: bytes, **draft: Any) -> fsm.Command:
    command = fsm.Command(principal="alice")
    command.audit.CopyFrom(fsm.AuditDraft(node=node, life=life, **draft))
    return command


def test_applied_commands_complete_their_drafts(tmp_path: Path) -> None:
    async def main() -> list[dict[str, Any]]:
        writer = AuditWriter(tmp_path, node_id=1)
        await writer.start()
        logged = LoggedAudit(writer, 1, key_arn)
        mine = fsm.Command()
        assert logged.draft_into(mine) is None  # no request being served: no draft
        life = logged_life(logged)
        ok = command_with_draft(
            1,
            life,
            operation="CreateGrant",
            principal="alice",
            source="ipv4:127.0.0.1:1",
            key_arn=key_arn("k1"),
            request_id="r1",
            detail_json='{"operations":["Encrypt"]}',
        )
        logged.applied(10, ok, fsm.CommandResult(key_id="k1", grant_id="g1"))
        refused = command_with_draft(1, life, operation="EnableKey", request_id="r2")
        error = fsm.CommandError(reason="KMS_INVALID_STATE", message="pending deletion")
        logged.applied(11, refused, fsm.CommandResult(error=error))
        # Another node's command, and one without a draft (time-driven): no record here.
        logged.applied(12, command_with_draft(2, life, operation="CreateKey"), fsm.CommandResult())
        logged.applied(13, fsm.Command(), fsm.CommandResult())
        # A command of an earlier life of this node: rebuilt from the log.
        older = command_with_draft(1, b"earlier!", operation="CreateKey", request_id="r3")
        logged.applied(14, older, fsm.CommandResult(key_id="k3"))
        assert (logged.took(10), logged.took(10), logged.took(12)) == (True, False, False)
        assert logged.rebuilt == 1
        await writer.stop()
        return verified(tmp_path)

    grant, enable, rebuilt = asyncio.run(main())
    assert grant["outcome"] == "ok" and grant["key_arn"] == key_arn("k1")
    assert grant["detail"] == {"operations": ["Encrypt"], "grant_id": "g1", "log_index": 10}
    assert (grant["principal"], grant["source"], grant["request_id"]) == (
        "alice",
        "ipv4:127.0.0.1:1",
        "r1",
    )
    assert (enable["outcome"], enable["error_reason"], enable["aws_exception"]) == (
        "error",
        "KMS_INVALID_STATE",
        "KMSInvalidStateException",
    )
    assert enable["key_arn"] is None and enable["detail"] == {"log_index": 11}
    assert rebuilt["detail"] == {"log_index": 14, "rebuilt_from_log": True}
    assert rebuilt["key_arn"] == key_arn("k3")


class FakeCall:
    """A request being served, as the audit hook would register it."""

    logged = False

    def draft_event(self) -> AuditEvent:
        return AuditEvent(operation="CreateKey")


def logged_life(logged: LoggedAudit) -> bytes:
    """This process's life token, as `draft_into` stamps it on a served request's draft."""
    command = fsm.Command()
    token = CURRENT_CALL.set(FakeCall())
    try:
        assert logged.draft_into(command) is not None
    finally:
        CURRENT_CALL.reset(token)
    assert (command.audit.node, command.audit.operation) == (1, "CreateKey")
    return command.audit.life


async def restarted_after(directory: Path, recorded: int) -> tuple[AuditWriter, LoggedAudit]:
    """Node 1's audit log after a record of log index `recorded`, then a restart."""
    writer = AuditWriter(directory, node_id=1)
    await writer.start()
    writer.submit_logged(event(detail={"log_index": recorded}), recorded)
    await writer.stop()
    writer = AuditWriter(directory, node_id=1)
    await writer.start()
    return writer, LoggedAudit(writer, 1, key_arn)


def test_a_record_that_cannot_be_made_never_stops_the_state_machine(tmp_path: Path) -> None:
    def broken_arn(key_id: str) -> str:
        raise RuntimeError("a bug")

    async def main() -> None:
        writer = AuditWriter(tmp_path, node_id=1)
        await writer.start()
        logged = LoggedAudit(writer, 1, broken_arn)
        command = command_with_draft(1, logged_life(logged), operation="CreateKey")
        logged.applied(1, command, fsm.CommandResult(key_id="k1"))  # does not raise
        assert not logged.took(1)  # so the request's own record is written instead
        await writer.stop()

    asyncio.run(main())
    assert verified(tmp_path) == []


def test_commands_at_or_below_the_watermark_are_not_recorded_again(tmp_path: Path) -> None:
    async def main() -> None:
        writer, logged = await restarted_after(tmp_path, 20)
        for index in (19, 20, 21):
            command = command_with_draft(1, b"earlier!", operation="CreateKey")
            logged.applied(index, command, fsm.CommandResult(key_id=f"k{index}"))
        await writer.stop()

    asyncio.run(main())
    assert [r["detail"]["log_index"] for r in verified(tmp_path)] == [20, 21]


def test_a_reset_command_log_is_recorded_from_its_first_index(tmp_path: Path) -> None:
    """The audit log kept, the command log emptied: the new log's indices start again
    below the last recorded one, and its commands are still recorded."""

    async def main() -> None:
        writer, logged = await restarted_after(tmp_path, 50)
        life = logged_life(logged)
        for index in (1, 2):
            command = command_with_draft(1, life, operation="CreateKey")
            logged.applied(index, command, fsm.CommandResult(key_id=f"k{index}"))
        await writer.stop()
        assert last_logged_index(tmp_path, 1) == 2  # what the next start goes by

    asyncio.run(main())
    assert [r["detail"]["log_index"] for r in verified(tmp_path)] == [50, 1, 2]


# -- a node ----------------------------------------------------------------------------


def test_a_mutation_is_answered_while_its_records_fsync_is_still_running(tmp_path: Path) -> None:
    """With the audit fsync held back, CreateKey is answered (its record is durable in
    the log); Encrypt, whose record only the audit log holds, waits for the fsync."""
    gate = threading.Event()
    gate.set()

    def held_sync(fd: int) -> None:
        if not gate.wait(20):
            raise AssertionError("the test never released the fsync")
        os.fdatasync(fd)

    async def main() -> None:
        config = config_from_dict(
            {
                "node": {"data_dir": str(tmp_path / "data"), "listen": "127.0.0.1:0"},
                "tls": {"plaintext": True},
                "auth": {"administrators": ["anonymous"], "operators": ["anonymous"]},
            }
        )
        node = Node(config)
        await node.start()
        assert node.audit is not None
        node.audit._sync = held_sync  # the seam, swapped in after start
        node.audit._inline_sync = False  # held on the sync thread, not on the event loop
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
                kms = pb_grpc.KeyManagementServiceStub(channel)
                key = (await kms.CreateKey(pb.CreateKeyRequest(description="a"))).key_metadata
                gate.clear()
                created = await kms.CreateKey(pb.CreateKeyRequest(description="b"), timeout=10)
                assert created.key_metadata.key_id
                encrypt = asyncio.ensure_future(
                    kms.Encrypt(pb.EncryptRequest(key_id=key.key_id, plaintext=b"x"), timeout=10)
                )
                await asyncio.sleep(0.3)  # time for Encrypt to be served, were it not held
                assert not encrypt.done(), "Encrypt was answered before its record was durable"
                gate.set()
                assert (await encrypt).ciphertext_blob
        finally:
            gate.set()
            await node.stop()

    asyncio.run(main())
    records = verified(tmp_path / "data" / "audit")
    creates = [r for r in records if r["operation"] == "CreateKey"]
    assert [r["detail"]["log_index"] for r in creates] == [1, 2]
    assert all(r["outcome"] == "ok" and r["key_arn"].startswith(ARN) for r in creates)
    # Drafted by the hook before proposing: who asked, from where.
    assert all(r["principal"] == "anonymous" for r in creates)
    assert all(r["source"].startswith("ipv4:127.0.0.1:") for r in creates)


@pytest.mark.e2e
def test_records_lost_in_a_crash_are_written_again_from_the_log(tmp_path: Path) -> None:
    """kill -9, then the audit file cut back as if its last writes never reached the
    disk: the restarted node writes the missing CreateKey records from its log."""
    data = tmp_path / "data"
    process = KmsdProcess(data).start()
    request_ids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(5)]
    try:
        kms = process.stub()
        keys = [
            kms.CreateKey(pb.CreateKeyRequest(description="c", request_id=rid)).key_metadata.arn
            for rid in request_ids
        ]
    finally:
        process.kill()
    newest = audit_files(data / "audit")[-1]
    lines = newest.read_bytes().splitlines(keepends=True)
    third = next(i for i, line in enumerate(lines) if request_ids[2].encode() in line)
    newest.write_bytes(b"".join(lines[:third]))  # the last three records never synced
    process.restart()
    assert process.stop() == 0
    creates = [r for r in verified(data / "audit") if r["operation"] == "CreateKey"]
    assert [r["request_id"] for r in creates] == request_ids
    assert [r["key_arn"] for r in creates] == keys
    assert [bool(r["detail"].get("rebuilt_from_log")) for r in creates] == [
        False,
        False,
        True,
        True,
        True,
    ]
    indices = [r["detail"]["log_index"] for r in creates]
    assert indices == sorted(set(indices))
