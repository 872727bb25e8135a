"""Node configuration: a TOML file, parsed into frozen dataclasses and validated at start.

Every option is documented in docs/configuration.md. A bad file fails at start
with a message naming the option (`[seal].path: ...`), never later.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "111122223333"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(Exception):
    """The configuration is invalid; the message names the option."""


@dataclass(frozen=True)
class SealConfig:
    """Where the root key comes from: a file, or an HSM through PKCS#11 (docs/hsm.md)."""

    type: str = "file"
    path: Path = Path("root.key")
    # type = "pkcs11" only:
    module: str = ""
    token_label: str = ""
    key_label: str = ""
    pin_file: Path | None = None
    pin_env: str = ""
    create_key: bool = False


@dataclass(frozen=True)
class MemberConfig:
    """One founding member of a cluster."""

    id: int
    peer_address: str
    client_address: str
    # The identity (URI SAN, else CN) its peer certificate must carry; "" means the
    # default `spiffe://<cluster.id>/node/<id>` (docs/security.md).
    principal: str = ""


@dataclass(frozen=True)
class RaftConfig:
    """Raft timing (see docs/configuration.md for the trade-offs)."""

    tick_ms: int = 50
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    request_timeout_seconds: float = 5.0
    max_staleness_ms: int = 500


@dataclass(frozen=True)
class AuditConfig:
    """The audit trail (docs/audit.md)."""

    enabled: bool = True
    path: Path | None = None
    max_file_bytes: int = 64 * 1024 * 1024
    fsync: bool = True


@dataclass(frozen=True)
class AuthConfig:
    """Who may do what (docs/security.md). Principals are the identities mutual TLS
    gives callers: a client certificate's URI SAN, else its subject CN."""

    # False turns authorization off entirely (benchmarks, migrations): every caller
    # may do everything. Logged loudly at start.
    enabled: bool = True
    # Full access to every key whatever its policy allows (AWS: the account's root and
    # IAM administrators), except what a key policy explicitly denies them; the
    # principals `arn:aws:iam::<account>:root` names.
    administrators: tuple[str, ...] = ()
    # May call ClusterService (status, add/remove member, transfer leadership).
    operators: tuple[str, ...] = ()
    # May call the account-level operations that name no existing key (CreateKey,
    # ListKeys, ListAliases, GenerateRandom); fnmatch-style patterns, "*" for anyone
    # authenticated.
    key_creators: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS for clients and peers (docs/security.md). Relative paths are taken
    from data_dir; the files are re-read without a restart when they change."""

    cert_file: Path | None = None  # this node's certificate chain (PEM)
    key_file: Path | None = None  # its private key (PEM)
    ca_file: Path | None = None  # the CA(s) client and peer certificates must chain to
    # True serves plaintext gRPC, without authentication: loopback addresses only.
    plaintext: bool = False
    reload_interval_seconds: float = 5.0


@dataclass(frozen=True)
class LimitsConfig:
    """Per-principal request rate limiting (ThrottlingException when exceeded)."""

    # Token bucket per principal: refilled at requests_per_second, holding at most
    # burst. 0 turns rate limiting off.
    requests_per_second: float = 5000.0
    burst: int = 10000


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
    audit: AuditConfig = field(default_factory=AuditConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)

    def tls_path(self, path: Path) -> Path:
        """A [tls] file, relative paths taken from data_dir."""
        return path if path.is_absolute() else self.data_dir / path

    @property
    def clustered(self) -> bool:
        """True when the node replicates through Raft (members listed, or joining)."""
        return bool(self.members) or self.join

    @property
    def seal_path(self) -> Path:
        """The seal file, relative paths taken from data_dir."""
        return self.seal.path if self.seal.path.is_absolute() else self.data_dir / self.seal.path

    @property
    def audit_dir(self) -> Path:
        """The audit log's directory: `[audit].path`, relative paths taken from data_dir;
        default `<data_dir>/audit`."""
        path = self.audit.path or Path("audit")
        return path if path.is_absolute() else self.data_dir / path

    @property
    def seal_pin_file(self) -> Path | None:
        """The pkcs11 seal's PIN file, relative paths taken from data_dir."""
        pin_file = self.seal.pin_file
        if pin_file is None or pin_file.is_absolute():
            return pin_file
        return self.data_dir / pin_file


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
    "seal": {
        "type": str,
        "path": str,
        "module": str,
        "token_label": str,
        "key_label": str,
        "pin_file": str,
        "pin_env": str,
        "create_key": bool,
    },
    "log": {"snapshot_every": int},
    "scheduler": {"interval_seconds": (int, float)},
    "audit": {"enabled": bool, "path": str, "max_file_bytes": int, "fsync": bool},
    "auth": {"enabled": bool, "administrators": list, "operators": list, "key_creators": list},
    "limits": {"requests_per_second": (int, float), "burst": int},
    "tls": {
        "cert_file": str,
        "key_file": str,
        "ca_file": str,
        "plaintext": bool,
        "reload_interval_seconds": (int, float),
    },
}
_MEMBER_SCHEMA: dict[str, _Types] = {
    "id": int,
    "peer_address": str,
    "client_address": str,
    "principal": str,
}
_MEMBER_REQUIRED = ("id", "peer_address", "client_address")


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
        for name in _MEMBER_REQUIRED:
            if name not in table:
                raise ConfigError(f"{where}.{name}: required")
        if table.get("principal") == "":
            raise ConfigError(f"{where}.principal: must not be empty (omit it for the default)")
        members.append(
            MemberConfig(
                table["id"],
                table["peer_address"],
                table["client_address"],
                table.get("principal", ""),
            )
        )
    return tuple(members)


