"""Node configuration: a TOML file, parsed into frozen dataclasses and validated at start.

Every option is documented in docs/configuration.md. A bad file fails at start
with a message naming the option (`ConfigError: [seal].path: ...`), never later.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "111122223333"


class ConfigError(Exception):
    """The configuration is invalid; the message names the option."""


@dataclass(frozen=True)
class SealConfig:
    """Where the root key comes from."""

    type: str = "file"
    path: Path = Path("root.key")


@dataclass(frozen=True)
class Config:
    """A kmsd node's configuration."""

    data_dir: Path
    listen: str = "127.0.0.1:7400"
    region: str = DEFAULT_REGION
    account: str = DEFAULT_ACCOUNT
    seal: SealConfig = field(default_factory=SealConfig)
    snapshot_every: int = 10_000
    scheduler_interval_seconds: float = 60.0
    log_level: str = "INFO"

    @property
    def seal_path(self) -> Path:
        """The seal file, relative paths taken from data_dir."""
        return self.seal.path if self.seal.path.is_absolute() else self.data_dir / self.seal.path


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "node": {"data_dir": str, "listen": str, "log_level": str},
    "cluster": {"region": str, "account": str},
    "seal": {"type": str, "path": str},
    "log": {"snapshot_every": int},
    "scheduler": {"interval_seconds": (int, float)},
}


def load_config(path: Path) -> Config:
    """Reads and validates a TOML config file."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from error
    return config_from_dict(raw, base_dir=path.parent)


def config_from_dict(raw: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Validates a parsed config table; relative data_dir is taken from base_dir."""
    for section, table in raw.items():
        if section not in _SCHEMA:
            raise ConfigError(f"[{section}]: unknown section (known: {', '.join(_SCHEMA)})")
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}]: must be a table")
        for name, value in table.items():
            expected = _SCHEMA[section].get(name)
            if expected is None:
                raise ConfigError(f"[{section}].{name}: unknown option")
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ConfigError(f"[{section}].{name}: wrong type {type(value).__name__}")
    node = raw.get("node", {})
    if "data_dir" not in node:
        raise ConfigError("[node].data_dir: required")
    data_dir = Path(node["data_dir"])
    config = Config(
        data_dir=data_dir if data_dir.is_absolute() else base_dir / data_dir,
        listen=node.get("listen", Config.listen),
        log_level=node.get("log_level", Config.log_level),
        region=raw.get("cluster", {}).get("region", DEFAULT_REGION),
        account=raw.get("cluster", {}).get("account", DEFAULT_ACCOUNT),
        seal=SealConfig(
            type=raw.get("seal", {}).get("type", "file"),
            path=Path(raw.get("seal", {}).get("path", "root.key")),
        ),
        snapshot_every=raw.get("log", {}).get("snapshot_every", 10_000),
        scheduler_interval_seconds=float(raw.get("scheduler", {}).get("interval_seconds", 60.0)),
    )
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks values (not just types); raises ConfigError naming the option."""
    host, sep, port = config.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"[node].listen: '{config.listen}' is not host:port")
    if config.seal.type != "file":
        raise ConfigError(f"[seal].type: '{config.seal.type}' is not supported (supported: file)")
    if not config.region or ":" in config.region:
        raise ConfigError(f"[cluster].region: '{config.region}' is not a region name")
    if not (config.account.isdigit() and len(config.account) == 12):
        raise ConfigError(f"[cluster].account: '{config.account}' is not a 12-digit account id")
    if config.snapshot_every < 1:
        raise ConfigError("[log].snapshot_every: must be at least 1")
    if config.scheduler_interval_seconds <= 0:
        raise ConfigError("[scheduler].interval_seconds: must be positive")
    if config.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"[node].log_level: '{config.log_level}' is not DEBUG/INFO/WARNING/ERROR")
