"""The `kmsd` command: `kmsd serve --config FILE`, `kmsd dev`, `kmsd init`, `kmsd certs`.

`kmsd dev` runs a local cluster (3 nodes by default; `--nodes 1` for one node in
this process) with embedded defaults on loopback, data under a directory it names
(`.kmsd-dev` by default), for trying kmsd out and for tests; mutual TLS on
certificates it makes in `<data-dir>/tls/` (`--plaintext`: none, loopback only).
`kmsd init --seal FILE` creates the root key a cluster's nodes share. `kmsd certs
init|node|client` makes a CA and certificates for nodes and clients
(docs/security.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from kmsd.app import DataDirLocked, Node, SealMissing
from kmsd.auth import certs
from kmsd.auth.certs import DevPki
from kmsd.config import Config, ConfigError, config_from_dict, load_config
from kmsd.crypto.seal import FileSeal
from kmsd.dev_cluster import (
    DEV_CLUSTER_ID,
    PLAINTEXT_WARNING,
    banner,
    dev_pki,
    run_dev_cluster,
    security_tables,
)
from kmsd.errors import StorageCorruptedError

DEV_PORT = 7400
DEV_PEER_PORT = 7500


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmsd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a node from a TOML config file")
    serve.add_argument("--config", required=True, type=Path, help="path to the TOML config")
    dev = sub.add_parser("dev", help="run a local cluster with embedded defaults on loopback")
    dev.add_argument("--data-dir", type=Path, default=Path(".kmsd-dev"), help="data directory")
    dev.add_argument(
        "--nodes", type=int, choices=(1, 3, 5), default=3, help="cluster size (default 3)"
    )
    dev.add_argument(
        "--port",
        type=int,
        default=DEV_PORT,
        help="client port of node 1 on 127.0.0.1; node i uses port+i-1 (0: free ports)",
    )
    dev.add_argument(
        "--peer-port", type=int, default=DEV_PEER_PORT, help="Raft port of node 1 (+i-1)"
    )
    dev.add_argument(
        "--plaintext",
        action="store_true",
        help="no TLS (no authentication; loopback only): every caller is 'anonymous'",
    )
    init = sub.add_parser("init", help="create a file seal (the cluster's root key)")
    init.add_argument("--seal", type=Path, required=True, help="path of the new seal file")
    dev.add_argument(
        "--scheduler-interval", type=float, default=5.0, help="seconds between scheduler passes"
    )
    _certs_parser(sub)
    health = sub.add_parser(
        "health",
        help="exit 0 if the node of a config file serves (grpc.health.v1, as the node itself)",
    )
    health.add_argument("--config", required=True, type=Path, help="the node's TOML config")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    return parser


def _health(path: Path, timeout: float) -> int:
    """The container health check: Health.Check of KeyManagementService on the node's
    client port (a wildcard host is checked on loopback), over mutual TLS with the
    node's own certificate (it is a client certificate too), or plaintext if so set."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kmsd.api.server import SERVICE_NAME
    from kmsd.auth.tls import TlsFiles

    try:
        config = load_config(path)
        files = TlsFiles.from_config(config)
        credentials = None
        if files is not None:
            credentials = grpc.ssl_channel_credentials(
                files.ca.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
            )
    except (ConfigError, OSError, ValueError) as error:
        print(f"kmsd health: {error}", file=sys.stderr)
        return 2
    host, _, port = config.listen.rpartition(":")
    host = host.strip("[]")
    host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout
            )
        except grpc.RpcError as error:
            print(f"kmsd health: {target}: {error.code().name}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(
        f"kmsd health: {target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    )
    return 0 if serving else 1


def _certs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs_cmd = sub.add_parser(
        "certs", help="make a CA and node/client certificates (development, tests, small setups)"
    )
    actions = certs_cmd.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    init = actions.add_parser("init", help="a new CA: DIR/ca.crt and DIR/ca.key")
    init.add_argument(
        "--cluster-id",
        default=certs.DEFAULT_CLUSTER_ID,
        help="[cluster].id: the trust domain of the identities (default kmsd)",
    )
    node = actions.add_parser("node", help="DIR/node-<ID>.crt/.key for a node")
    node.add_argument("--id", type=int, required=True, help="the node's [node].id")
    node.add_argument(
        "--host",
        action="append",
        default=[],
        help="a name or address clients and peers dial it by (repeatable; 127.0.0.1 and "
        "localhost are always in)",
    )
    client = actions.add_parser("client", help="DIR/client-<NAME>.crt/.key for a caller")
    client.add_argument("--name", required=True, help="the certificate's CN")
    client.add_argument(
        "--uri",
        default=None,
        help="its URI SAN, the caller's principal (default spiffe://<cluster>/user/<NAME>)",
    )
    for action in (init, node, client):
        action.add_argument("--dir", type=Path, required=True, help="the certificates' directory")
        action.add_argument(
            "--days",
            type=int,
            default=certs.CA_DAYS if action is init else certs.LEAF_DAYS,
            help="validity in days",
        )
        action.add_argument("--force", action="store_true", help="replace existing files")
    for action in (node, client):
        action.add_argument(
            "--cluster-id", default=None, help="default: the one `certs init` recorded in the CA"
        )


def _certs(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    try:
        if args.certs_command == "init":
            made = certs.create_ca(directory, args.cluster_id, days=args.days, overwrite=args.force)
            identity = f"cluster id {args.cluster_id}"
        elif args.certs_command == "node":
            made = certs.issue_node(
                directory,
                args.id,
                cluster_id=args.cluster_id,
                hosts=args.host,
                days=args.days,
                overwrite=args.force,
            )
            identity = certs.node_principal(
                args.cluster_id or certs.cluster_id_of_ca(directory), args.id
            )
        else:
            made = certs.issue_client(
                directory,
                args.name,
                cluster_id=args.cluster_id,
                uri=args.uri,
                days=args.days,
                overwrite=args.force,
            )
            identity = args.uri or certs.user_principal(
                args.cluster_id or certs.cluster_id_of_ca(directory), args.name
            )
    except (certs.CertError, OSError) as error:
        print(f"kmsd certs: {error}", file=sys.stderr)
        return 1
    print(f"wrote {made.cert} and {made.key} (mode 0600): {identity}")
    return 0


def _dev_config(args: argparse.Namespace, pki: DevPki | None) -> Config:
    return config_from_dict(
        {
            "node": {"data_dir": str(args.data_dir.resolve()), "listen": f"127.0.0.1:{args.port}"},
            "cluster": {"id": DEV_CLUSTER_ID},
            "scheduler": {"interval_seconds": args.scheduler_interval},
            **security_tables(pki, 1),
        }
    )


async def _run(config: Config, announce: bool, pki: DevPki | None = None) -> int:
    node = Node(config)
    await node.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, node.request_stop)
    if announce:
        endpoints = [f"127.0.0.1:{node.port}"]
        text = banner("node", endpoints, config.data_dir, pki, ["create-key --description demo"])
        print(f"{text}\n  stop: Ctrl-C", flush=True)
    return await node.wait()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "init":
        try:
            seal = FileSeal.create(args.seal)
        except (FileExistsError, OSError) as error:
            print(f"kmsd: cannot create the seal: {error}", file=sys.stderr)
            return 1
        print(f"created file seal {args.seal} (fingerprint {seal.fingerprint}); back it up")
        return 0
    if args.command == "certs":
        return _certs(args)
    if args.command == "health":
        return _health(args.config, args.timeout)
    if args.command == "dev" and args.nodes > 1:
        try:
            return run_dev_cluster(
                args.data_dir,
                args.nodes,
                args.port,
                args.peer_port,
                args.scheduler_interval,
                plaintext=args.plaintext,
            )
        except (certs.CertError, OSError) as error:
            print(f"kmsd dev: cannot start: {error}", file=sys.stderr)
            return 1
    pki: DevPki | None = None
    try:
        if args.command == "serve":
            config = load_config(args.config)
        else:
            pki = dev_pki(args.data_dir.resolve(), 1, args.plaintext)
            if pki is None:
                print(f"kmsd dev: WARNING: {PLAINTEXT_WARNING}", file=sys.stderr, flush=True)
            config = _dev_config(args, pki)
    except (certs.CertError, OSError) as error:
        print(f"kmsd dev: cannot start: {error}", file=sys.stderr)
        return 1
    except ConfigError as error:
        print(f"kmsd: configuration error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(_run(config, announce=args.command == "dev", pki=pki))
    except (StorageCorruptedError, DataDirLocked, SealMissing, OSError, ValueError) as error:
        print(f"kmsd: cannot start: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
