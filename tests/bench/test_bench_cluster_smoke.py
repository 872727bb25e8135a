"""Smoke test of the cluster benchmark: a tiny run completes and reports every figure
(the --single-node and --echo-ceiling comparisons included), and the echo server
alone answers CreateKey and nothing else.

No timing assertions: on a shared 2-core machine a 0.3 s round or one failover trial
means nothing; this only checks that both clusters start, the load generator, the
failover trial and the report work. Skipped only when etcd is missing and cannot be
installed (the benchmark installs Debian's etcd-server with apt-get, which needs root
and a Debian-like system); it then exits with status 3 and says why.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
CONCURRENCY = (4, 1)
ETCD_UNAVAILABLE = 3  # bench.cluster's exit status when etcd cannot be had


@pytest.mark.e2e
@pytest.mark.slow
def test_quick_run_prints_a_ratio_per_concurrency_and_the_failover_line(tmp_path: Path) -> None:
    json_path = tmp_path / "cluster.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.cluster", "--quick", "--duration", "0.3",
            "--warmup", "0.1", "--rounds", "1", "--trials", "1", "--writers", "4",
            "--fsync-seconds", "0.2", "--concurrency", *map(str, CONCURRENCY),
            "--workdir", str(tmp_path), "--json", str(json_path), "--quiet", "--single-node",
            "--echo-ceiling",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    if done.returncode == ETCD_UNAVAILABLE:
        pytest.skip(f"etcd is not installed and could not be installed: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "disk floor: 4 KiB append + fdatasync" in out, out
    for concurrency in CONCURRENCY:
        assert f"ratio c={concurrency}: " in out, out
    failover = [line for line in out.splitlines() if line.startswith("failover: 1 trial(s)")]
    assert failover and "first successful write" in failover[0], out
    assert "failed client calls: writes" in failover[0], out
    assert "| kmsd 1 node writes/s |" in out, out  # --single-node: the unreplicated ceiling
    assert "| echo calls/s |" in out and "| kmsd 1 node / echo |" in out, out  # --echo-ceiling
    assert "| threaded echo calls/s |" in out, out
    report = json.loads(json_path.read_text())
    assert [r["concurrency"] for r in report["throughput"]] == list(CONCURRENCY)
    for row in report["throughput"]:
        for target in ("kmsd", "etcd", "kmsd-1", "echo", "echo-threads"):
            assert row["median"][target]["ops_per_s"] > 0
        assert row["single_ratio"] > 0
        assert set(row["echo_ratios"]) == {"kmsd", "etcd", "kmsd-1"}
        assert all(ratio > 0 for ratio in row["echo_ratios"].values())
        assert set(row["threaded_echo_ratios"]) == {"kmsd", "etcd", "kmsd-1"}
    assert len(report["failover"]) == 1
    assert not list(tmp_path.glob("kmsd-bench-cluster-*")), "the data directory was not removed"


@pytest.mark.e2e
@pytest.mark.parametrize("server", [[], ["--threads", "2"]], ids=["aio", "threaded"])
def test_echo_server_answers_create_key_with_an_empty_response_and_nothing_else(
    server: list[str],
) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "bench.cluster_echo", "--port", "0", *server],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            ready = re.search(r"serving on (127\.0\.0\.1:\d+)", proc.stdout.readline())
            assert ready, "no ready line"
            with grpc.insecure_channel(ready.group(1)) as channel:
                stub = pb_grpc.KeyManagementServiceStub(channel)
                request = pb.CreateKeyRequest(description="x", request_id="r")
                assert stub.CreateKey(request, timeout=10) == pb.CreateKeyResponse()
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Encrypt(pb.EncryptRequest(key_id="k", plaintext=b"p"), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
