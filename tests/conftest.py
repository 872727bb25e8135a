"""Shared fixtures: a real kmsd process per test module, and seeded helpers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kmsd_process import KmsdProcess  # noqa: E402

pytest_plugins = ["secret_scan"]


@pytest.fixture(scope="module")
def kmsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsdProcess]:
    """A running `kmsd dev` process shared by the tests of one module."""
    process = KmsdProcess(tmp_path_factory.mktemp("kmsd") / "data").start()
    yield process
    process.stop()