_FILE_SEAL_OPTIONS = ("path",)
_PKCS11_SEAL_OPTIONS = ("module", "token_label", "key_label", "pin_file", "pin_env", "create_key")


def _seal(table: dict[str, Any]) -> SealConfig:
    seal_type = table.get("type", "file")
    own = {"file": _FILE_SEAL_OPTIONS, "pkcs11": _PKCS11_SEAL_OPTIONS}.get(seal_type)
    for name in (*_FILE_SEAL_OPTIONS, *_PKCS11_SEAL_OPTIONS):
        if own is not None and name in table and name not in own:
            raise ConfigError(f'[seal].{name}: not an option of [seal].type = "{seal_type}"')
    if table.get("pin_file") == "":
        raise ConfigError("[seal].pin_file: must not be empty")
    return SealConfig(
        type=seal_type,
        path=Path(table.get("path", "root.key")),
        module=table.get("module", ""),
        token_label=table.get("token_label", ""),
        key_label=table.get("key_label", ""),
        pin_file=Path(table["pin_file"]) if "pin_file" in table else None,
        pin_env=table.get("pin_env", ""),
        create_key=table.get("create_key", False),
    )


def _audit(table: dict[str, Any]) -> AuditConfig:
    if table.get("path") == "":
        raise ConfigError("[audit].path: must not be empty")
    return AuditConfig(
        enabled=table.get("enabled", True),
        path=Path(table["path"]) if "path" in table else None,
        max_file_bytes=table.get("max_file_bytes", AuditConfig.max_file_bytes),
        fsync=table.get("fsync", True),
    )


def _principals(option: str, value: Any) -> tuple[str, ...]:
    if not all(isinstance(item, str) and item for item in value):
        raise ConfigError(f"{option}: must be a list of non-empty principal strings")
    return tuple(value)


def _auth(table: dict[str, Any]) -> AuthConfig:
    return AuthConfig(
        enabled=table.get("enabled", True),
        administrators=_principals("[auth].administrators", table.get("administrators", [])),
        operators=_principals("[auth].operators", table.get("operators", [])),
        key_creators=_principals(
            "[auth].key_creators", table.get("key_creators", list(AuthConfig.key_creators))
        ),
    )


def _tls(table: dict[str, Any]) -> TlsConfig:
    for name in ("cert_file", "key_file", "ca_file"):
        if table.get(name) == "":
            raise ConfigError(f"[tls].{name}: must not be empty")
    return TlsConfig(
        cert_file=Path(table["cert_file"]) if "cert_file" in table else None,
        key_file=Path(table["key_file"]) if "key_file" in table else None,
        ca_file=Path(table["ca_file"]) if "ca_file" in table else None,
        plaintext=table.get("plaintext", False),
        reload_interval_seconds=float(
            table.get("reload_interval_seconds", TlsConfig.reload_interval_seconds)
        ),
    )


