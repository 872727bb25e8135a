"""The `kmsd` entry point: gRPC's experiment flags are set before gRPC loads, are known
to the installed gRPC, and give way to the operator's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kmsd.launch import GRPC_EXPERIMENTS, prefer_grpc_settings

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


def test_the_flags_are_set_unless_the_operator_chose() -> None:
    environ: dict[str, str] = {}
    prefer_grpc_settings(environ)
    assert environ == {"GRPC_EXPERIMENTS": GRPC_EXPERIMENTS}
    chosen = {"GRPC_EXPERIMENTS": ""}  # empty: gRPC's own defaults
    prefer_grpc_settings(chosen)
    assert chosen == {"GRPC_EXPERIMENTS": ""}


def test_the_entry_point_sets_them_before_grpc_is_imported() -> None:
    done = _python(
        "import sys, kmsd.launch\n"
        "assert 'grpc' not in sys.modules, 'kmsd.launch imported grpc'\n"
        "kmsd.launch.prefer_grpc_settings()\n"
        "import os; print(os.environ['GRPC_EXPERIMENTS'])\n",
        env={k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == GRPC_EXPERIMENTS


def test_the_installed_grpc_knows_every_flag() -> None:
    # gRPC logs "Unknown experiment" (and ignores the flag) for a name it does not
    # know, as a newer gRPC may: this catches an upgrade that silently undoes them.
    env = {"GRPC_EXPERIMENTS": GRPC_EXPERIMENTS, "PATH": "/usr/bin:/bin"}
    done = _python(
        "import asyncio, grpc, grpc.aio\n"
        "async def main():\n"
        "    server = grpc.aio.server()\n"
        "    port = server.add_insecure_port('127.0.0.1:0')\n"
        "    await server.start()\n"
        "    async with grpc.aio.insecure_channel(f'127.0.0.1:{port}') as channel:\n"
        "        await asyncio.wait_for(channel.channel_ready(), 10)\n"
        "    await server.stop(None)\n"
        "asyncio.run(main())\n",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "experiment" not in done.stderr.lower(), done.stderr


def test_python_m_kmsd_runs_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kmsd", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout
