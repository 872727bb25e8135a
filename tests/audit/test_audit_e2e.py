"""End to end: a real `kmsd dev --nodes 1` process records allowed and refused requests;
`kmsctl audit verify` accepts its files, across restarts and kill -9, and finds tampering;
`kmsctl audit tail --follow` shows new records as they come."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from audit_records import audit_records
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import resources_pb2 as res

from kms_client.audit_verify import audit_files
from kmsd_process import KmsdProcess

pytestmark = pytest.mark.e2e

MISSING_KEY = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000"


def kmsctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms_client.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def exercise(process: KmsdProcess) -> None:
    """Allowed and refused requests of several kinds."""
    kms = process.stub()
    key = kms.CreateKey(pb.CreateKeyRequest(description="e2e")).key_metadata
    blob = kms.Encrypt(
        pb.EncryptRequest(key_id=key.key_id, plaintext=b"top secret", encryption_context={"t": "1"})
    ).ciphertext_blob
    assert kms.Decrypt(
        pb.DecryptRequest(ciphertext_blob=blob, encryption_context={"t": "1"})
    ).plaintext
    kms.GenerateDataKey(
        pb.GenerateDataKeyRequest(key_id=key.arn, key_spec=res.DATA_KEY_SPEC_AES_256)
    )
    with pytest.raises(grpc.RpcError) as info:
        kms.DescribeKey(pb.DescribeKeyRequest(key_id=MISSING_KEY))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        kms.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, encryption_context={"t": "2"}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_real_node_records_allowed_and_refused_requests_and_kmsctl_verifies(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    directory = data / "audit"
    process = KmsdProcess(data).start()
    try:
        exercise(process)
    finally:
        assert process.stop() == 0
    got = audit_records(directory)
    summary = [(r["operation"], r["outcome"], r["aws_exception"]) for r in got]
    assert summary == [
        ("CreateKey", "ok", ""),
        ("Encrypt", "ok", ""),
        ("Decrypt", "ok", ""),
        ("GenerateDataKey", "ok", ""),
        ("DescribeKey", "error", "NotFoundException"),
        ("Decrypt", "error", "InvalidCiphertextException"),
    ]
    assert got[4]["key_arn"] == MISSING_KEY and got[4]["error_reason"] == "NOT_FOUND"
    assert got[5]["encryption_context"] == {"t": "2"}
    assert all(r["node"] == 1 for r in got)
    assert b"top secret" not in b"".join(p.read_bytes() for p in directory.iterdir())

    files = [str(p) for p in audit_files(directory)]
    ok = kmsctl("audit", "verify", *files)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.splitlines()[0] == "OK: 6 records"

    # A restart continues the chain; so does one after kill -9.
    process.restart()
    try:
        exercise(process)
    finally:
        process.kill()
    process.restart()
    try:
        exercise(process)
    finally:
        assert process.stop() == 0
    ok = kmsctl("audit", "verify", str(directory))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.splitlines()[0] == "OK: 18 records"
    assert [r["seq"] for r in audit_records(directory)] == list(range(1, 19))

    # Tampering: delete the record in the middle, then edit one byte.
    path = audit_files(directory)[0]
    original = path.read_bytes()
    lines = original.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:8] + lines[9:]))
    broken = kmsctl("audit", "verify", str(path))
    assert broken.returncode == 1
    assert broken.stdout.startswith(f"BROKEN at {path}:9 (seq 10): seq 10 follows seq 8")
    tampered = bytearray(original)
    tampered[original.index(b'"outcome":"error"') + len('"outcome":"e')] = ord("x")
    path.write_bytes(bytes(tampered))
    broken = kmsctl("audit", "verify", str(path))
    assert broken.returncode == 1 and broken.stdout.startswith(f"BROKEN at {path}:5 (seq 5): ")


def test_kmsctl_audit_tail_follows_a_live_node(tmp_path: Path) -> None:
    data = tmp_path / "data"
    process = KmsdProcess(data).start()
    tail = None
    try:
        kms = process.stub()
        kms.GenerateRandom(pb.GenerateRandomRequest(number_of_bytes=4))
        tail = subprocess.Popen(
            [sys.executable, "-m", "kms_client.cli", "audit", "tail", str(data / "audit"), "-f"],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert tail.stdout is not None
        seen: list[str] = []
        wanted = ("GenerateRandom", "DescribeKey")
        selector = selectors.DefaultSelector()
        selector.register(tail.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        asked = False
        while time.monotonic() < deadline and not all(any(w in s for s in seen) for w in wanted):
            if selector.select(timeout=0.2):
                seen.append(tail.stdout.readline())
            if seen and not asked:
                with pytest.raises(grpc.RpcError):
                    kms.DescribeKey(pb.DescribeKeyRequest(key_id=MISSING_KEY))
                asked = True
        selector.close()
        assert any("GenerateRandom  ok" in s for s in seen), seen
        assert any("DescribeKey  ERROR NotFoundException (NOT_FOUND)" in s for s in seen), seen
    finally:
        if tail is not None:
            tail.send_signal(signal.SIGINT)
            assert tail.wait(timeout=10) == 0
            if tail.stdout is not None:
                tail.stdout.close()
        process.stop()
