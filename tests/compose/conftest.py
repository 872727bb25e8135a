"""The `compose` marker, and when compose tests run.

They build Docker images and start a Docker daemon (minutes on a fresh machine), so a
plain `pytest` of the whole suite skips them; they run when asked for:

* by path:    `pytest tests/compose` (what `make compose-test` runs);
* by marker:  `pytest -m compose`;
* by the environment: `KMSD_COMPOSE_TESTS=1` (and `KMSD_COMPOSE_TESTS=0` skips them always).

`KMSD_COMPOSE_TESTS=1` also makes them required: where they cannot run (no docker,
and not root with apt-get to install it) they fail instead of skipping. CI sets it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "compose: builds the kmsd image and runs docker-compose deployments "
        "(needs root with apt-get, or a usable docker)",
    )


def _explicitly_selected(config: pytest.Config) -> bool:
    env = os.environ.get("KMSD_COMPOSE_TESTS", "")
    if env in ("0", "1"):
        return env == "1"
    markexpr = config.getoption("markexpr", default="") or ""
    if "compose" in markexpr and "not compose" not in markexpr:
        return True
    for arg in config.args:
        path = Path(arg.split("::", 1)[0])
        if not path.is_absolute():
            path = Path(config.invocation_params.dir) / path
        path = path.resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _explicitly_selected(config):
        return
    skip = pytest.mark.skip(
        reason="compose tests run only when asked for: `make compose-test`, "
        "`pytest tests/compose`, `pytest -m compose` or KMSD_COMPOSE_TESTS=1"
    )
    for item in items:
        if item.get_closest_marker("compose") is not None:
            item.add_marker(skip)
