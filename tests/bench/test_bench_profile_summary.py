"""`bench.cluster_profile.summarize`: samples are charged to the kmsd component nearest
the top of the stack, whatever entry point (`kmsd.launch`, `kmsd.cli`) is below them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ROOT = "/work/x/.venv/lib/python3.11"


def summarize(path: Path) -> str:
    # `bench` is the repository's top-level package, not importable from the tests.
    done = subprocess.run(
        [
            sys.executable, "-c",
            "import sys; from pathlib import Path; from bench.cluster_profile import summarize;"
            " print(summarize(Path(sys.argv[1])))",
            str(path),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def _stack(*frames: str) -> str:
    return ";".join(frames)


def test_samples_go_to_the_component_nearest_the_top(tmp_path: Path) -> None:
    entry = (
        f"_run_module_as_main ({ROOT}/runpy.py:198)",
        "<module> (/src/kmsd/__main__.py:7)",
        "main (/src/kmsd/launch.py:38)",
        "main (/src/kmsd/cli.py:260)",
        f"run ({ROOT}/asyncio/runners.py:118)",
    )
    lines = [
        _stack(*entry, "_run (/src/kmsd/log/raft_log.py:550)", "step (/src/kmsd/raft/core.py:90)")
        + " 6",
        _stack(*entry, "create_key (/src/kmsd/service/keys.py:70)") + " 3",
        _stack(*entry, f"_run ({ROOT}/asyncio/events.py:84)") + " 1",
    ]
    path = tmp_path / "node.txt"
    path.write_text("\n".join(lines) + "\n")
    summary = summarize(path)
    assert "10 samples" in summary
    assert " 60.0 %  Raft core" in summary
    assert " 30.0 %  request handling (api, service, fsm, crypto)" in summary
    assert " 10.0 %  asyncio, threads and other Python" in summary
