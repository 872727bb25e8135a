"""Smoke test of the data-plane benchmark: a tiny run completes and reports every ratio.

No timing assertions: on a shared 2-core machine the figures of a 0.3 s round mean
nothing; this only checks that the command, both servers and the report work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Spelt out rather than imported: tests/ is on sys.path, and tests/bench would shadow bench.
OPERATIONS = ("Encrypt", "Decrypt", "GenerateDataKey")
TARGETS = ("kmsd", "bare")


@pytest.mark.e2e
def test_quick_run_prints_a_ratio_per_operation(tmp_path: Path) -> None:
    json_path = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.data_plane", "--quick", "--duration", "0.3",
            "--warmup", "0.1", "--rounds", "1", "--concurrency", "8", "1",
            "--json", str(json_path), "--quiet",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for op in OPERATIONS:
        for concurrency in (8, 1):
            assert f"ratio {op} c={concurrency}: " in done.stdout, done.stdout
    report = json.loads(json_path.read_text())
    results = report["results"]
    assert {(r["op"], r["concurrency"]) for r in results} == {
        (op, c) for op in OPERATIONS for c in (8, 1)
    }
    for result in results:
        for target in TARGETS:
            assert result["median"][target]["ops_per_s"] > 0
