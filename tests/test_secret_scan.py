"""The suite-wide secret scan finds secrets in every form it promises, and only there."""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from secret_scan import find_leaks


@pytest.fixture
def planted(tmp_path: Path) -> Iterator[Path]:
    """A directory for planted leaks, emptied afterwards so the real scan stays clean."""
    yield tmp_path
    shutil.rmtree(tmp_path)


def test_a_data_key_in_a_log_is_found_raw_hex_and_base64(planted: Path) -> None:
    secret = os.urandom(32)
    (planted / "a").mkdir()
    (planted / "a" / "raw.stderr.log").write_bytes(b"x" + secret + b"y")
    (planted / "a" / "hex.log").write_text(f"key={secret.hex()}")
    (planted / "audit-0000000000000001.jsonl").write_text(
        f'{{"k":"{base64.b64encode(secret).decode()}"}}\n'
    )
    (planted / "clean.log").write_text("nothing to see")
    leaks = find_leaks(planted, {secret})
    assert {Path(line.split(":")[0]).name for line in leaks} == {
        "audit-0000000000000001.jsonl",
        "hex.log",
        "raw.stderr.log",
    }


def test_files_that_are_not_logs_are_not_searched(planted: Path) -> None:
    secret = os.urandom(32)
    (planted / "plaintext.bin").write_bytes(secret)
    assert find_leaks(planted, {secret}) == []


def test_root_keys_and_tls_private_keys_made_by_the_suite_are_searched_for(planted: Path) -> None:
    root_key = os.urandom(32)
    (planted / "root.key").write_bytes(b"kmsd-file-seal-v1\n" + root_key.hex().encode() + b"\n")
    tls_key = ec.generate_private_key(ec.SECP256R1())
    (planted / "node.key").write_bytes(
        tls_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    scalar = tls_key.private_numbers().private_value.to_bytes(32, "big")
    (planted / "node.log").write_text(f"oops {root_key.hex()} {scalar.hex()}")
    leaks = find_leaks(planted, set())
    assert any("root key" in leak for leak in leaks)
    assert any("TLS private key" in leak for leak in leaks)


def test_write_ahead_logs_are_data_not_log_lines(planted: Path) -> None:
    secret = os.urandom(32)
    (planted / "wal-0000000000000001.log").write_bytes(secret)
    assert find_leaks(planted, {secret}) == []
