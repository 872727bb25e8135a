"""The [audit] section of the node configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmsd.config import AuditConfig, ConfigError, config_from_dict


def config(audit: dict[str, object]) -> dict[str, object]:
    return {"node": {"data_dir": "/var/lib/kmsd"}, "audit": audit, "tls": {"plaintext": True}}


def test_defaults() -> None:
    parsed = config_from_dict({"node": {"data_dir": "/var/lib/kmsd"}, "tls": {"plaintext": True}})
    assert parsed.audit == AuditConfig(enabled=True, path=None, max_file_bytes=64 << 20, fsync=True)
    assert parsed.audit_dir == Path("/var/lib/kmsd/audit")


def test_options() -> None:
    parsed = config_from_dict(
        config({"enabled": False, "path": "trail", "max_file_bytes": 4096, "fsync": False})
    )
    assert parsed.audit == AuditConfig(False, Path("trail"), 4096, False)
    assert parsed.audit_dir == Path("/var/lib/kmsd/trail")
    assert config_from_dict(config({"path": "/logs/kms"})).audit_dir == Path("/logs/kms")


@pytest.mark.parametrize(
    ("audit", "message"),
    [
        ({"max_file_bytes": 100}, r"\[audit\].max_file_bytes: must be at least 4096"),
        ({"enabled": "yes"}, r"\[audit\].enabled: wrong type str"),
        ({"fsync": 1}, r"\[audit\].fsync: wrong type int"),
        ({"path": ""}, r"\[audit\].path: must not be empty"),
        ({"rotate": 1}, r"\[audit\].rotate: unknown option"),
    ],
)
def test_bad_values_name_the_option(audit: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(config(audit))
