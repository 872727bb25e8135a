"""Node configuration: a TOML file, parsed into frozen dataclasses and validated at start.

Every option is documented in docs/configuration.md. A bad file fails at start
with a message naming the option (`[seal].path: ...`), never later.
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
class MemberConfig:
    """One founding member of a cluster."""

    id: int
    peer_address: str
    client_address: str


@dataclass(frozen=True)
class RaftConfig:
    """Raft timing (see docs/configuration.md for the trade-offs)."""

    tick_ms: int = 100
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    request_timeout_seconds: float = 5.0
    max_staleness_ms: int = 500


@dataclass(frozen=True)
class Config:
    """A kmsd node's configuration."""

    data_dir: Path
    listen: str = "127.0.0.1:7400"
    node_id: int = 1
    peer_listen: str = ""
    join: bool = False
    cluster_id: str = "kmsd"
    members: tuple[MemberConfig, ...] = ()
    raft: RaftConfig = field(default_factory=RaftConfig)
    region: str = DEFAULT_REGION
    account: str = DEFAULT_ACCOUNT
    seal: SealConfig = field(default_factory=SealConfig)
    snapshot_every: int = 10_000
    scheduler_interval_seconds: float = 60.0
    log_level: str = "INFO"

    @property
    def clustered(self) -> bool:
        """True when the node replicates through Raft (members listed, or joining)."""
        return bool(self.members) or self.join

    @property
    def seal_path(self) -> Path:
        """The seal file, relative paths taken from data_dir."""
        return self.seal.path if self.seal.path.is_absolute() else self.data_dir / self.seal.path


_Types = type | tuple[type, ...]
_SCHEMA: dict[str, dict[str, _Types]] = {
    "node": {
        "data_dir": str,
        "listen": str,
        "log_level": str,
        "id": int,
        "peer_listen": str,
        "join": bool,
    },
    "cluster": {"region": str, "account": str, "id": str, "members": list},
    "raft": {
        "tick_ms": int,
        "election_ticks": int,
        "heartbeat_ticks": int,
        "request_timeout_seconds": (int, float),
        "max_staleness_ms": int,
    },
    "seal": {"type": str, "path": str},
    "log": {"snapshot_every": int},
    "scheduler": {"interval_seconds": (int, float)},
}
_MEMBER_SCHEMA: dict[str, _Types] = {"id": int, "peer_address": str, "client_address": str}


