"""Smoke test of `bench.write_latency`: a tiny A/B of two single-node variants (the same
tree, one with the audit trail off) completes and reports both, with a ratio.

No timing assertions: a 0.3 s round on a shared machine means nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_two_variants_are_measured_side_by_side(tmp_path: Path) -> None:
    json_path = tmp_path / "latency.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.write_latency", "--single-node", "--rounds", "2",
            "--duration", "0.3", "--warmup", "0.1", "--workdir", str(tmp_path),
            "--json", str(json_path), "--variant", "on=.",
            "--variant", "off=.:[audit]\\nenabled = false",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| o")]
    assert [row.split("|")[1].strip() for row in rows] == ["on", "off"], done.stdout
    assert rows[0].split("|")[5].strip() == "1.000", done.stdout  # the first is the baseline
    figures = json.loads(json_path.read_text())["variants"]
    assert [len(figures[v]["round_means_ms"]) for v in ("on", "off")] == [2, 2]
    assert all(figures[v]["calls"] > 0 for v in ("on", "off"))
    assert figures["off"]["extra_config"] == "\n[audit]\nenabled = false\n"
    assert not list(tmp_path.glob("kmsd-bench-latency-*"))  # the clusters were removed
