"""The pkcs11 seal against a real SoftHSM2 token in a temporary directory: wrap/unwrap
inside the token, non-extractability, fingerprints, PIN sources, key creation and the
[seal] config options. Skipped (failed under CI) only if SoftHSM2 is not installed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsd.config import Config, ConfigError, config_from_dict
from kmsd.crypto.seal import FileSeal, material_aad
from kmsd.errors import StorageCorruptedError, UnavailableError

pkcs11 = pytest.importorskip("pkcs11")
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass  # noqa: E402
from pkcs11 import exceptions as p11  # noqa: E402

from kmsd.crypto.pkcs11_seal import (  # noqa: E402
    PKCS11_WRAP_FORMAT_VERSION,
    Pkcs11Seal,
    Pkcs11SealError,
    read_pin,
)

pytestmark = pytest.mark.hsm

REPO = Path(__file__).resolve().parents[2]
SETUP_TOKEN = REPO / "tools" / "softhsm" / "setup-token.sh"
_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN = "kmsd-unit"
PIN = "unit-pin-1234"
KEY_ID = uuid.UUID("11111111-2222-3333-4444-555555555555")
AAD = material_aad(KEY_ID, 1)

# These tests are about [seal]; TLS is not their subject (docs/security.md).
PLAIN: dict[str, dict[str, object]] = {"tls": {"plaintext": True}}


def softhsm_module() -> str:
    """The SoftHSM2 module path; skips (fails under CI) when SoftHSM2 is missing."""
    candidates = [os.environ.get("SOFTHSM2_MODULE", ""), *_MODULE_CANDIDATES]
    module = next((c for c in candidates if c and os.path.exists(c)), "")
    if module and shutil.which("softhsm2-util"):
        return module
    reason = "SoftHSM2 is not installed (apt-get install softhsm2; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Token:
    module: str
    directory: Path

    def open(self, key_label: str, *, create_key: bool = False, pin: str = PIN) -> Pkcs11Seal:
        return Pkcs11Seal.open(
            module=self.module,
            token_label=TOKEN,
            key_label=key_label,
            pin=pin,
            create_key=create_key,
        )

    def session(self, rw: bool = False) -> pkcs11.Session:
        """A raw session of this process (login state is per process and token)."""
        token = pkcs11.lib(self.module).get_token(token_label=TOKEN)
        try:
            return token.open(rw=rw, user_pin=PIN)
        except p11.UserAlreadyLoggedIn:
            return token.open(rw=rw)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    module = softhsm_module()
    directory = tmp_path_factory.mktemp("softhsm")
    pin_file = directory / "pin"
    pin_file.write_text(PIN + "\n")
    subprocess.run(
        [str(SETUP_TOKEN), str(directory), "--label", TOKEN, "--pin-file", str(pin_file)],
        check=True,
        capture_output=True,
    )
    with pytest.MonkeyPatch.context() as patch:
        # SoftHSM2 reads its configuration when the module is initialised.
        patch.setenv("SOFTHSM2_CONF", str(directory / "softhsm2.conf"))
        pkcs11.lib(module).reinitialize()
        yield Token(module, directory)
        pkcs11.lib(module).finalize()


@pytest.fixture(scope="module")
def seal(token: Token) -> Iterator[Pkcs11Seal]:
    with token.open("kmsd-root", create_key=True) as opened:
        yield opened


# -- wrap / unwrap ------------------------------------------------------------------


def test_round_trip_inside_the_token(seal: Pkcs11Seal) -> None:
    material = bytes(range(32))
    wrapped = seal.wrap(material, AAD)
    assert wrapped[0] == PKCS11_WRAP_FORMAT_VERSION == 2
    assert len(wrapped) == 1 + 12 + 32 + 16
    assert seal.unwrap(wrapped, AAD) == material
    assert seal.wrap(material, AAD) != wrapped  # a fresh random IV every time
    assert seal.name == "pkcs11"


def test_wrong_aad_is_storage_corruption(seal: Pkcs11Seal) -> None:
    wrapped = seal.wrap(b"k" * 32, AAD)
    with pytest.raises(StorageCorruptedError, match="failed authentication") as info:
        seal.unwrap(wrapped, material_aad(KEY_ID, 2))
    assert seal.fingerprint in str(info.value)
    assert "6b6b6b6b" not in str(info.value) and "kkkk" not in str(info.value)
    with pytest.raises(StorageCorruptedError):
        seal.unwrap(wrapped, material_aad(uuid.uuid4(), 1))


@pytest.mark.parametrize("position", [1, 12, 13, 44, -1])
def test_any_flipped_bit_is_storage_corruption(seal: Pkcs11Seal, position: int) -> None:
    wrapped = bytearray(seal.wrap(b"k" * 32, AAD))
    wrapped[position] ^= 0x01
    with pytest.raises(StorageCorruptedError):
        seal.unwrap(bytes(wrapped), AAD)


def test_malformed_and_foreign_blobs(seal: Pkcs11Seal, tmp_path: Path) -> None:
    wrapped = seal.wrap(b"k" * 32, AAD)
    with pytest.raises(StorageCorruptedError, match="malformed"):
        seal.unwrap(wrapped[:28], AAD)
    with pytest.raises(StorageCorruptedError, match="malformed"):
        seal.unwrap(b"\x03" + wrapped[1:], AAD)
    with pytest.raises(StorageCorruptedError, match="malformed"):
        seal.unwrap(b"", AAD)
    from_file_seal = FileSeal.create(tmp_path / "root.key").wrap(b"k" * 32, AAD)
    with pytest.raises(StorageCorruptedError, match="file seal"):
        seal.unwrap(from_file_seal, AAD)


def test_another_hsm_key_cannot_unwrap(token: Token, seal: Pkcs11Seal) -> None:
    wrapped = seal.wrap(b"k" * 32, AAD)
    with token.open("other-root", create_key=True) as other:
        assert other.fingerprint != seal.fingerprint
        with pytest.raises(StorageCorruptedError, match=other.fingerprint):
            other.unwrap(wrapped, AAD)


def test_known_answer_matches_the_documented_format(token: Token) -> None:
    """An imported key with known bytes (a test-only session object) gives exactly
    0x02 ‖ IV ‖ AES-256-GCM(key, IV, material, AAD): the file seal's KAT body."""
    root = bytes(range(0x20))
    iv = bytes(range(0xC0, 0xCC))
    material = bytes(range(0x40, 0x60))
    with token.session() as session:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: root,
                Attribute.LABEL: "kat",
                Attribute.TOKEN: False,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
            }
        )
        seal = Pkcs11Seal.open(
            module=token.module, token_label=TOKEN, key_label="kat", pin=PIN, rng=lambda n: iv
        )
        with seal:
            wrapped = seal.wrap(material, AAD)
            assert wrapped.hex() == (
                "02c0c1c2c3c4c5c6c7c8c9cacb"
                "40096524333dd019d090b7e97ee1a6191c22b16c68b749ed729a11516b2021e9"
                "64c203281a9f06646dbd7f547780d632"
            )
            assert wrapped[1:] == iv + AESGCM(root).encrypt(iv, material, AAD)
            assert seal.unwrap(wrapped, AAD) == material
            gmac = AESGCM(root).encrypt(bytes(12), b"", b"kmsd-seal-fingerprint")
            expected = hashlib.sha256(b"kmsd-seal-fingerprint/pkcs11" + gmac).hexdigest()[:16]
            assert seal.fingerprint == expected == "f508db5d3e3f74a7"


