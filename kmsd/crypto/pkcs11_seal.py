"""The `pkcs11` seal: the root key is a non-extractable AES-256 key inside an HSM.

Wrapping and unwrapping are AES-256-GCM (CKM_AES_GCM) performed *inside* the token with
a random 12-byte IV and the material AAD; the root key never leaves the HSM
(CKA_EXTRACTABLE = false, CKA_SENSITIVE = true, and kmsd refuses a key that is not).
Wrapped format: 0x02 ‖ IV ‖ ciphertext ‖ tag (docs/ciphertext-format.md §5); set-up:
docs/hsm.md.

Concurrency: a PKCS#11 session is not thread-safe and kmsd calls the seal from the
asyncio thread and from I/O threads, so one logged-in session is shared under a lock.
A session the HSM dropped (restart, network HSM failover) is reopened once per call.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams
from pkcs11.types import DecryptMixin, EncryptMixin

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Library

from kmsd.errors import StorageCorruptedError, UnavailableError

__all__ = [
    "PKCS11_WRAP_FORMAT_VERSION",
    "Pkcs11Seal",
    "Pkcs11SealError",
    "read_pin",
]

PKCS11_WRAP_FORMAT_VERSION = 2
KEY_BITS = 256
_IV_SIZE = 12
_TAG_SIZE = 16
_VERSION_BYTE = bytes([PKCS11_WRAP_FORMAT_VERSION])
_MIN_WRAPPED = 1 + _IV_SIZE + _TAG_SIZE
# The fingerprint is a GMAC (GCM over an empty plaintext) of a constant under this IV;
# wrap() never uses it, so no (key, IV) pair is ever used for two different inputs.
_FINGERPRINT_IV = bytes(_IV_SIZE)
_FINGERPRINT_AAD = b"kmsd-seal-fingerprint"
_FINGERPRINT_PREFIX = b"kmsd-seal-fingerprint/pkcs11"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_PIN_FILE = 4096
_FIND_ATTEMPTS = 3

# The HSM lost the session (restarted, logged out, network HSM failed over): reopen it.
_SESSION_LOST: tuple[type[Exception], ...] = (
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.UserNotLoggedIn,
    p11.DeviceRemoved,
    p11.TokenNotPresent,
    p11.KeyHandleInvalid,
    p11.ObjectHandleInvalid,
)

_T = TypeVar("_T")


class _HsmKey(Protocol):
    """The part of a python-pkcs11 AES SecretKey the seal uses."""

    def encrypt(self, data: bytes, buffer_size: int = ..., **kwargs: Any) -> Any: ...

    def decrypt(self, data: bytes, buffer_size: int = ..., **kwargs: Any) -> Any: ...

    def __getitem__(self, key: Attribute) -> Any: ...

    def destroy(self) -> None: ...


class Pkcs11SealError(ValueError):
    """The pkcs11 seal cannot start; the message names the [seal] option to look at."""


def read_pin(
    pin_file: Path | None, pin_env: str | None, environ: Mapping[str, str] = os.environ
) -> str:
    """The token's user PIN, from exactly one of a file (mode 0600 or stricter; one
    trailing newline is ignored) or an environment variable. Never from argv."""
    if (pin_file is None) == (not pin_env):
        raise Pkcs11SealError("[seal].pin_file: set exactly one of pin_file and pin_env")
    if pin_env:
        if not _ENV_NAME.fullmatch(pin_env):
            raise Pkcs11SealError(
                f"[seal].pin_env: '{pin_env}' is not an environment variable name"
            )
        pin = environ.get(pin_env, "")
        if not pin:
            raise Pkcs11SealError(
                f"[seal].pin_env: the environment variable {pin_env} is not set or is empty"
            )
        return pin
    assert pin_file is not None
    try:
        fd = os.open(pin_file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as error:
        raise Pkcs11SealError(
            f"[seal].pin_file: cannot open {pin_file}: {error.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Pkcs11SealError(f"[seal].pin_file: {pin_file} is not a regular file")
        if st.st_mode & 0o077:
            raise Pkcs11SealError(
                f"[seal].pin_file: {pin_file} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {pin_file}"
            )
        data = os.read(fd, _MAX_PIN_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_PIN_FILE:
        raise Pkcs11SealError(f"[seal].pin_file: {pin_file} is too large to be a PIN")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    try:
        pin = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Pkcs11SealError(f"[seal].pin_file: {pin_file} is not UTF-8 text") from None
    if not pin:
        raise Pkcs11SealError(f"[seal].pin_file: {pin_file} is empty")
    return pin


def _key_template(key_label: str, key_id: bytes) -> dict[Attribute, Any]:
    """A persistent AES-256 key that can only encrypt and decrypt, and never leave."""
    return {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.LABEL: key_label,
        Attribute.ID: key_id,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: True,
        Attribute.DECRYPT: True,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.DERIVE: False,
    }


class Pkcs11Seal:
    """The `pkcs11` seal: AES-256-GCM inside a PKCS#11 token, under a key found by label.

    Wrapped format: 0x02 ‖ 12-byte random IV ‖ AES-256-GCM(HSM key, IV, plaintext, aad)
    ‖ 16-byte tag. Build one with `Pkcs11Seal.open`; `close` ends its session.
    """

    def __init__(
        self,
        library: Pkcs11Library,
        token_label: str,
        key_label: str,
        pin: str,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """Touches no token: use `open`, which logs in and finds, checks or creates the key."""
        self._lib = library
        self._token_label = token_label
        self._key_label = key_label
        self._pin = pin
        self._rng = rng
        self._lock = threading.Lock()
        self._session: pkcs11.Session | None = None
        self._key: _HsmKey | None = None
        self._key_id = b""
        self._fingerprint = ""

    def __repr__(self) -> str:
        return (
            f"Pkcs11Seal(token={self._token_label!r}, key={self._key_label!r}, "
            f"fingerprint={self._fingerprint!r})"
        )

    @classmethod
    def open(
        cls,
        *,
        module: str,
        token_label: str,
        key_label: str,
        pin: str,
        create_key: bool = False,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> Pkcs11Seal:
        """Loads the PKCS#11 module, logs in to the token labelled `token_label` and finds
        the AES-256 key labelled `key_label`, generating it in the token (non-extractable)
        if it is absent and `create_key` is set.

        Raises Pkcs11SealError naming the [seal] option at fault: module not loadable,
        no such token, PIN refused or locked, key missing, duplicated, of the wrong kind,
        or extractable.
        """
        try:
            library = pkcs11.lib(module)
        except p11.PKCS11Error as error:
            # An empty message is usually C_Initialize failing (e.g. SoftHSM2 without a
            # readable SOFTHSM2_CONF), so name the PKCS#11 error class at least.
            raise Pkcs11SealError(
                f"[seal].module: cannot load or initialise the PKCS#11 module {module}: "
                f"{str(error) or type(error).__name__} (for SoftHSM2, check that SOFTHSM2_CONF "
                "names a readable configuration)"
            ) from None
        seal = cls(library, token_label, key_label, pin, rng)
        try:
            with seal._lock:
                seal._connect(create_key=create_key)
        except BaseException:
            seal.close()
            raise
        return seal

    # -- the Seal protocol -------------------------------------------------------------

    @property
    def name(self) -> str:
        return "pkcs11"

    @property
    def fingerprint(self) -> str:
        """16 hex chars of SHA-256(b"kmsd-seal-fingerprint/pkcs11" ‖ GMAC), where GMAC is
        the 16-byte tag of AES-256-GCM(HSM key, IV = 12 zero bytes, plaintext = b"",
        AAD = b"kmsd-seal-fingerprint") computed in the token: equal on every node that
        uses the same HSM key, and useless for recovering it."""
        return self._fingerprint

    @property
    def key_id(self) -> str:
        """The key's CKA_ID, hex (set to 16 random bytes when kmsd generates the key)."""
        return self._key_id.hex()

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        iv = self._rng(_IV_SIZE)
        if len(iv) != _IV_SIZE:
            raise ValueError("rng returned the wrong number of bytes")
        if iv == _FINGERPRINT_IV:
            raise ValueError("rng returned the all-zero IV, which is reserved")
        params = GCMParams(iv, aad, _TAG_SIZE * 8)
        try:
            sealed = self._call(
                lambda key: key.encrypt(
                    plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params
                )
            )
        except (p11.PKCS11Error, Pkcs11SealError) as error:
            raise self._unavailable("wrap", error) from None
        assert isinstance(sealed, bytes)
        if len(sealed) != len(plaintext) + _TAG_SIZE:
            raise UnavailableError(
                f"the HSM (token '{self._token_label}') returned {len(sealed)} bytes for an "
                f"AES-GCM encryption of {len(plaintext)} bytes"
            )
        return _VERSION_BYTE + iv + sealed

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) >= 1 and wrapped[0] == 1:
            raise StorageCorruptedError(
                "wrapped key material is in the file seal's format (0x01), but this node's "
                f"seal is pkcs11 (fingerprint {self._fingerprint}): every node of a cluster "
                "must use the same seal"
            )
        if len(wrapped) < _MIN_WRAPPED or wrapped[0] != PKCS11_WRAP_FORMAT_VERSION:
            raise StorageCorruptedError(
                "wrapped key material is malformed (truncated or unknown wrap format)"
            )
        params = GCMParams(wrapped[1 : 1 + _IV_SIZE], aad, _TAG_SIZE * 8)
        body = wrapped[1 + _IV_SIZE :]
        try:
            plain = self._call(
                lambda key: key.decrypt(body, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            )
        except (p11.PKCS11Error, Pkcs11SealError) as error:
            # Tokens report a bad tag differently (SoftHSM2: CKR_GENERAL_ERROR; the spec:
            # CKR_ENCRYPTED_DATA_INVALID). Tell it from a failing HSM by checking that the
            # token still computes this key's fingerprint.
            if not self._token_works():
                raise self._unavailable("unwrap", error) from None
            raise StorageCorruptedError(
                "wrapped key material failed authentication in the HSM: the root key (token "
                f"'{self._token_label}', key '{self._key_label}', fingerprint "
                f"{self._fingerprint}) is not the one it was wrapped with, or the stored data "
                "was tampered with"
            ) from None
        assert isinstance(plain, bytes)
        return plain

    # -- sessions ---------------------------------------------------------------------

    def close(self) -> None:
        """Closes the session (the last session of a process also logs it out). A later
        wrap or unwrap opens a new one."""
        with self._lock:
            self._drop_session()

    def __enter__(self) -> Pkcs11Seal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _drop_session(self) -> None:
        session, self._session, self._key = self._session, None, None
        if session is not None:
            with suppress(p11.PKCS11Error):  # the HSM may have dropped it already
                session.close()

    def _call(self, operation: Callable[[_HsmKey], _T]) -> _T:
        """Runs `operation` on the key under the lock, reopening a lost session once."""
        with self._lock:
            if self._key is None:
                self._connect(create_key=False)
            assert self._key is not None
            try:
                return operation(self._key)
            except _SESSION_LOST:
                self._drop_session()
                self._connect(create_key=False)
                assert self._key is not None
                return operation(self._key)

    def _token_works(self) -> bool:
        try:
            return self._call(self._gmac_fingerprint) == self._fingerprint
        except (p11.PKCS11Error, Pkcs11SealError):
            return False

    def _unavailable(self, what: str, error: Exception) -> UnavailableError:
        return UnavailableError(
            f"the HSM (token '{self._token_label}', key '{self._key_label}') failed to "
            f"{what} key material: {type(error).__name__} {error}".rstrip()
        )

    @staticmethod
    def _gmac_fingerprint(key: _HsmKey) -> str:
        tag = key.encrypt(
            b"",
            mechanism=Mechanism.AES_GCM,
            mechanism_param=GCMParams(_FINGERPRINT_IV, _FINGERPRINT_AAD, _TAG_SIZE * 8),
        )
        assert isinstance(tag, bytes)
        return hashlib.sha256(_FINGERPRINT_PREFIX + tag).hexdigest()[:16]

    def _token(self) -> pkcs11.Token:
        try:
            token: pkcs11.Token = self._lib.get_token(token_label=self._token_label)
        except p11.NoSuchToken:
            raise Pkcs11SealError(
                f"[seal].token_label: no token labelled '{self._token_label}' in "
                f"{self._lib.so} (is the token initialised, and, for SoftHSM2, does "
                "SOFTHSM2_CONF point at its configuration?)"
            ) from None
        except p11.MultipleTokensReturned:
            raise Pkcs11SealError(
                f"[seal].token_label: more than one token is labelled '{self._token_label}'"
            ) from None
        flags = token.flags
        if flags & TokenFlag.USER_PIN_LOCKED:
            raise Pkcs11SealError(
                f"[seal].token_label: the user PIN of token '{self._token_label}' is locked; "
                "unlock it with the HSM's tools (SoftHSM2: softhsm2-util --init-pin ... as SO)"
            )
        if flags & TokenFlag.USER_PIN_FINAL_TRY:
            # One more wrong PIN would lock the token; a node restarting in a loop with a
            # bad PIN must not be what locks it.
            raise Pkcs11SealError(
                f"[seal].token_label: token '{self._token_label}' will lock its user PIN at "
                "the next wrong attempt, so kmsd will not try; check the PIN and log in once "
                "with the HSM's tools to reset the counter"
            )
        return token

    @contextmanager
    def _logged_in(self, token: pkcs11.Token, rw: bool) -> Iterator[pkcs11.Session]:
        """A new session on `token`, logged in as the user; closed on error."""
        try:
            session = token.open(rw=rw, user_pin=self._pin)
        except p11.UserAlreadyLoggedIn:
            # Login state belongs to the process, not the session: another session of
            # this process (another seal on the same token) is logged in already.
            session = token.open(rw=rw)
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
            raise Pkcs11SealError(
                f"[seal].pin_file/pin_env: token '{self._token_label}' refused the PIN"
            ) from None
        except p11.PinLocked:
            raise Pkcs11SealError(
                f"[seal].pin_file/pin_env: the user PIN of token '{self._token_label}' is locked"
            ) from None
        except p11.PinExpired:
            raise Pkcs11SealError(
                f"[seal].pin_file/pin_env: the user PIN of token '{self._token_label}' has "
                "expired; set a new one with the HSM's tools"
            ) from None
        try:
            yield session
        except BaseException:
            with suppress(p11.PKCS11Error):
                session.close()
            raise

    def _find_keys(self, session: pkcs11.Session) -> list[_HsmKey]:
        template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: self._key_label}
        for _ in range(_FIND_ATTEMPTS):
            try:
                found = list(session.get_objects(template))
            except p11.ObjectHandleInvalid:
                continue  # another process destroyed a match while we read it: look again
            return [
                cast(_HsmKey, key)
                for key in found
                if isinstance(key, pkcs11.SecretKey)
                and isinstance(key, EncryptMixin)
                and isinstance(key, DecryptMixin)
            ]
        raise Pkcs11SealError(
            f"[seal].key_label: keys labelled '{self._key_label}' on token "
            f"'{self._token_label}' keep disappearing while kmsd reads them"
        )

    def _check_key(self, key: _HsmKey) -> None:
        where = f"[seal].key_label: key '{self._key_label}' on token '{self._token_label}'"
        if key[Attribute.KEY_TYPE] != KeyType.AES or key[Attribute.VALUE_LEN] != KEY_BITS // 8:
            raise Pkcs11SealError(f"{where} is not an AES-256 key")
        if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
            raise Pkcs11SealError(
                f"{where} is extractable or not sensitive: the root key must never leave the "
                "HSM (generate it with CKA_EXTRACTABLE=false, CKA_SENSITIVE=true; docs/hsm.md)"
            )
        if not (key[Attribute.ENCRYPT] and key[Attribute.DECRYPT]):
            raise Pkcs11SealError(f"{where} must allow encrypt and decrypt (CKA_ENCRYPT/DECRYPT)")

    def _connect(self, *, create_key: bool) -> None:
        """Opens the session and finds, checks and fingerprints the key. Holds _lock."""
        token = self._token()
        with self._logged_in(token, rw=False) as session:
            keys = self._find_keys(session)
            if not keys and create_key:
                keys = self._create_key(token, session)
            if not keys:
                raise Pkcs11SealError(
                    f"[seal].key_label: token '{self._token_label}' has no secret key labelled "
                    f"'{self._key_label}'; generate it (docs/hsm.md) or set "
                    "[seal].create_key = true"
                )
            if len(keys) > 1:
                raise Pkcs11SealError(
                    f"[seal].key_label: token '{self._token_label}' has {len(keys)} secret keys "
                    f"labelled '{self._key_label}'; exactly one must be (delete the extra ones "
                    "that wrapped nothing, comparing fingerprints)"
                )
            key = keys[0]
            self._check_key(key)
            try:
                fingerprint = self._gmac_fingerprint(key)
            except p11.PKCS11Error as error:
                raise Pkcs11SealError(
                    f"[seal].key_label: key '{self._key_label}' cannot encrypt with CKM_AES_GCM "
                    f"in token '{self._token_label}': {type(error).__name__}"
                ) from None
            if self._fingerprint and fingerprint != self._fingerprint:
                # After a reconnect, a different key under the same label must not be used.
                raise Pkcs11SealError(
                    f"[seal].key_label: key '{self._key_label}' on token '{self._token_label}' "
                    f"now has fingerprint {fingerprint}, not {self._fingerprint}"
                )
            self._session, self._key = session, key
            self._key_id = bytes(key[Attribute.ID])
            self._fingerprint = fingerprint

    def _create_key(self, token: pkcs11.Token, session: pkcs11.Session) -> list[_HsmKey]:
        """Generates the key in the token. PKCS#11 has no create-if-absent, so if another
        process generated one under the same label at the same moment, this one destroys
        its own and refuses to start rather than risk two root keys (docs/hsm.md: in a
        cluster, let one node create the key, or generate it beforehand)."""
        key_id = self._rng(16)
        try:
            # Login state belongs to the process: `session` is logged in already.
            rw_session = token.open(rw=True)
        except p11.PKCS11Error as error:
            raise Pkcs11SealError(
                f"[seal].create_key: cannot open a read-write session on token "
                f"'{self._token_label}': {type(error).__name__} {error}".rstrip()
            ) from None
        try:
            created = rw_session.generate_key(
                KeyType.AES, KEY_BITS, store=True, template=_key_template(self._key_label, key_id)
            )
            keys = self._find_keys(session)
            if len(keys) > 1:
                created.destroy()
        except (p11.SessionReadOnly, p11.TokenWriteProtected):
            raise Pkcs11SealError(
                f"[seal].create_key: token '{self._token_label}' is read-only; generate "
                f"the key '{self._key_label}' with the HSM's tools (docs/hsm.md)"
            ) from None
        except p11.PKCS11Error as error:
            raise Pkcs11SealError(
                f"[seal].create_key: token '{self._token_label}' could not generate a "
                f"non-extractable AES-256 key: {type(error).__name__} {error}".rstrip()
            ) from None
        finally:
            with suppress(p11.PKCS11Error):
                rw_session.close()
        if len(keys) > 1:
            raise Pkcs11SealError(
                f"[seal].create_key: another process created a key labelled "
                f"'{self._key_label}' on token '{self._token_label}' at the same moment; this "
                "node discarded its own. Let one node create the key (docs/hsm.md), then "
                "restart"
            )
        return keys