def load_config(path: Path) -> Config:
    """Reads and validates a TOML config file."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from error
    return config_from_dict(raw, base_dir=path.parent)


def _check_types(where: str, table: dict[str, Any], schema: dict[str, _Types]) -> None:
    for name, value in table.items():
        expected = schema.get(name)
        if expected is None:
            raise ConfigError(f"{where}.{name}: unknown option")
        wants_bool = expected is bool
        if isinstance(value, bool) != wants_bool or not isinstance(value, expected):
            raise ConfigError(f"{where}.{name}: wrong type {type(value).__name__}")


def _members(raw: list[Any]) -> tuple[MemberConfig, ...]:
    members = []
    for position, table in enumerate(raw):
        where = f"[[cluster.members]] #{position + 1}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        _check_types(where, table, _MEMBER_SCHEMA)
        for name in _MEMBER_SCHEMA:
            if name not in table:
                raise ConfigError(f"{where}.{name}: required")
        members.append(MemberConfig(table["id"], table["peer_address"], table["client_address"]))
    return tuple(members)


def config_from_dict(raw: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Validates a parsed config table; relative data_dir is taken from base_dir."""
    for section, table in raw.items():
        if section not in _SCHEMA:
            raise ConfigError(f"[{section}]: unknown section (known: {', '.join(_SCHEMA)})")
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}]: must be a table")
        _check_types(f"[{section}]", table, _SCHEMA[section])
    node = raw.get("node", {})
    cluster = raw.get("cluster", {})
    raft = raw.get("raft", {})
    if "data_dir" not in node:
        raise ConfigError("[node].data_dir: required")
    data_dir = Path(node["data_dir"])
    config = Config(
        data_dir=data_dir if data_dir.is_absolute() else base_dir / data_dir,
        listen=node.get("listen", Config.listen),
        node_id=node.get("id", 1),
        peer_listen=node.get("peer_listen", ""),
        join=node.get("join", False),
        log_level=node.get("log_level", Config.log_level),
        cluster_id=cluster.get("id", Config.cluster_id),
        members=_members(cluster.get("members", [])),
        raft=RaftConfig(
            tick_ms=raft.get("tick_ms", RaftConfig.tick_ms),
            election_ticks=raft.get("election_ticks", RaftConfig.election_ticks),
            heartbeat_ticks=raft.get("heartbeat_ticks", RaftConfig.heartbeat_ticks),
            request_timeout_seconds=float(
                raft.get("request_timeout_seconds", RaftConfig.request_timeout_seconds)
            ),
            max_staleness_ms=raft.get("max_staleness_ms", RaftConfig.max_staleness_ms),
        ),
        region=cluster.get("region", DEFAULT_REGION),
        account=cluster.get("account", DEFAULT_ACCOUNT),
        seal=SealConfig(
            type=raw.get("seal", {}).get("type", "file"),
            path=Path(raw.get("seal", {}).get("path", "root.key")),
        ),
        snapshot_every=raw.get("log", {}).get("snapshot_every", 10_000),
        scheduler_interval_seconds=float(raw.get("scheduler", {}).get("interval_seconds", 60.0)),
    )
    validate(config)
    return config


def _address(option: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{option}: '{value}' is not host:port")


def _validate_cluster(config: Config) -> None:
    if config.node_id < 1:
        raise ConfigError("[node].id: must be a positive integer (unique, never reused)")
    if not config.clustered:
        if config.peer_listen:
            raise ConfigError("[node].peer_listen: needs [[cluster.members]] or [node].join")
        return
    if not config.peer_listen:
        raise ConfigError("[node].peer_listen: required in a cluster")
    _address("[node].peer_listen", config.peer_listen)
    if not config.cluster_id:
        raise ConfigError("[cluster].id: must not be empty")
    ids = [m.id for m in config.members]
    if len(set(ids)) != len(ids):
        raise ConfigError("[[cluster.members]].id: ids must be unique")
    for member in config.members:
        if member.id < 1:
            raise ConfigError("[[cluster.members]].id: must be a positive integer")
        _address("[[cluster.members]].peer_address", member.peer_address)
        _address("[[cluster.members]].client_address", member.client_address)
    if config.members and not config.join and config.node_id not in ids:
        raise ConfigError(f"[node].id: {config.node_id} is not among [[cluster.members]]")
    if config.join and config.node_id in ids:
        raise ConfigError(f"[node].join: node {config.node_id} is a founding member already")
    if config.join and not config.members:
        raise ConfigError(
            "[[cluster.members]]: a joining node needs the current members' addresses"
        )
    raft = config.raft
    if raft.tick_ms < 1:
        raise ConfigError("[raft].tick_ms: must be at least 1")
    if raft.heartbeat_ticks < 1:
        raise ConfigError("[raft].heartbeat_ticks: must be at least 1")
    if raft.election_ticks <= raft.heartbeat_ticks:
        raise ConfigError("[raft].election_ticks: must be greater than heartbeat_ticks")
    if raft.request_timeout_seconds <= 0:
        raise ConfigError("[raft].request_timeout_seconds: must be positive")
    if raft.max_staleness_ms < 0:
        raise ConfigError("[raft].max_staleness_ms: must not be negative")


def validate(config: Config) -> None:
    """Checks values (not just types); raises ConfigError naming the option."""
    _address("[node].listen", config.listen)
    _validate_cluster(config)
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