def test_the_reserved_iv_is_never_used(token: Token, seal: Pkcs11Seal) -> None:
    with token.open("kmsd-root") as zero_rng:
        zero_rng._rng = lambda n: bytes(n)
        with pytest.raises(ValueError, match="reserved"):
            zero_rng.wrap(b"k" * 32, AAD)


# -- the key stays in the HSM -----------------------------------------------------


def test_the_key_is_non_extractable(token: Token, seal: Pkcs11Seal) -> None:
    with token.session(rw=True) as session:
        key = session.get_key(ObjectClass.SECRET_KEY, label="kmsd-root")
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.ALWAYS_SENSITIVE] is True
        assert key[Attribute.LOCAL] is True  # generated inside the token
        assert key[Attribute.TOKEN] is True
        assert key[Attribute.VALUE_LEN] == 32
        assert key[Attribute.WRAP] is False and key[Attribute.UNWRAP] is False
        assert key[Attribute.ID].hex() == seal.key_id and len(key[Attribute.ID]) == 16
        with pytest.raises(p11.AttributeSensitive):
            key[Attribute.VALUE]  # noqa: B018
        wrapping = session.generate_key(
            KeyType.AES, 256, label="exporter", template={Attribute.WRAP: True}
        )
        with pytest.raises(p11.PKCS11Error):  # CKR_KEY_UNEXTRACTABLE
            wrapping.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        with pytest.raises(p11.PKCS11Error):  # CKA_EXTRACTABLE cannot be turned back on
            key[Attribute.EXTRACTABLE] = True


