"""Checks (or, with --create, generates) the root key a kmsd config's [seal] names, and
prints its fingerprint, without starting a node.

    .venv/bin/python tools/softhsm/seal-key.py --config /etc/kmsd/node.toml [--create]

For `type = "pkcs11"` it logs in to the token with the config's pin_file / pin_env and
finds the key labelled key_label (with --create, generates it in the token,
non-extractable, if it is absent: the same as `create_key = true`). For `type = "file"`
it reads the seal file. Run it on every node: the fingerprints must be equal
(docs/hsm.md). Exit status: 0 found, 1 cannot open the seal, 2 bad configuration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kmsd.config import ConfigError, load_config
from kmsd.crypto.seal import FileSeal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="a kmsd node's TOML config")
    parser.add_argument(
        "--create", action="store_true", help="generate the pkcs11 key if it is absent"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"seal-key: configuration error: {error}", file=sys.stderr)
        return 2
    try:
        if config.seal.type == "pkcs11":
            from kmsd.crypto.pkcs11_seal import Pkcs11Seal, read_pin

            with Pkcs11Seal.open(
                module=config.seal.module,
                token_label=config.seal.token_label,
                key_label=config.seal.key_label,
                pin=read_pin(config.seal_pin_file, config.seal.pin_env),
                create_key=args.create or config.seal.create_key,
            ) as seal:
                print(
                    f"pkcs11 seal: token '{config.seal.token_label}', key "
                    f"'{config.seal.key_label}' (CKA_ID {seal.key_id or '-'}), "
                    f"fingerprint {seal.fingerprint}"
                )
        else:
            file_seal = FileSeal.load(config.seal_path)
            print(f"file seal: {config.seal_path}, fingerprint {file_seal.fingerprint}")
    except (OSError, ValueError) as error:
        print(f"seal-key: cannot open the seal: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
