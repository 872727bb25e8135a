"""The file seal: wrap/unwrap, material AAD, fingerprint and the seal file itself."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from kmsd.crypto.seal import FILE_SEAL_MAGIC, FileSeal, Seal, material_aad
from kmsd.errors import StorageCorruptedError

ROOT = bytes(range(32))
KEY_ID = uuid.UUID("11111111-2222-3333-4444-555555555555")
MATERIAL = bytes(range(0x40, 0x60))
AAD_HEX = "6b6d73642f76312f6d6174657269616c2f1111111122223333444455555555555500000001"
WRAPPED_HEX = (
    "01c0c1c2c3c4c5c6c7c8c9cacb"
    "40096524333dd019d090b7e97ee1a6191c22b16c68b749ed729a11516b2021e9"
    "64c203281a9f06646dbd7f547780d632"
)
FINGERPRINT = "b0e5aa425340bef7"


def test_is_a_seal() -> None:
    seal: Seal = FileSeal(ROOT)
    assert seal.name == "file"


def test_material_aad() -> None:
    assert material_aad(KEY_ID, 1).hex() == AAD_HEX
    assert material_aad(KEY_ID, 1) != material_aad(KEY_ID, 2)
    assert material_aad(KEY_ID, 1) != material_aad(uuid.uuid4(), 1)
    with pytest.raises(ValueError):
        material_aad(KEY_ID, 0)


def test_wrap_known_answer() -> None:
    seal = FileSeal(ROOT, rng=lambda n: bytes(range(0xC0, 0xC0 + n)))
    wrapped = seal.wrap(MATERIAL, material_aad(KEY_ID, 1))
    assert wrapped.hex() == WRAPPED_HEX
    assert len(wrapped) == 1 + 12 + 32 + 16
    assert seal.unwrap(wrapped, material_aad(KEY_ID, 1)) == MATERIAL


def test_wrap_round_trip_random_iv() -> None:
    seal = FileSeal(ROOT)
    aad = material_aad(KEY_ID, 7)
    a, b = seal.wrap(MATERIAL, aad), seal.wrap(MATERIAL, aad)
    assert a != b
    assert seal.unwrap(a, aad) == seal.unwrap(b, aad) == MATERIAL


def test_unwrap_wrong_aad_key_or_tamper() -> None:
    seal = FileSeal(ROOT)
    wrapped = seal.wrap(MATERIAL, material_aad(KEY_ID, 1))
    with pytest.raises(StorageCorruptedError, match="failed authentication"):
        seal.unwrap(wrapped, material_aad(KEY_ID, 2))
    with pytest.raises(StorageCorruptedError, match="fingerprint"):
        FileSeal(bytes(32)).unwrap(wrapped, material_aad(KEY_ID, 1))
    for i in range(len(wrapped)):
        flipped = bytearray(wrapped)
        flipped[i] ^= 0x01
        with pytest.raises(StorageCorruptedError):
            seal.unwrap(bytes(flipped), material_aad(KEY_ID, 1))
    for bad in (b"", b"\x01", wrapped[:28], b"\x02" + wrapped[1:]):
        with pytest.raises(StorageCorruptedError, match="malformed"):
            seal.unwrap(bad, material_aad(KEY_ID, 1))


def test_fingerprint_stable_and_safe() -> None:
    assert FileSeal(ROOT).fingerprint == FINGERPRINT
    assert FileSeal(ROOT).fingerprint == FileSeal(bytes(ROOT)).fingerprint
    assert FileSeal(bytes(32)).fingerprint != FINGERPRINT
    assert ROOT.hex() not in repr(FileSeal(ROOT))
    assert FINGERPRINT in repr(FileSeal(ROOT))


def test_root_key_size() -> None:
    with pytest.raises(ValueError):
        FileSeal(bytes(16))


def test_create_and_load(tmp_path: Path) -> None:
    path = tmp_path / "seal.key"
    created = FileSeal.create(path, rng=lambda n: ROOT[:n])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == FILE_SEAL_MAGIC + ROOT.hex().encode() + b"\n"
    assert path.read_bytes().startswith(b"kmsd-file-seal-v1\n")
    assert created.fingerprint == FINGERPRINT
    loaded = FileSeal.load(path)
    assert loaded.fingerprint == FINGERPRINT
    wrapped = created.wrap(MATERIAL, b"aad")
    assert loaded.unwrap(wrapped, b"aad") == MATERIAL
    # No temp files left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["seal.key"]


def test_create_ignores_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        FileSeal.create(tmp_path / "seal.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "seal.key").stat().st_mode) == 0o600


def test_create_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "seal.key"
    first = FileSeal.create(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        FileSeal.create(path)
    assert path.read_bytes() == before
    assert FileSeal.load(path).fingerprint == first.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["seal.key"]


def test_create_refuses_dangling_symlink(tmp_path: Path) -> None:
    path = tmp_path / "seal.key"
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        FileSeal.create(path)


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileSeal.load(tmp_path / "nope")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o601, 0o610])
def test_load_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "seal.key"
    FileSeal.create(path)
    path.chmod(mode)
    with pytest.raises(ValueError, match="group or others") as info:
        FileSeal.load(path)
    assert str(path) in str(info.value)


def test_load_accepts_owner_only_modes(tmp_path: Path) -> None:
    path = tmp_path / "seal.key"
    FileSeal.create(path, rng=lambda n: ROOT[:n])
    path.chmod(0o400)
    assert FileSeal.load(path).fingerprint == FINGERPRINT


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"kmsd-file-seal-v1\n",
        FILE_SEAL_MAGIC + ROOT.hex().encode(),  # no final newline
        FILE_SEAL_MAGIC + ROOT.hex().encode() + b"\n\n",
        FILE_SEAL_MAGIC + ROOT.hex().upper().encode() + b"\n",
        FILE_SEAL_MAGIC + ROOT.hex().encode()[:-2] + b"\n",
        FILE_SEAL_MAGIC + ROOT.hex().encode() + b"00\n",
        FILE_SEAL_MAGIC + ROOT.hex().encode()[:-1] + b"g\n",
        b"kmsd-file-seal-v2\n" + ROOT.hex().encode() + b"\n",
        b"kmsd-file-seal-v1\r\n" + ROOT.hex().encode() + b"\n",
        ROOT.hex().encode() + b"\n",
        ROOT,
    ],
)
def test_load_refuses_malformed(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "seal.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ValueError, match="malformed") as info:
        FileSeal.load(path)
    assert str(path) in str(info.value)
    assert ROOT.hex() not in str(info.value)


def test_load_refuses_directory(tmp_path: Path) -> None:
    path = tmp_path / "dir"
    path.mkdir(mode=0o700)
    with pytest.raises(ValueError, match="regular file"):
        FileSeal.load(path)


def test_load_refuses_fifo_without_hanging(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path, 0o600)
    with pytest.raises(ValueError, match="regular file"):
        FileSeal.load(path)


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "seal.key"
    first = FileSeal.load_or_create(path)
    second = FileSeal.load_or_create(path)
    assert first.fingerprint == second.fingerprint
    path.chmod(0o644)
    with pytest.raises(ValueError):
        FileSeal.load_or_create(path)