def test_an_extractable_key_is_refused(token: Token) -> None:
    with token.session(rw=True) as session:
        session.generate_key(
            KeyType.AES,
            256,
            label="leaky",
            template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
        )
        with pytest.raises(Pkcs11SealError, match=r"\[seal\].key_label: .*'leaky'.*extractable"):
            token.open("leaky")


def test_a_key_that_is_not_aes_256_is_refused(token: Token) -> None:
    with token.session(rw=True) as session:
        session.generate_key(KeyType.AES, 128, label="short")
        with pytest.raises(Pkcs11SealError, match="not an AES-256 key"):
            token.open("short")


# -- fingerprint ------------------------------------------------------------------


def test_fingerprint_is_stable_across_sessions_and_processes(
    token: Token, seal: Pkcs11Seal
) -> None:
    assert len(seal.fingerprint) == 16 and int(seal.fingerprint, 16) >= 0
    for _ in range(2):
        with token.open("kmsd-root") as again:
            assert again.fingerprint == seal.fingerprint
            assert again.key_id == seal.key_id
    code = (
        "from kmsd.crypto.pkcs11_seal import Pkcs11Seal\n"
        f"s = Pkcs11Seal.open(module={token.module!r}, token_label={TOKEN!r}, "
        f"key_label='kmsd-root', pin={PIN!r})\n"
        "print(s.fingerprint)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "SOFTHSM2_CONF": str(token.directory / "softhsm2.conf")},
    )
    assert out.stdout.strip() == seal.fingerprint
    assert seal.fingerprint in repr(seal) and PIN not in repr(seal)


# -- PIN --------------------------------------------------------------------------


def test_pin_from_a_private_file(token: Token, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    assert read_pin(pin_file, None) == PIN
    pin_file.write_bytes(PIN.encode() + b"\r\n")
    assert read_pin(pin_file, None) == PIN
    pin_file.write_text(PIN)
    with token.open("kmsd-root", pin=read_pin(pin_file, None)) as opened:
        assert opened.fingerprint


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_pin_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN)
    pin_file.chmod(mode)
    with pytest.raises(Pkcs11SealError, match=r"\[seal\].pin_file: .*group or others"):
        read_pin(pin_file, None)


def test_bad_pin_files(tmp_path: Path) -> None:
    with pytest.raises(Pkcs11SealError, match=r"\[seal\].pin_file: cannot open"):
        read_pin(tmp_path / "missing", None)
    with pytest.raises(Pkcs11SealError, match="not a regular file"):
        read_pin(tmp_path, None)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(Pkcs11SealError, match="is empty"):
        read_pin(empty, None)


def test_pin_from_the_environment(token: Token) -> None:
    environ = {"KMSD_HSM_PIN": PIN}
    assert read_pin(None, "KMSD_HSM_PIN", environ) == PIN
    with token.open("kmsd-root", pin=read_pin(None, "KMSD_HSM_PIN", environ)) as opened:
        assert opened.fingerprint
    with pytest.raises(Pkcs11SealError, match=r"\[seal\].pin_env: .*KMSD_HSM_PIN is not set"):
        read_pin(None, "KMSD_HSM_PIN", {})
    with pytest.raises(Pkcs11SealError, match=r"\[seal\].pin_env: .*not set or is empty"):
        read_pin(None, "KMSD_HSM_PIN", {"KMSD_HSM_PIN": ""})
    with pytest.raises(Pkcs11SealError, match="not an environment variable name"):
        read_pin(None, "NOT-A-NAME", environ)


def test_exactly_one_pin_source(tmp_path: Path) -> None:
    with pytest.raises(Pkcs11SealError, match="exactly one of pin_file and pin_env"):
        read_pin(None, None)
    with pytest.raises(Pkcs11SealError, match="exactly one of pin_file and pin_env"):
        read_pin(tmp_path / "pin", "KMSD_HSM_PIN", {"KMSD_HSM_PIN": PIN})


