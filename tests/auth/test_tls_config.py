"""The [tls] section and `[[cluster.members]].principal`: mutual TLS unless plaintext is
asked for, and plaintext refused unless every listen address is loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kmsd.auth.tls import PeerTls, ServerTls, TlsFiles
from kmsd.config import ConfigError, TlsConfig, config_from_dict, is_loopback_host, load_config

FILES = {"cert_file": "tls/node.crt", "key_file": "tls/node.key", "ca_file": "/etc/ca.crt"}


def raw(node: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    return {"node": {"data_dir": "/var/lib/kmsd", **(node or {})}, **sections}


def test_files_are_required_without_plaintext() -> None:
    with pytest.raises(ConfigError, match=r"\[tls\].cert_file: required .*plaintext = true"):
        config_from_dict(raw())
    with pytest.raises(ConfigError, match=r"\[tls\].ca_file: required"):
        config_from_dict(raw(tls={"cert_file": "a", "key_file": "b"}))


def test_files_relative_to_data_dir() -> None:
    config = config_from_dict(raw(tls={**FILES, "reload_interval_seconds": 1}))
    assert config.tls == TlsConfig(
        Path("tls/node.crt"), Path("tls/node.key"), Path("/etc/ca.crt"), False, 1.0
    )
    assert TlsFiles.from_config(config) == TlsFiles(
        Path("/var/lib/kmsd/tls/node.crt"), Path("/var/lib/kmsd/tls/node.key"), Path("/etc/ca.crt")
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.8.7", "[::1]", "localhost", "LOCALHOST"])
def test_plaintext_on_loopback_is_allowed(host: str) -> None:
    assert is_loopback_host(host)
    config = config_from_dict(raw({"listen": f"{host}:7400"}, tls={"plaintext": True}))
    assert config.tls.plaintext
    assert TlsFiles.from_config(config) is None
    assert ServerTls.from_config(config) is None and PeerTls.from_config(config) is None


@pytest.mark.parametrize(
    ("node", "option"),
    [
        ({"listen": "0.0.0.0:7400"}, "[node].listen '0.0.0.0:7400'"),
        ({"listen": "10.0.0.5:7400"}, "[node].listen"),
        ({"listen": "[::]:7400"}, "[node].listen"),
        ({"listen": "kms-a:7400"}, "[node].listen"),
        ({"listen": "127.0.0.1.example.com:7400"}, "[node].listen"),
        (
            {"id": 1, "peer_listen": "0.0.0.0:7500"},
            "[node].peer_listen '0.0.0.0:7500'",
        ),
    ],
)
def test_plaintext_elsewhere_is_refused(node: dict[str, Any], option: str) -> None:
    cluster = {}
    if "peer_listen" in node:
        member = {"id": 1, "peer_address": "127.0.0.1:7500", "client_address": "127.0.0.1:7400"}
        cluster = {"cluster": {"members": [member]}}
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw(node, tls={"plaintext": True}, **cluster))
    message = str(error.value)
    assert message.startswith("[tls].plaintext: refused") and option in message


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"plaintext": "yes"}, r"\[tls\].plaintext: wrong type str"),
        ({"cert_file": ""}, r"\[tls\].cert_file: must not be empty"),
        ({**FILES, "reload_interval_seconds": -1}, r"\[tls\].reload_interval_seconds: must not"),
        ({"certificate": "x"}, r"\[tls\].certificate: unknown option"),
    ],
)
def test_bad_values_name_the_option(tls: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw(tls=tls))


def test_member_principal() -> None:
    members = [
        {"id": 1, "peer_address": "a:7500", "client_address": "a:7400"},
        {
            "id": 2,
            "peer_address": "b:7500",
            "client_address": "b:7400",
            "principal": "spiffe://corp/kms/b",
        },
    ]
    config = config_from_dict(
        raw({"id": 1, "peer_listen": "0.0.0.0:7500"}, cluster={"members": members}, tls=FILES)
    )
    assert [m.principal for m in config.members] == ["", "spiffe://corp/kms/b"]
    members[1]["principal"] = ""
    with pytest.raises(ConfigError, match=r"#2.principal: must not be empty"):
        config_from_dict(
            raw({"id": 1, "peer_listen": "0.0.0.0:7500"}, cluster={"members": members}, tls=FILES)
        )


def test_deploy_configs_use_mutual_tls() -> None:
    """deploy/config/*.toml load, name certificates, and make the admin of the CA that
    docker-compose.yml's kms-init (cluster id kmsd-compose) or kms-single makes."""
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    compose = (deploy / "docker-compose.yml").read_text()
    assert 'kmsd certs init --dir "$$ca" --cluster-id kmsd-compose' in compose
    configs = sorted((deploy / "config").glob("*.toml"))
    assert len(configs) == 8
    for path in configs:
        config = load_config(path)
        assert not config.tls.plaintext and config.tls.cert_file is not None, path
        admin = f"spiffe://{config.cluster_id}/user/admin"
        assert config.auth.administrators == (admin,), path
        if config.clustered:
            assert config.cluster_id == "kmsd-compose", path
            assert config.tls.cert_file == Path(f"/etc/kmsd/tls/node-{config.node_id}.crt")
