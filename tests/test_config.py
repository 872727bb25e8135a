"""Configuration: every option validated at start, errors name the option."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kmsd.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_loads() -> None:
    config = load_config(ROOT / "deploy" / "kmsd.example.toml")
    assert config.listen == "127.0.0.1:7400"
    assert config.seal_path == Path("/var/lib/kmsd/root.key")


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({}, "[node].data_dir"),
        ({"node": {"data_dir": "d", "listen": "nowhere"}}, "[node].listen"),
        ({"node": {"data_dir": "d", "port": 1}}, "[node].port"),
        ({"nodes": {}}, "[nodes]"),
        ({"node": {"data_dir": 5}}, "[node].data_dir"),
        ({"node": {"data_dir": "d"}, "seal": {"type": "vault"}}, "[seal].type"),
        ({"node": {"data_dir": "d"}, "cluster": {"account": "12"}}, "[cluster].account"),
        ({"node": {"data_dir": "d"}, "log": {"snapshot_every": 0}}, "[log].snapshot_every"),
        ({"node": {"data_dir": "d"}, "log": {"snapshot_every": True}}, "[log].snapshot_every"),
        ({"node": {"data_dir": "d", "log_level": "LOUD"}}, "[node].log_level"),
    ],
)
def test_bad_config_names_the_option(raw: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(raw)  # type: ignore[arg-type]


def test_serve_with_bad_config_fails_at_start(tmp_path: Path) -> None:
    path = tmp_path / "kmsd.toml"
    path.write_text('[node]\ndata_dir = "d"\nlisten = "127.0.0.1:99999"\n')
    result = subprocess.run(
        [sys.executable, "-m", "kmsd", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "[node].listen" in result.stderr
