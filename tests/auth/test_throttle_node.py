"""Rate limiting in a real node (in process, real gRPC on loopback): past its burst a
caller gets ThrottlingException (RESOURCE_EXHAUSTED with RetryInfo), the refusal is
audited, and the Python client maps it to its own exception class."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from audit_records import audit_records
from google.rpc import error_details_pb2, status_pb2
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

from kms_client import KmsClient
from kms_client.errors import ThrottlingException
from kmsd.app import Node
from kmsd.config import config_from_dict

BURST = 3


def _config(data_dir: Path, rate: float = 0.01) -> Any:
    return config_from_dict(
        {
            "node": {"data_dir": str(data_dir), "listen": "127.0.0.1:0"},
            "tls": {"plaintext": True},
            "auth": {"administrators": ["anonymous"]},
            # By default one token per 100 s: nothing refills while the test runs.
            "limits": {"requests_per_second": rate, "burst": BURST},
        }
    )


def _details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            found: dict[str, Any] = {}
            for detail in status.details:
                for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
                    if detail.Is(kind.DESCRIPTOR):
                        message = kind()
                        detail.Unpack(message)
                        found[kind.DESCRIPTOR.name] = message
            return found
    return {}


def test_a_caller_past_its_burst_is_throttled_with_retry_info_and_audited(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        node = Node(_config(tmp_path / "node"))
        await node.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
                stub = pb_grpc.KeyManagementServiceStub(channel)
                for _ in range(BURST):
                    await stub.GenerateRandom(pb.GenerateRandomRequest(number_of_bytes=8))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.GenerateRandom(pb.GenerateRandomRequest(number_of_bytes=8))
            error = refused.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = _details(error)
            assert details["ErrorInfo"].metadata["aws_exception"] == "ThrottlingException"
            assert details["RetryInfo"].retry_delay.seconds >= 1

            # The client library names it, and does not wait 100 s to retry.
            def sync_call() -> None:
                with (
                    KmsClient([f"127.0.0.1:{node.port}"], plaintext=True) as client,
                    pytest.raises(ThrottlingException),
                ):
                    client.generate_random(8)

            await asyncio.to_thread(sync_call)
        finally:
            await node.stop()

    asyncio.run(main())
    records = audit_records(tmp_path / "node" / "audit")
    calls = [r for r in records if r["operation"] == "GenerateRandom"]
    assert [r["outcome"] for r in calls] == ["ok"] * BURST + ["error", "error"]
    assert calls[-1]["error_reason"] == "THROTTLING"


def test_limits_are_validated_naming_the_option(tmp_path: Path) -> None:
    from kmsd.config import ConfigError

    base = {"node": {"data_dir": str(tmp_path)}, "tls": {"plaintext": True}}
    with pytest.raises(ConfigError, match=r"\[limits\]\.burst"):
        config_from_dict({**base, "limits": {"burst": 0}})
    with pytest.raises(ConfigError, match=r"\[limits\]\.requests_per_second"):
        config_from_dict({**base, "limits": {"requests_per_second": -1}})


def test_the_client_waits_out_a_short_throttle_and_succeeds(tmp_path: Path) -> None:
    async def main() -> None:
        node = Node(_config(tmp_path / "node", rate=5.0))  # a token every 200 ms
        await node.start()
        try:

            def sync_calls() -> None:
                with KmsClient([f"127.0.0.1:{node.port}"], plaintext=True) as client:
                    for _ in range(BURST + 2):
                        assert len(client.generate_random(8).plaintext) == 8

            await asyncio.to_thread(sync_calls)
        finally:
            await node.stop()

    asyncio.run(main())
    records = audit_records(tmp_path / "node" / "audit")
    calls = [r for r in records if r["operation"] == "GenerateRandom"]
    throttled = [r for r in calls if r["outcome"] == "error"]
    assert throttled and all(r["error_reason"] == "THROTTLING" for r in throttled)
    assert sum(r["outcome"] == "ok" for r in calls) == BURST + 2
