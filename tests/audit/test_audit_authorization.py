"""What the audit log keeps of authorization: denials with their reason (never in the
caller's error), policies and grant tokens as digests only, grants with their key."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import grpc
import pytest
from audit_records import audit_records
from kms.v1 import cluster_service_pb2 as cpb
from kms.v1 import cluster_service_pb2_grpc as cpb_grpc
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res

from inprocess import NAMES, open_kms
from kmsd.api.audit import AuditHook
from kmsd.app import Node
from kmsd.auth.authorizer import Caller
from kmsd.clock import FakeClock
from kmsd.config import AuthConfig, config_from_dict
from kmsd.errors import AccessDeniedError, InvalidGrantTokenError
from kmsd.service import crypto_ops, grants, keys
from kmsd.service.context import Kms

ALICE = Caller("spiffe://kmsd.dev/user/alice")
BOB = Caller("spiffe://kmsd.dev/user/bob")


class FakeContext:
    """What the hook reads of a gRPC context: the TLS identity and the peer."""

    def __init__(self, principal: str) -> None:
        self._principal = principal

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"peer_uri": [self._principal.encode()]}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"


def test_denials_and_grants_are_recorded_with_digests_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        kms: Kms = await open_kms(tmp_path, FakeClock(), auth=AuthConfig())
        hook = AuditHook(None, NAMES, kms.store)  # type: ignore[arg-type]  # event() only
        policy = json.dumps(
            {
                "Statement": {
                    "Effect": "Allow",
                    "Principal": {"AWS": ALICE.principal},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            }
        )
        created = await keys.create_key(kms, pb.CreateKeyRequest(policy=policy), ALICE)
        key_id = created.key_metadata.key_id
        create_record = hook.event(
            pb.CreateKeyRequest(policy=policy), FakeContext(ALICE.principal), created, None
        )
        assert create_record.detail == {
            "policy_sha256": hashlib.sha256(policy.encode()).hexdigest(),
            "policy_bytes": len(policy),
        }
        request = pb.CreateGrantRequest(
            key_id=key_id,
            grantee_principal=BOB.principal,
            operations=[res.GRANT_OPERATION_ENCRYPT, res.GRANT_OPERATION_RE_ENCRYPT_FROM],
        )
        granted = await grants.create_grant(kms, request, ALICE)
        record = hook.event(request, FakeContext(ALICE.principal), granted, None)
        assert record.key_arn == NAMES.key_arn(key_id)
        assert record.detail == {
            "grant_id": granted.grant_id,
            "grantee_principal": BOB.principal,
            "operations": ["Encrypt", "ReEncryptFrom"],
        }
        # RetireGrant by token names no key: the record still has it; the token only
        # as a digest.
        retire = pb.RetireGrantRequest(grant_token=granted.grant_token)
        with pytest.raises(AccessDeniedError) as info:
            await grants.retire_grant(kms, retire, BOB)
        denied = hook.event(retire, FakeContext(BOB.principal), None, info.value)
        assert denied.outcome == "error" and denied.error_reason == "ACCESS_DENIED"
        assert denied.aws_exception == "AccessDeniedException"
        assert denied.principal == BOB.principal
        assert denied.key_arn == NAMES.key_arn(key_id)
        assert denied.detail is not None
        assert (
            denied.detail["grant_token_sha256"]
            == hashlib.sha256(granted.grant_token.encode()).hexdigest()
        )
        assert "neither the grant's retiring principal" in denied.detail["denial"]
        # The caller's error does not say why.
        assert "retiring" not in info.value.message
        text = json.dumps(
            {
                "detail": denied.detail,
                "key_arn": denied.key_arn,
                "context": denied.encryption_context,
            }
        )
        assert granted.grant_token not in text
        # A refused Encrypt on a missing key: the denial says so, in the log only.
        missing = pb.EncryptRequest(key_id="alias/none", plaintext=b"x")
        with pytest.raises(AccessDeniedError) as refused:
            await crypto_ops.encrypt(kms, missing, BOB)
        record = hook.event(missing, FakeContext(BOB.principal), None, refused.value)
        assert record.detail == {"denial": "no such key"}
        # Grant tokens are recorded as digests, even malformed ones.
        tokens = pb.EncryptRequest(key_id=key_id, plaintext=b"x", grant_tokens=["t"])
        with pytest.raises(InvalidGrantTokenError) as bad:
            await crypto_ops.encrypt(kms, tokens, ALICE)
        record = hook.event(tokens, FakeContext(ALICE.principal), None, bad.value)
        assert record.detail == {"grant_tokens_sha256": [hashlib.sha256(b"t").hexdigest()]}
        await kms.log.stop()

    asyncio.run(scenario())


def test_cluster_service_is_for_operators_and_refusals_are_recorded(tmp_path: Path) -> None:
    async def main() -> None:
        config = config_from_dict(
            {
                "node": {"data_dir": str(tmp_path), "listen": "127.0.0.1:0"},
                "tls": {"plaintext": True},  # every caller is "anonymous"
                "auth": {"administrators": ["anonymous"]},  # but not an operator
            }
        )
        node = Node(config)
        await node.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{node.port}") as channel:
                cluster = cpb_grpc.ClusterServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await cluster.GetClusterStatus(cpb.GetClusterStatusRequest())
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "[auth].operators" in (info.value.details() or "")
                # The administrator is still served by KeyManagementService.
                kms = pb_grpc.KeyManagementServiceStub(channel)
                await kms.CreateKey(pb.CreateKeyRequest())
        finally:
            await node.stop()
        trail = audit_records(config.audit_dir)
        refused = [r for r in trail if r["operation"] == "GetClusterStatus"]
        assert len(refused) == 1
        assert refused[0]["outcome"] == "error"
        assert refused[0]["error_reason"] == "ACCESS_DENIED"
        assert refused[0]["detail"] == {"denial": "not an operator"}

    asyncio.run(main())