def test_wrong_pin_is_a_start_up_error(token: Token, seal: Pkcs11Seal) -> None:
    # C_Login only happens when no session of this process is logged in.
    seal.close()
    try:
        with pytest.raises(Pkcs11SealError, match=r"\[seal\].pin_file/pin_env: .*refused"):
            token.open("kmsd-root", pin="wrong-pin")
    finally:
        # The module-scoped seal reconnects on its next use.
        assert seal.unwrap(seal.wrap(b"k" * 32, AAD), AAD) == b"k" * 32


# -- finding and creating the key ---------------------------------------------------


def test_missing_key_is_a_start_up_error_naming_the_label(token: Token) -> None:
    with pytest.raises(
        Pkcs11SealError, match=r"\[seal\].key_label: .*no secret key labelled 'absent'"
    ):
        token.open("absent")


def test_create_key_generates_once(token: Token) -> None:
    with token.open("created", create_key=True) as first:
        wrapped = first.wrap(b"m" * 32, AAD)
    with token.open("created", create_key=True) as second:
        assert second.fingerprint == first.fingerprint
        assert second.key_id == first.key_id
        assert second.unwrap(wrapped, AAD) == b"m" * 32
    with token.session() as session:
        assert len(list(session.get_objects({Attribute.LABEL: "created"}))) == 1


