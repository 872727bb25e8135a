"""The root-key seal that wraps every key material version before it is stored.

Owns the `Seal` protocol, the `file` seal (`FileSeal`: a 32-byte AES-256 root key in a
0600 file) and `material_aad`, the associated data that ties a wrapped blob to one
key and material version. Only wrapped material ever reaches the log, snapshots or
other nodes. Formats: docs/ciphertext-format.md.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsd.errors import StorageCorruptedError

__all__ = [
    "FILE_SEAL_MAGIC",
    "WRAP_FORMAT_VERSION",
    "FileSeal",
    "Seal",
    "material_aad",
]

WRAP_FORMAT_VERSION = 1
FILE_SEAL_MAGIC = b"kmsd-file-seal-v1\n"
ROOT_KEY_SIZE = 32
_IV_SIZE = 12
_TAG_SIZE = 16
_WRAP_VERSION_BYTE = bytes([WRAP_FORMAT_VERSION])
_MIN_WRAPPED = 1 + _IV_SIZE + _TAG_SIZE
_FILE_SIZE = len(FILE_SEAL_MAGIC) + 2 * ROOT_KEY_SIZE + 1
_FILE_RE = re.compile(rb"kmsd-file-seal-v1\n([0-9a-f]{64})\n")
_MATERIAL_AAD_PREFIX = b"kmsd/v1/material/"
_FINGERPRINT_PREFIX = b"kmsd-seal-fingerprint"
_U32 = struct.Struct(">I").pack


class Seal(Protocol):
    """Wraps and unwraps key material under a root key the store never sees."""

    @property
    def name(self) -> str:
        """The seal type as configured: "file" or "pkcs11"."""
        ...

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypts and authenticates `plaintext`, bound to `aad`."""
        ...

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        """Reverses `wrap`. Raises StorageCorruptedError if `wrapped` is malformed, was
        tampered with, was wrapped under another root key, or `aad` differs."""
        ...


def material_aad(key_id: uuid.UUID, version: int) -> bytes:
    """Returns b"kmsd/v1/material/" ‖ key_id.bytes ‖ uint32-BE version: the AAD for
    wrapping one material version, so a wrapped blob cannot move to another key/version."""
    if not 1 <= version <= 0xFFFFFFFF:
        raise ValueError("material version must be in 1..2^32-1")
    return _MATERIAL_AAD_PREFIX + key_id.bytes + _U32(version)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSeal:
    """The `file` seal: AES-256-GCM under a root key read from a local 0600 file.

    Wrapped format: 0x01 ‖ 12-byte random IV ‖ AES-256-GCM(root key, IV, plaintext, aad)
    ‖ 16-byte tag.
    """

    __slots__ = ("_aead", "_fingerprint", "_rng")

    def __init__(self, root_key: bytes, rng: Callable[[int], bytes] = os.urandom) -> None:
        if len(root_key) != ROOT_KEY_SIZE:
            raise ValueError("root key must be 32 bytes")
        # Only the AEAD and the fingerprint are kept, so the raw key is not an attribute
        # that a debugger, repr or traceback formatter would show.
        self._aead = AESGCM(root_key)
        self._fingerprint = hashlib.sha256(_FINGERPRINT_PREFIX + root_key).hexdigest()[:16]
        self._rng = rng

    def __repr__(self) -> str:
        return f"FileSeal(fingerprint={self._fingerprint!r})"

    @property
    def name(self) -> str:
        return "file"

    @property
    def fingerprint(self) -> str:
        """16 hex chars of SHA-256(b"kmsd-seal-fingerprint" ‖ root key): equal on every
        node that shares the root key, and useless for recovering it."""
        return self._fingerprint

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        iv = self._rng(_IV_SIZE)
        if len(iv) != _IV_SIZE:
            raise ValueError("rng returned the wrong number of bytes")
        return _WRAP_VERSION_BYTE + iv + self._aead.encrypt(iv, plaintext, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) < _MIN_WRAPPED or wrapped[0] != WRAP_FORMAT_VERSION:
            raise StorageCorruptedError(
                "wrapped key material is malformed (truncated or unknown wrap format)"
            )
        try:
            return self._aead.decrypt(wrapped[1 : 1 + _IV_SIZE], wrapped[1 + _IV_SIZE :], aad)
        except InvalidTag:
            raise StorageCorruptedError(
                "wrapped key material failed authentication: the root key is not the one it "
                f"was wrapped with (this seal's fingerprint is {self._fingerprint}) or the "
                "stored data was tampered with"
            ) from None

    @classmethod
    def create(cls, path: Path, rng: Callable[[int], bytes] = os.urandom) -> FileSeal:
        """Generates a root key and writes it to `path` (mode 0600) atomically.

        Raises FileExistsError if `path` exists: overwriting a root key would make every
        stored key unreadable.
        """
        path = Path(path)
        root_key = rng(ROOT_KEY_SIZE)
        if len(root_key) != ROOT_KEY_SIZE:
            raise ValueError("rng returned the wrong number of bytes")
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "refusing to overwrite the seal file", str(path))
        # The temp name's randomness is not key material, so it does not consume `rng`.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # the umask could only narrow it, but be exact
                os.write(fd, FILE_SEAL_MAGIC + root_key.hex().encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                # link() publishes atomically and, unlike rename(), never replaces an
                # existing file, so a concurrent create cannot clobber a root key.
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(
                    errno.EEXIST, "refusing to overwrite the seal file", str(path)
                ) from None
            except OSError:
                # Filesystems without hard links: fall back to rename after the check above.
                if os.path.lexists(path):
                    raise FileExistsError(
                        errno.EEXIST, "refusing to overwrite the seal file", str(path)
                    ) from None
                os.rename(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        _fsync_dir(path.parent)
        return cls(root_key, rng)

    @classmethod
    def load(cls, path: Path, rng: Callable[[int], bytes] = os.urandom) -> FileSeal:
        """Reads the root key from `path`.

        Raises FileNotFoundError if it is missing, and ValueError naming the path if it is
        not a regular file, is accessible by group or others, or is malformed.
        """
        path = Path(path)
        # O_NONBLOCK so a FIFO planted at the path fails the regular-file check, not hangs.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            # fstat the open file, not the path, so the check and the read see one file.
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"seal file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise ValueError(
                    f"seal file {path} is accessible by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
                )
            data = os.read(fd, _FILE_SIZE + 1)
        finally:
            os.close(fd)
        match = _FILE_RE.fullmatch(data)
        if match is None:
            raise ValueError(
                f"seal file {path} is malformed: expected the line 'kmsd-file-seal-v1' "
                "then 64 lowercase hex characters and a newline"
            )
        return cls(bytes.fromhex(match.group(1).decode("ascii")), rng)

    @classmethod
    def load_or_create(cls, path: Path, rng: Callable[[int], bytes] = os.urandom) -> FileSeal:
        """Loads the seal at `path`, creating it first if it does not exist."""
        try:
            return cls.load(path, rng)
        except FileNotFoundError:
            pass
        try:
            return cls.create(path, rng)
        except FileExistsError:
            # Another process created it between our load and create.
            return cls.load(path, rng)
