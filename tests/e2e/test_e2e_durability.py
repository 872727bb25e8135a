"""Nothing acknowledged is lost on kill -9; a torn WAL tail is repaired; a corrupt
record in the middle of the WAL stops the node with a clear error."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

from kmsd_process import KmsdProcess

WRITERS = 8


def _segments(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("log/**/wal-*.log"))


def _write_until_killed(process: KmsdProcess, seed: int) -> set[str]:
    """Concurrent CreateKey calls; SIGKILL after a seeded number of acks. Returns acked ids."""
    rng = random.Random(seed)
    kill_after = rng.randint(40, 120)
    acked: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    channel = process.channel()

    def writer(n: int) -> None:
        stub = pb_grpc.KeyManagementServiceStub(channel)
        i = 0
        while not stop.is_set():
            i += 1
            try:
                key = stub.CreateKey(
                    pb.CreateKeyRequest(description=f"w{n}-{i}"), timeout=5
                ).key_metadata
            except grpc.RpcError:
                return  # the process is gone: unacknowledged writes may or may not exist
            with lock:
                acked.add(key.key_id)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with lock:
            if len(acked) >= kill_after:
                break
        time.sleep(0.001)  # a pacing tick for the poll loop, not a wait for state
    process.kill()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    channel.close()
    with lock:
        return set(acked)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_acknowledged_keys_survive_sigkill(tmp_path: Path, seed: int) -> None:
    print(f"durability seed={seed}")
    process = KmsdProcess(tmp_path / f"data-{seed}").start()
    acked = _write_until_killed(process, seed)
    assert len(acked) >= 40
    process.restart()
    try:
        stub = process.stub()
        for key_id in acked:
            meta = stub.DescribeKey(pb.DescribeKeyRequest(key_id=key_id)).key_metadata
            assert meta.key_id == key_id
        # Material is intact, not only metadata.
        some = sorted(acked)[0]
        blob = stub.Encrypt(pb.EncryptRequest(key_id=some, plaintext=b"x")).ciphertext_blob
        assert stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob)).plaintext == b"x"
    finally:
        process.stop()


def test_torn_tail_is_repaired(tmp_path: Path) -> None:
    process = KmsdProcess(tmp_path / "data").start()
    stub = process.stub()
    keys = [stub.CreateKey(pb.CreateKeyRequest()).key_metadata.key_id for _ in range(5)]
    process.kill()
    last = _segments(process.data_dir)[-1]
    with last.open("ab") as wal:
        wal.write(b"\x40\x00\x00\x00\x12\x34")  # a record header whose payload never arrived
    process.restart()
    try:
        stub = process.stub()
        for key_id in keys:
            assert stub.DescribeKey(pb.DescribeKeyRequest(key_id=key_id)).key_metadata.key_id
        stub.CreateKey(pb.CreateKeyRequest())  # and it keeps accepting writes
    finally:
        process.stop()
    assert "repaired" in process.log_path.read_text()


def test_corrupt_middle_record_refuses_to_start(tmp_path: Path) -> None:
    process = KmsdProcess(tmp_path / "data").start()
    stub = process.stub()
    for _ in range(5):
        stub.CreateKey(pb.CreateKeyRequest())
    process.stop()
    segment = _segments(process.data_dir)[0]
    data = bytearray(segment.read_bytes())
    data[len(data) // 3] ^= 0xFF
    segment.write_bytes(bytes(data))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kmsd",
            "dev",
            "--nodes",
            "1",
            "--data-dir",
            str(process.data_dir),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 1
    assert "corrupt" in result.stderr.lower()
    assert segment.name in result.stderr