def test_a_creator_that_raced_another_discards_its_key(
    token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process generated the key between this one's search and its own generate:
    this one must destroy its key and refuse to start, leaving the other's as the only."""
    with token.open("raced", create_key=True) as winner:
        fingerprint = winner.fingerprint
    real_find = Pkcs11Seal._find_keys
    calls = {"n": 0}

    def find_nothing_first(self: Pkcs11Seal, session: pkcs11.Session) -> list[object]:
        calls["n"] += 1
        return [] if calls["n"] == 1 else real_find(self, session)  # type: ignore[return-value]

    monkeypatch.setattr(Pkcs11Seal, "_find_keys", find_nothing_first)
    with pytest.raises(Pkcs11SealError, match=r"\[seal\].create_key: another process"):
        token.open("raced", create_key=True)
    monkeypatch.undo()
    with token.session() as session:
        assert len(list(session.get_objects({Attribute.LABEL: "raced"}))) == 1
    with token.open("raced") as survivor:
        assert survivor.fingerprint == fingerprint


def test_duplicate_labels_are_refused(token: Token) -> None:
    with token.session(rw=True) as session:
        for _ in range(2):
            session.generate_key(
                KeyType.AES,
                256,
                label="twice",
                template={Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True},
            )
        with pytest.raises(Pkcs11SealError, match="has 2 secret keys labelled 'twice'"):
            token.open("twice", create_key=True)


def test_unknown_token_and_module(token: Token, tmp_path: Path) -> None:
    with pytest.raises(Pkcs11SealError, match=r"\[seal\].token_label: no token labelled 'nope'"):
        Pkcs11Seal.open(module=token.module, token_label="nope", key_label="k", pin=PIN)
    with pytest.raises(Pkcs11SealError, match=r"\[seal\].module: cannot load"):
        Pkcs11Seal.open(
            module=str(tmp_path / "missing.so"), token_label=TOKEN, key_label="k", pin=PIN
        )


# -- sessions and threads ---------------------------------------------------------


def test_many_threads_share_the_seal(seal: Pkcs11Seal) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(40):
                aad = material_aad(KEY_ID, 1 + n * 100 + i)
                material = bytes([n, i]) * 16
                assert seal.unwrap(seal.wrap(material, aad), aad) == material
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors


def test_a_lost_session_is_reopened(seal: Pkcs11Seal) -> None:
    wrapped = seal.wrap(b"s" * 32, AAD)
    session = seal._session
    assert session is not None
    session.close()  # as if the HSM had dropped it
    assert seal.unwrap(wrapped, AAD) == b"s" * 32
    assert seal._session is not session


def test_a_failing_hsm_is_unavailable_not_corruption(token: Token) -> None:
    class BrokenKey:
        def encrypt(self, data: bytes, **kwargs: object) -> bytes:
            raise p11.DeviceError()

        def decrypt(self, data: bytes, **kwargs: object) -> bytes:
            raise p11.DeviceError()

    with token.open("kmsd-root") as broken:
        wrapped = broken.wrap(b"k" * 32, AAD)
        broken._key = BrokenKey()  # type: ignore[assignment]
        with pytest.raises(UnavailableError, match="failed to unwrap"):
            broken.unwrap(wrapped, AAD)
        with pytest.raises(UnavailableError, match="failed to wrap"):
            broken.wrap(b"k" * 32, AAD)


# -- [seal] options -----------------------------------------------------------------


def _config(seal_table: dict[str, object]) -> Config:
    return config_from_dict({"node": {"data_dir": "/var/lib/kmsd"}, "seal": seal_table, **PLAIN})


PKCS11 = {
    "type": "pkcs11",
    "module": "/usr/lib/softhsm/libsofthsm2.so",
    "token_label": "kmsd",
    "key_label": "kmsd-root",
    "pin_file": "hsm.pin",
}


def test_pkcs11_options_parse() -> None:
    config = config_from_dict({"node": {"data_dir": "/var/lib/kmsd"}, "seal": PKCS11, **PLAIN})
    assert config.seal.type == "pkcs11"
    assert config.seal.module == PKCS11["module"]
    assert config.seal.token_label == "kmsd" and config.seal.key_label == "kmsd-root"
    assert config.seal_pin_file == Path("/var/lib/kmsd/hsm.pin")
    assert config.seal.create_key is False
    env = {**PKCS11, "pin_env": "KMSD_HSM_PIN", "create_key": True}
    del env["pin_file"]
    config = config_from_dict({"node": {"data_dir": "/d"}, "seal": env, **PLAIN})
    assert config.seal_pin_file is None and config.seal.pin_env == "KMSD_HSM_PIN"
    assert config.seal.create_key is True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"module": None}, r"\[seal\].module: required"),
        ({"token_label": None}, r"\[seal\].token_label: required"),
        ({"token_label": "x" * 33}, r"\[seal\].token_label: .*32 bytes"),
        ({"key_label": None}, r"\[seal\].key_label: required"),
        ({"pin_file": None}, r"\[seal\].pin_file: set exactly one of pin_file and pin_env"),
        ({"pin_env": "KMSD_HSM_PIN"}, r"\[seal\].pin_file: set exactly one"),
        ({"pin_file": None, "pin_env": "1BAD"}, r"\[seal\].pin_env: '1BAD' is not"),
        ({"pin_file": ""}, r"\[seal\].pin_file: must not be empty"),
        ({"path": "root.key"}, r'\[seal\].path: not an option of \[seal\].type = "pkcs11"'),
        ({"create_key": "yes"}, r"\[seal\].create_key: wrong type"),
        ({"pin": "1234"}, r"\[seal\].pin: unknown option"),
        ({"type": "vault"}, r"\[seal\].type: 'vault' is not supported"),
    ],
)
def test_bad_pkcs11_options_name_the_option(change: dict[str, object], message: str) -> None:
    table = {**PKCS11, **change}
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        _config(table)


def test_pkcs11_options_are_refused_for_the_file_seal() -> None:
    with pytest.raises(ConfigError, match=r'\[seal\].module: not an option of .*"file"'):
        _config({"module": "/usr/lib/softhsm/libsofthsm2.so"})


def test_the_node_opens_the_configured_seal(token: Token, tmp_path: Path) -> None:
    from kmsd.app import open_seal

    (tmp_path / "hsm.pin").write_text(PIN)
    (tmp_path / "hsm.pin").chmod(0o600)
    config = config_from_dict(
        {
            "node": {"data_dir": str(tmp_path)},
            "seal": {**PKCS11, "module": token.module, "token_label": TOKEN},
            **PLAIN,
        }
    )
    opened = open_seal(config)
    try:
        assert isinstance(opened, Pkcs11Seal) and opened.name == "pkcs11"
    finally:
        opened.close()
    (tmp_path / "hsm.pin").chmod(0o644)
    with pytest.raises(Pkcs11SealError, match=r"\[seal\].pin_file"):
        open_seal(config)
    file_config = config_from_dict({"node": {"data_dir": str(tmp_path)}, **PLAIN})
    assert open_seal(file_config).name == "file"
