"""`buf lint` (the STANDARD rules of protos/buf.yaml) passes on every .proto file.

buf comes from npm (`@bufbuild/buf`, pinned), installed once into `.venv/buf/`; the test
is skipped only when npm is missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUF_VERSION = "1.75.0"
PREFIX = REPO_ROOT / ".venv" / "buf"


def _buf() -> Path:
    buf = PREFIX / "node_modules" / ".bin" / "buf"
    installed = PREFIX / "node_modules" / "@bufbuild" / "buf" / "package.json"
    if buf.exists() and f'"version": "{BUF_VERSION}"' in installed.read_text():
        return buf
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("buf lint needs `npm` on PATH to install @bufbuild/buf")
    PREFIX.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--prefix", str(PREFIX), "--no-audit", "--no-fund",
         f"@bufbuild/buf@{BUF_VERSION}"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return buf


def test_buf_lint_passes() -> None:
    done = subprocess.run(
        [str(_buf()), "lint"],
        cwd=REPO_ROOT / "protos",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
