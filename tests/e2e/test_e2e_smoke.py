"""End-to-end smoke test: a real kmsd process, over gRPC, survives a restart."""

from __future__ import annotations

import grpc
import pytest
from kms.v1 import kms_service_pb2 as pb

from kmsd_process import KmsdProcess


def test_encrypt_decrypt_survives_restart(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = stub.CreateKey(pb.CreateKeyRequest(description="smoke")).key_metadata
    blob = stub.Encrypt(
        pb.EncryptRequest(key_id=key.key_id, plaintext=b"secret", encryption_context={"a": "1"})
    ).ciphertext_blob
    kmsd.stop()
    kmsd.restart()
    stub = kmsd.stub()
    out = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, encryption_context={"a": "1"}))
    assert out.plaintext == b"secret"
    assert out.key_id == key.arn
    with pytest.raises(grpc.RpcError) as info:
        stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, encryption_context={"a": "2"}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
