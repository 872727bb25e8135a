"""The audit hook in a real node (in process, real gRPC on loopback): every request,
allowed or refused, is recorded; secrets never are; the node fails closed."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from audit_records import audit_records
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kms.v1 import cluster_service_pb2 as cpb
from kms.v1 import cluster_service_pb2_grpc as cpb_grpc
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res

from kms_client.audit_verify import audit_files, verify
from kmsd.app import Node
from kmsd.config import config_from_dict

Scenario = Callable[[Node, pb_grpc.KeyManagementServiceStub, grpc.aio.Channel], Awaitable[None]]


def run_node(data_dir: Path, scenario: Scenario, **audit: Any) -> None:
    async def main() -> None:
        config = config_from_dict(
            {
                "node": {"data_dir": str(data_dir), "listen": "127.0.0.1:0"},
                "audit": audit,
                "tls": {"plaintext": True},  # loopback; every caller is "anonymous"
                # ... whom these tests make administrator and operator.
                "auth": {"administrators": ["anonymous"], "operators": ["anonymous"]},
            }
        )
        node = Node(config)
        await node.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
                await scenario(node, pb_grpc.KeyManagementServiceStub(channel), channel)
        finally:
            await node.stop()

    asyncio.run(main())


def encodings(secret: bytes) -> list[bytes]:
    """The forms a secret could leak in: raw, hex, base64 (with and without padding)."""
    forms = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    for b64 in (base64.b64encode(secret), base64.urlsafe_b64encode(secret)):
        forms += [b64, b64.rstrip(b"=")]
    return forms


def test_crypto_operations_are_recorded_without_plaintext_data_keys_or_blobs(
    tmp_path: Path,
) -> None:
    secrets: dict[str, bytes] = {}
    context = {"tenant": "acme", "purpose": "audit-test"}

    async def scenario(node: Node, kms: pb_grpc.KeyManagementServiceStub, _: Any) -> None:
        key = (await kms.CreateKey(pb.CreateKeyRequest(description="audit"))).key_metadata
        other = (await kms.CreateKey(pb.CreateKeyRequest())).key_metadata
        plaintext = b"PLAINTEXT-" + os.urandom(32)
        secrets["plaintext"] = plaintext
        enc = await kms.Encrypt(
            pb.EncryptRequest(key_id=key.key_id, plaintext=plaintext, encryption_context=context)
        )
        secrets["ciphertext"] = enc.ciphertext_blob
        dec = await kms.Decrypt(
            pb.DecryptRequest(ciphertext_blob=enc.ciphertext_blob, encryption_context=context)
        )
        assert dec.plaintext == plaintext
        gdk = await kms.GenerateDataKey(
            pb.GenerateDataKeyRequest(
                key_id=key.arn, key_spec=res.DATA_KEY_SPEC_AES_256, encryption_context=context
            )
        )
        secrets["data key"] = gdk.plaintext
        secrets["data key blob"] = gdk.ciphertext_blob
        wrapped = await kms.GenerateDataKeyWithoutPlaintext(
            pb.GenerateDataKeyWithoutPlaintextRequest(
                key_id=key.key_id, key_spec=res.DATA_KEY_SPEC_AES_256
            )
        )
        secrets["data key blob 2"] = wrapped.ciphertext_blob
        again = await kms.ReEncrypt(
            pb.ReEncryptRequest(
                ciphertext_blob=gdk.ciphertext_blob,
                source_encryption_context=context,
                destination_key_id=other.key_id,
                destination_encryption_context={"moved": "yes"},
            )
        )
        secrets["re-encrypted blob"] = again.ciphertext_blob
        decrypted_key = await kms.Decrypt(
            pb.DecryptRequest(
                ciphertext_blob=again.ciphertext_blob, encryption_context={"moved": "yes"}
            )
        )
        assert decrypted_key.plaintext == gdk.plaintext
        secrets["random"] = (
            await kms.GenerateRandom(pb.GenerateRandomRequest(number_of_bytes=32))
        ).plaintext

    directory = tmp_path / "data" / "audit"
    run_node(tmp_path / "data", scenario)

    everything = b"".join(p.read_bytes() for p in directory.iterdir())
    for what, secret in secrets.items():
        for form in encodings(secret):
            assert form not in everything, f"the {what} appears in the audit log"
    got = audit_records(directory)
    ops = [r["operation"] for r in got]
    assert ops == [
        "CreateKey",
        "CreateKey",
        "Encrypt",
        "Decrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "ReEncrypt",
        "Decrypt",
        "GenerateRandom",
    ]
    assert all(r["outcome"] == "ok" for r in got)
    key_arn = got[0]["key_arn"]
    assert key_arn.startswith("arn:aws:kms:us-east-1:111122223333:key/")
    assert [r["key_arn"] for r in got[2:6]] == [key_arn] * 4
    assert got[3]["encryption_context"] == context
    assert got[6]["key_arn"] == got[1]["key_arn"]
    assert got[6]["encryption_context"] == {"moved": "yes"}
    assert got[6]["detail"] == {"source_key_arn": key_arn, "source_encryption_context": context}
    assert got[8]["key_arn"] is None
    assert all(r["source"].startswith("ipv4:127.0.0.1:") for r in got)
    assert all(r["principal"] == "anonymous" for r in got)
    assert len({r["request_id"] for r in got}) == len(got)
    assert verify([directory]).ok


def test_refused_requests_are_recorded_with_their_reason(tmp_path: Path) -> None:
    async def scenario(
        node: Node, kms: pb_grpc.KeyManagementServiceStub, channel: grpc.aio.Channel
    ) -> None:
        async def refused(call: Awaitable[Any]) -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            return info.value.code()

        missing = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000"
        assert await refused(kms.DescribeKey(pb.DescribeKeyRequest(key_id=missing))) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert await refused(kms.DescribeKey(pb.DescribeKeyRequest(key_id="alias/none"))) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert (
            await refused(
                kms.Decrypt(
                    pb.DecryptRequest(ciphertext_blob=b"\x01" * 80, encryption_context={"a": "b"})
                )
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert await refused(kms.Encrypt(pb.EncryptRequest(plaintext=b"x"))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        created = await kms.CreateKey(pb.CreateKeyRequest(request_id="my-request-1"))
        # Bytes that do not parse as the request: refused before any operation runs.
        garbage = channel.unary_unary(
            "/kms.v1.KeyManagementService/Encrypt",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        assert await refused(garbage(b"\xff\xff\xff")) == grpc.StatusCode.INVALID_ARGUMENT
        cluster = cpb_grpc.ClusterServiceStub(channel)
        status = await cluster.GetClusterStatus(cpb.GetClusterStatusRequest())
        assert status.node_id == 1
        assert (
            await refused(
                cluster.AddMember(
                    cpb.AddMemberRequest(node_id=2, peer_address="a:1", client_address="b:2")
                )
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert created.key_metadata.arn

    directory = tmp_path / "data" / "audit"
    run_node(tmp_path / "data", scenario)
    got = audit_records(directory)
    summary = [
        (r["operation"], r["outcome"], r["error_reason"], r["aws_exception"], r["key_arn"])
        for r in got
    ]
    missing = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000"
    assert summary[:4] == [
        ("DescribeKey", "error", "NOT_FOUND", "NotFoundException", missing),
        ("DescribeKey", "error", "NOT_FOUND", "NotFoundException", "alias/none"),
        ("Decrypt", "error", "INVALID_CIPHERTEXT", "InvalidCiphertextException", None),
        ("Encrypt", "error", "VALIDATION_FAILED", "ValidationException", None),
    ]
    assert got[2]["encryption_context"] == {"a": "b"}
    assert (got[4]["operation"], got[4]["request_id"]) == ("CreateKey", "my-request-1")
    assert summary[5] == ("Encrypt", "error", "VALIDATION_FAILED", "ValidationException", None)
    assert summary[6][:2] == ("GetClusterStatus", "ok")
    assert summary[7][:4] == (
        "AddMember",
        "error",
        "UNSUPPORTED_OPERATION",
        "UnsupportedOperationException",
    )
    assert len(got) == 8
    assert verify([directory]).ok


class FailingSyncer:
    def __init__(self) -> None:
        self.failing = True

    def __call__(self, fd: int) -> None:
        if self.failing:
            raise OSError(28, "No space left on device (injected)")
        os.fdatasync(fd)


def test_the_node_fails_closed_while_the_audit_log_cannot_be_written(tmp_path: Path) -> None:
    async def scenario(
        node: Node, kms: pb_grpc.KeyManagementServiceStub, channel: grpc.aio.Channel
    ) -> None:
        key = (await kms.CreateKey(pb.CreateKeyRequest())).key_metadata.key_id
        assert node.audit is not None
        syncer = FailingSyncer()
        node.audit._sync = syncer  # noqa: SLF001 - the seam of the injected disk failure
        node.audit._retry_interval_s = 0.05  # noqa: SLF001
        request = pb.EncryptRequest(key_id=key, plaintext=b"secret")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kms.Encrypt(request)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "audit log cannot be written" in (info.value.details() or "")
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            check = await health.Check(health_pb2.HealthCheckRequest(service=""))
            if check.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.01)
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # Refused before the operation runs, as long as the log is broken.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kms.GenerateRandom(pb.GenerateRandomRequest(number_of_bytes=8))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        syncer.failing = False
        for _ in range(200):
            if node.audit.available:
                break
            await asyncio.sleep(0.01)
        await kms.Encrypt(request)
        for _ in range(100):
            check = await health.Check(health_pb2.HealthCheckRequest(service=""))
            if check.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.01)
        assert check.status == health_pb2.HealthCheckResponse.SERVING

    directory = tmp_path / "data" / "audit"
    run_node(tmp_path / "data", scenario)
    got = audit_records(directory)
    # CreateKey's record was written, its fsync left for company (the log holds it):
    # the failed fsync cut it off, and it was written again right after the recovery.
    assert [r["operation"] for r in got] == ["AuditRecovery", "CreateKey", "Encrypt"]
    assert got[0]["detail"]["refused_records"] == 1
    assert got[1]["detail"]["log_index"] == 1
    assert verify([directory]).ok


def test_auditing_can_be_turned_off(tmp_path: Path) -> None:
    async def scenario(node: Node, kms: pb_grpc.KeyManagementServiceStub, _: Any) -> None:
        assert node.audit is None
        await kms.CreateKey(pb.CreateKeyRequest())

    run_node(tmp_path / "data", scenario, enabled=False)
    assert not (tmp_path / "data" / "audit").exists()


def test_audit_path_and_rotation_come_from_the_config(tmp_path: Path) -> None:
    async def scenario(node: Node, kms: pb_grpc.KeyManagementServiceStub, _: Any) -> None:
        for _ in range(30):
            await kms.GenerateRandom(pb.GenerateRandomRequest(number_of_bytes=8))

    run_node(tmp_path / "data", scenario, path=str(tmp_path / "elsewhere"), max_file_bytes=4096)
    files = audit_files(tmp_path / "elsewhere")
    assert len(files) > 1
    assert verify(files).records == 30