def _limits(table: dict[str, Any]) -> LimitsConfig:
    limits = LimitsConfig(
        requests_per_second=float(
            table.get("requests_per_second", LimitsConfig.requests_per_second)
        ),
        burst=table.get("burst", LimitsConfig.burst),
    )
    if limits.requests_per_second < 0:
        raise ConfigError("[limits].requests_per_second: must not be negative (0 turns it off)")
    if limits.burst < 1:
        raise ConfigError("[limits].burst: must be at least 1")
    return limits


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
        seal=_seal(raw.get("seal", {})),
        snapshot_every=raw.get("log", {}).get("snapshot_every", 10_000),
        scheduler_interval_seconds=float(raw.get("scheduler", {}).get("interval_seconds", 60.0)),
        audit=_audit(raw.get("audit", {})),
        auth=_auth(raw.get("auth", {})),
        limits=_limits(raw.get("limits", {})),
        tls=_tls(raw.get("tls", {})),
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


def _validate_pkcs11_seal(seal: SealConfig) -> None:
    where = '[seal].type = "pkcs11"'
    if not seal.module:
        raise ConfigError(
            f"[seal].module: required with {where} (the HSM's PKCS#11 library, "
            "e.g. /usr/lib/softhsm/libsofthsm2.so)"
        )
    if not seal.token_label:
        raise ConfigError(f"[seal].token_label: required with {where}")
    if len(seal.token_label.encode("utf-8")) > 32:
        raise ConfigError("[seal].token_label: a PKCS#11 token label is at most 32 bytes")
    if not seal.key_label:
        raise ConfigError(f"[seal].key_label: required with {where}")
    if (seal.pin_file is None) == (not seal.pin_env):
        raise ConfigError(
            f"[seal].pin_file: set exactly one of pin_file and pin_env with {where} "
            "(the PIN is never taken from the command line)"
        )
    if seal.pin_env and not _ENV_NAME.fullmatch(seal.pin_env):
        raise ConfigError(f"[seal].pin_env: '{seal.pin_env}' is not an environment variable name")


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost (the hosts plaintext may listen on)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate_tls(config: Config) -> None:
    tls = config.tls
    if tls.reload_interval_seconds < 0:
        raise ConfigError("[tls].reload_interval_seconds: must not be negative")
    if tls.plaintext:
        for option, address in (
            ("[node].listen", config.listen),
            ("[node].peer_listen", config.peer_listen),
        ):
            if address and not is_loopback_host(address.rpartition(":")[0]):
                raise ConfigError(
                    f"[tls].plaintext: refused, {option} '{address}' is not a loopback "
                    "address (plaintext has no authentication: 127.0.0.1, ::1 or localhost only)"
                )
        return
    for option, value in (
        ("cert_file", tls.cert_file),
        ("key_file", tls.key_file),
        ("ca_file", tls.ca_file),
    ):
        if value is None:
            raise ConfigError(
                f"[tls].{option}: required (mutual TLS: cert_file, key_file and ca_file; "
                "or plaintext = true on loopback only)"
            )


def validate(config: Config) -> None:
    """Checks values (not just types); raises ConfigError naming the option."""
    _address("[node].listen", config.listen)
    _validate_cluster(config)
    if config.seal.type not in ("file", "pkcs11"):
        raise ConfigError(
            f"[seal].type: '{config.seal.type}' is not supported (supported: file, pkcs11)"
        )
    if config.seal.type == "pkcs11":
        _validate_pkcs11_seal(config.seal)
    if not config.region or ":" in config.region:
        raise ConfigError(f"[cluster].region: '{config.region}' is not a region name")
    if not (config.account.isdigit() and len(config.account) == 12):
        raise ConfigError(f"[cluster].account: '{config.account}' is not a 12-digit account id")
    if config.audit.max_file_bytes < 4096:
        raise ConfigError("[audit].max_file_bytes: must be at least 4096")
    if config.snapshot_every < 1:
        raise ConfigError("[log].snapshot_every: must be at least 1")
    if config.scheduler_interval_seconds <= 0:
        raise ConfigError("[scheduler].interval_seconds: must be positive")
    if config.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"[node].log_level: '{config.log_level}' is not DEBUG/INFO/WARNING/ERROR")
    _validate_tls(config)
