"""The `kmsd` command: `kmsd serve --config FILE` and `kmsd dev`.

`kmsd dev` runs a local cluster (3 nodes by default; `--nodes 1` for one node in
this process) with embedded defaults on loopback, data under a directory it names
(`.kmsd-dev` by default), for trying kmsd out and for tests. `kmsd init --seal
FILE` creates the root key a cluster's nodes share.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from kmsd.app import DataDirLocked, Node, SealMissing
from kmsd.config import Config, ConfigError, config_from_dict, load_config
from kmsd.crypto.seal import FileSeal
from kmsd.dev_cluster import run_dev_cluster
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
    init = sub.add_parser("init", help="create a file seal (the cluster's root key)")
    init.add_argument("--seal", type=Path, required=True, help="path of the new seal file")
    dev.add_argument(
        "--scheduler-interval", type=float, default=5.0, help="seconds between scheduler passes"
    )
    return parser


def _dev_config(args: argparse.Namespace) -> Config:
    return config_from_dict(
        {
            "node": {"data_dir": str(args.data_dir.resolve()), "listen": f"127.0.0.1:{args.port}"},
            "scheduler": {"interval_seconds": args.scheduler_interval},
        }
    )


async def _run(config: Config, announce: bool) -> int:
    node = Node(config)
    await node.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, node.request_stop)
    if announce:
        endpoint = f"127.0.0.1:{node.port}"
        print(
            f"kmsd dev: serving on {endpoint} (data in {config.data_dir})\n"
            f"  try:  kmsctl --endpoint {endpoint} create-key --description demo\n"
            f"  stop: Ctrl-C",
            flush=True,
        )
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
    if args.command == "dev" and args.nodes > 1:
        return run_dev_cluster(
            args.data_dir, args.nodes, args.port, args.peer_port, args.scheduler_interval
        )
    try:
        config = load_config(args.config) if args.command == "serve" else _dev_config(args)
    except ConfigError as error:
        print(f"kmsd: configuration error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(_run(config, announce=args.command == "dev"))
    except (StorageCorruptedError, DataDirLocked, SealMissing, OSError, ValueError) as error:
        print(f"kmsd: cannot start: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
