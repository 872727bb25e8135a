"""Suite-wide check that no secret the suite handled ever reaches a log or audit file.

While the suite runs, every synchronous gRPC channel a test opens (directly, through
the harness or through `KmsClient`) carries a recording interceptor: each
`plaintext` sent to kmsd (Encrypt inputs) or received from it (Decrypt results, data
keys, GenerateRandom bytes) is remembered, unless it is too short or too repetitive
to tell from ordinary text. In-process servers' log records go to a file under the
session's temporary directory. When the session ends, every log file (`*.log` but
not write-ahead logs, kmsd stderr captures) and audit file
(`audit-*.jsonl`) under that directory is searched for each secret in raw, hex and
base64 form, and for every root key (file seals) and TLS private key the suite made.
A hit fails the run and names the file.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# Shorter byte strings could match log text by chance ("hello" in a word).
MIN_SECRET_BYTES = 16
MIN_DISTINCT_BYTES = 8
_SEAL_FILE = re.compile(rb"^kmsd-file-seal-v1\n([0-9a-f]{64})\n$")
_PEM_KEY = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----\n.+?\n-----END \1", re.S)


class SecretRecorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Remembers the `plaintext` of every request and response passing through."""

    def __init__(self) -> None:
        self.secrets: set[bytes] = set()

    def _take(self, message: Any) -> None:
        value = getattr(message, "plaintext", None)
        # Repetitive test inputs (b"x" * 20) are no secret and would match any such run.
        if (
            isinstance(value, bytes)
            and len(value) >= MIN_SECRET_BYTES
            and len(set(value)) >= MIN_DISTINCT_BYTES
        ):
            self.secrets.add(value)

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        self._take(request)
        outcome = continuation(client_call_details, request)
        try:
            response = outcome.result()
        except grpc.RpcError:
            return outcome
        self._take(response)
        return outcome


def _forms(secret: bytes) -> Iterator[bytes]:
    yield secret
    yield secret.hex().encode()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        # Without the padding, and without the last (partial) character group.
        yield encode(secret).rstrip(b"=")[:-4]


def _scanned_files(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        name = path.name
        # wal-*.log are write-ahead logs (data, not log lines: wrapped material only).
        if path.is_file() and (
            (name.endswith(".log") and not name.startswith("wal-"))
            or (name.startswith("audit-") and name.endswith(".jsonl"))
        ):
            yield path


def _private_scalar(pem: bytes) -> bytes | None:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):  # encrypted or not a key after all
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        value = key.private_numbers().private_value
    elif isinstance(key, rsa.RSAPrivateKey):
        value = key.private_numbers().d
    else:
        return None
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _made_keys(root: Path) -> Iterator[tuple[str, bytes]]:
    for path in root.rglob("*"):
        if not path.is_file() or path.stat().st_size > 16384:
            continue
        try:
            head = path.read_bytes()
        except OSError:
            continue
        seal = _SEAL_FILE.match(head)
        if seal:
            yield f"root key {path}", bytes.fromhex(seal.group(1).decode())
        for match in _PEM_KEY.finditer(head):
            scalar = _private_scalar(match.group(0) + b"PRIVATE KEY-----\n")
            if scalar is not None:
                yield f"TLS private key {path}", scalar


def find_leaks(root: Path, secrets: set[bytes]) -> list[str]:
    """`file: what` for every secret (or made key) found in a log or audit file."""
    needles: list[tuple[str, bytes]] = [
        (f"a {len(secret)}-byte plaintext/data key the suite handled", form)
        for secret in secrets
        for form in _forms(secret)
    ]
    for what, key in _made_keys(root):
        needles.extend((what, form) for form in _forms(key))
    leaks = []
    for path in _scanned_files(root):
        data = path.read_bytes()
        for what, needle in needles:
            if needle in data:
                leaks.append(f"{path}: {what}")
    return leaks


class _Plugin:
    def __init__(self) -> None:
        self.recorder = SecretRecorder()
        self._originals: dict[str, Callable[..., grpc.Channel]] = {}
        self._handler: logging.Handler | None = None

    def _wrap(self, name: str) -> None:
        original = getattr(grpc, name)
        self._originals[name] = original
        recorder = self.recorder

        def channel(*args: Any, **kwargs: Any) -> grpc.Channel:
            return grpc.intercept_channel(original(*args, **kwargs), recorder)

        setattr(grpc, name, channel)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._wrap("insecure_channel")
        self._wrap("secure_channel")
        factory = getattr(session.config, "_tmp_path_factory", None)
        if factory is not None:
            # In-process servers log through `logging`: keep those lines for the scan.
            self._handler = logging.FileHandler(factory.getbasetemp() / "in-process.log")
            self._handler.setLevel(logging.DEBUG)
            root = logging.getLogger()
            root.addHandler(self._handler)
            root.setLevel(min(root.level or logging.WARNING, logging.INFO))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        for name, original in self._originals.items():
            setattr(grpc, name, original)
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
        factory = getattr(session.config, "_tmp_path_factory", None)
        if factory is None:
            return
        root = factory.getbasetemp()
        leaks = find_leaks(root, self.recorder.secrets)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("-", "secret scan")
            reporter.write_line(
                f" {len(self.recorder.secrets)} secrets handled, "
                f"{sum(1 for _ in _scanned_files(root))} log/audit files searched, "
                f"{len(leaks)} leaks"
            )
            for leak in leaks:
                reporter.write_line(f"SECRET LEAKED: {leak}", red=True)
        if leaks:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_Plugin(), "kmsd-secret-scan")
