"""The data plane: Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext), GenerateRandom.

These read the local key store (after `Kms.read`) and never write the log. Each
authorizes its caller on the key (kmsd.service.access) once the state is fresh enough
and before anything about the key is revealed; Decrypt finds its key in the
ciphertext's header first. Key material is unwrapped once per version and cached in
memory; plaintext, data keys and material are never logged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import resources_pb2 as res

from kmsd.auth.authorizer import Caller
from kmsd.auth.conditions import ContextValue
from kmsd.crypto import ciphertext
from kmsd.crypto.keygen import new_data_key
from kmsd.errors import (
    DryRunError,
    IncorrectKeyError,
    InvalidCiphertextError,
    InvalidKeyUsageError,
    KmsError,
    NotFoundError,
    UnsupportedOperationError,
    ValidationError,
)
from kmsd.fsm.key_states import check_key_state
from kmsd.service import access, validate
from kmsd.service.context import Kms

SYMMETRIC = res.ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT
_ALGORITHMS_OK = (res.ENCRYPTION_ALGORITHM_SPEC_UNSPECIFIED, SYMMETRIC)
_DATA_KEY_BYTES: dict[int, int] = {res.DATA_KEY_SPEC_AES_256: 32, res.DATA_KEY_SPEC_AES_128: 16}
# Condition keys every symmetric cryptographic operation has.
_CRYPTO_KEYS: dict[str, ContextValue] = {"kms:encryptionalgorithm": "SYMMETRIC_DEFAULT"}


def _algorithm(field: str, value: int) -> None:
    if value not in _ALGORITHMS_OK:
        raise InvalidKeyUsageError(
            f"{field}: {res.EncryptionAlgorithmSpec.Name(value)} is not supported by"  # type: ignore[arg-type]
            " symmetric keys; use ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT."
        )


def _usable(kms: Kms, key: fsm.KeyRecord, operation: str) -> str:
    """Checks usage and state for `operation`; returns the key ARN."""
    arn = kms.names.key_arn(key.key_id)
    if key.key_usage != res.KEY_USAGE_ENCRYPT_DECRYPT:
        raise InvalidKeyUsageError(f"{arn} cannot be used to encrypt or decrypt.")
    check_key_state(operation, arn, key.key_state)
    return arn


def _encrypt_with(
    kms: Kms, key: fsm.KeyRecord, plaintext: bytes, context: Mapping[str, str]
) -> tuple[bytes, int]:
    """Encrypts under the key's newest material; returns the blob and that version."""
    version = key.materials[-1].version
    blob = ciphertext.encrypt(
        kms.materials.backing_key(key, version),
        kms.materials.key_uuid(key.key_id),
        version,
        plaintext,
        context,
        kms.rng,
    )
    return blob, version


def _authorized(
    kms: Kms,
    caller: Caller,
    key_ref: str,
    action: str,
    context: Mapping[str, str],
    field: str = "key_id",
) -> fsm.KeyRecord:
    """The key `key_ref` names, once `caller` may do `action` on it with `context`."""
    key = access.resolve(kms, caller, key_ref, action, field)
    access.authorize(
        kms, caller, key, action, key_ref, encryption_context=context, extra=_CRYPTO_KEYS
    )
    return key


def _decrypt_blob(
    kms: Kms,
    caller: Caller,
    blob: bytes,
    context: Mapping[str, str],
    named_key: str,
    operation: str,
    field: str,
    key_field: str,
    dry_run: bool,
) -> tuple[bytes, fsm.KeyRecord, str]:
    """Decrypts `blob`; returns plaintext, the key and the material id used. The key
    comes from the blob's header (a malformed one is InvalidCiphertext, before any
    authorization); the caller needs kms:Decrypt (kms:ReEncryptFrom for ReEncrypt) on
    it, and a key that does not exist looks forbidden to non-administrators."""
    action = "kms:Decrypt" if operation == "Decrypt" else "kms:ReEncryptFrom"
    validate.ciphertext(blob, field)
    header = ciphertext.parse_header(blob)
    key = kms.store.key(str(header.key_id))
    if named_key:
        named = _authorized(kms, caller, named_key, action, context, key_field)
        if key is None or named.key_id != key.key_id:
            raise IncorrectKeyError(
                f"The key named in {key_field} is not the key that encrypted the ciphertext."
            )
    else:
        header_arn = kms.names.key_arn(str(header.key_id))
        if key is None:
            if access.hides_existence(kms, caller):
                raise access.denied(caller, action, header_arn, "no such key")
            raise InvalidCiphertextError()
        access.authorize(
            kms,
            caller,
            key,
            action,
            header_arn,
            encryption_context=context,
            extra=_CRYPTO_KEYS,
        )
    if header.material_version > len(key.materials):
        raise InvalidCiphertextError()
    _usable(kms, key, operation)
    if dry_run and operation != "ReEncrypt":
        raise DryRunError()
    backing = kms.materials.backing_key(key, header.material_version)
    plaintext = ciphertext.decrypt(backing, blob, context)
    return plaintext, key, kms.materials.material_id(key.key_id, header.material_version)


def _common(context: Mapping[str, str], grant_tokens: Sequence[str], field: str) -> None:
    validate.encryption_context(context, field)
    validate.grant_tokens(grant_tokens)


def _knows_key(kms: Kms, key_ref: str) -> bool:
    try:
        kms.names.resolve(kms.store, key_ref)
    except NotFoundError:
        return False
    except KmsError:
        return True  # malformed: the operation itself reports it
    return True


def _knows_material(kms: Kms, blob: bytes) -> bool:
    try:
        header = ciphertext.parse_header(blob)
    except KmsError:
        return True
    key = kms.store.key(str(header.key_id))
    return key is not None and header.material_version <= len(key.materials)


async def _crypto_read(
    kms: Kms, min_commit_index: int, key_refs: Sequence[str] = (), blob: bytes = b""
) -> None:
    """A bounded-staleness read; if this replica does not know a key or material version
    the request names (created moments ago elsewhere), a linearizable read first."""
    if not kms.fresh_for_crypto(min_commit_index):
        await kms.read(min_commit_index, crypto=True)
    if any(ref and not _knows_key(kms, ref) for ref in key_refs) or (
        blob and not _knows_material(kms, blob)
    ):
        await kms.read()


async def encrypt(kms: Kms, request: pb.EncryptRequest, caller: Caller) -> pb.EncryptResponse:
    validate.plaintext(request.plaintext)
    _common(request.encryption_context, request.grant_tokens, "encryption_context")
    _algorithm("encryption_algorithm", request.encryption_algorithm)
    await access.wait_for_grant_tokens(kms, request.grant_tokens)
    await _crypto_read(kms, request.min_commit_index, [request.key_id])
    key = _authorized(kms, caller, request.key_id, "kms:Encrypt", request.encryption_context)
    arn = _usable(kms, key, "Encrypt")
    if request.dry_run:
        raise DryRunError()
    blob, _ = _encrypt_with(kms, key, request.plaintext, request.encryption_context)
    return pb.EncryptResponse(ciphertext_blob=blob, key_id=arn, encryption_algorithm=SYMMETRIC)


def _ignore_ciphertext(modifiers: Sequence[int]) -> bool:
    return pb.DRY_RUN_MODIFIER_IGNORE_CIPHERTEXT in modifiers


async def decrypt(kms: Kms, request: pb.DecryptRequest, caller: Caller) -> pb.DecryptResponse:
    _common(request.encryption_context, request.grant_tokens, "encryption_context")
    _algorithm("encryption_algorithm", request.encryption_algorithm)
    if request.HasField("recipient"):
        raise UnsupportedOperationError("recipient: Nitro enclave recipients are not supported.")
    ignore_ciphertext = request.dry_run and _ignore_ciphertext(request.dry_run_modifiers)
    if ignore_ciphertext and not request.key_id:
        raise ValidationError("key_id", "is required with DRY_RUN_MODIFIER_IGNORE_CIPHERTEXT")
    await access.wait_for_grant_tokens(kms, request.grant_tokens)
    await _crypto_read(kms, request.min_commit_index, [request.key_id], request.ciphertext_blob)
    if ignore_ciphertext:
        key = _authorized(kms, caller, request.key_id, "kms:Decrypt", request.encryption_context)
        _usable(kms, key, "Decrypt")
        raise DryRunError()
    plaintext, key, used = _decrypt_blob(
        kms,
        caller,
        request.ciphertext_blob,
        request.encryption_context,
        request.key_id,
        "Decrypt",
        "ciphertext_blob",
        "key_id",
        request.dry_run,
    )
    return pb.DecryptResponse(
        key_id=kms.names.key_arn(key.key_id),
        plaintext=plaintext,
        encryption_algorithm=SYMMETRIC,
        key_material_id=used,
    )


async def re_encrypt(
    kms: Kms, request: pb.ReEncryptRequest, caller: Caller
) -> pb.ReEncryptResponse:
    _common(request.source_encryption_context, request.grant_tokens, "source_encryption_context")
    validate.encryption_context(
        request.destination_encryption_context, "destination_encryption_context"
    )
    _algorithm("source_encryption_algorithm", request.source_encryption_algorithm)
    _algorithm("destination_encryption_algorithm", request.destination_encryption_algorithm)
    ignore_ciphertext = request.dry_run and _ignore_ciphertext(request.dry_run_modifiers)
    if not ignore_ciphertext:
        # Input limits are checked before any key is looked up, as for every other field.
        validate.ciphertext(request.ciphertext_blob)
    elif not request.source_key_id:
        raise ValidationError(
            "source_key_id", "is required with DRY_RUN_MODIFIER_IGNORE_CIPHERTEXT"
        )
    await access.wait_for_grant_tokens(kms, request.grant_tokens)
    await _crypto_read(
        kms,
        request.min_commit_index,
        [request.destination_key_id, request.source_key_id],
        request.ciphertext_blob,
    )
    destination = _authorized(
        kms,
        caller,
        request.destination_key_id,
        "kms:ReEncryptTo",
        request.destination_encryption_context,
        "destination_key_id",
    )
    destination_arn = _usable(kms, destination, "ReEncrypt")
    if ignore_ciphertext:
        source_key = _authorized(
            kms,
            caller,
            request.source_key_id,
            "kms:ReEncryptFrom",
            request.source_encryption_context,
            "source_key_id",
        )
        _usable(kms, source_key, "ReEncrypt")
        raise DryRunError()
    plaintext, source, source_material = _decrypt_blob(
        kms,
        caller,
        request.ciphertext_blob,
        request.source_encryption_context,
        request.source_key_id,
        "ReEncrypt",
        "ciphertext_blob",
        "source_key_id",
        request.dry_run,
    )
    if request.dry_run:
        raise DryRunError()
    blob, destination_version = _encrypt_with(
        kms, destination, plaintext, request.destination_encryption_context
    )
    return pb.ReEncryptResponse(
        ciphertext_blob=blob,
        source_key_id=kms.names.key_arn(source.key_id),
        key_id=destination_arn,
        source_encryption_algorithm=SYMMETRIC,
        destination_encryption_algorithm=SYMMETRIC,
        source_key_material_id=source_material,
        destination_key_material_id=kms.materials.material_id(
            destination.key_id, destination_version
        ),
    )


def _data_key_length(key_spec: int, number_of_bytes: int) -> int:
    if key_spec and number_of_bytes:
        raise ValidationError("number_of_bytes", "give key_spec or number_of_bytes, not both")
    if key_spec:
        length = _DATA_KEY_BYTES.get(key_spec)
        if length is None:
            raise ValidationError(
                "key_spec", "must be DATA_KEY_SPEC_AES_256 or DATA_KEY_SPEC_AES_128"
            )
        return length
    if not number_of_bytes:
        raise ValidationError("key_spec", "either key_spec or number_of_bytes is required")
    validate.in_range("number_of_bytes", number_of_bytes, 1, 1024)
    return number_of_bytes


async def _data_key(
    kms: Kms,
    caller: Caller,
    key_ref: str,
    context: Mapping[str, str],
    grant_tokens: Sequence[str],
    length: int,
    operation: str,
    dry_run: bool,
    min_commit_index: int,
) -> tuple[bytes, bytes, str, str]:
    _common(context, grant_tokens, "encryption_context")
    await access.wait_for_grant_tokens(kms, grant_tokens)
    await _crypto_read(kms, min_commit_index, [key_ref])
    key = _authorized(kms, caller, key_ref, f"kms:{operation}", context)
    arn = _usable(kms, key, operation)
    if dry_run:
        raise DryRunError()
    data_key = new_data_key(length, kms.rng)
    blob, version = _encrypt_with(kms, key, data_key, context)
    return data_key, blob, arn, kms.materials.material_id(key.key_id, version)


async def generate_data_key(
    kms: Kms, request: pb.GenerateDataKeyRequest, caller: Caller
) -> pb.GenerateDataKeyResponse:
    length = _data_key_length(request.key_spec, request.number_of_bytes)
    if request.HasField("recipient"):
        raise UnsupportedOperationError("recipient: Nitro enclave recipients are not supported.")
    data_key, blob, arn, used = await _data_key(
        kms,
        caller,
        request.key_id,
        request.encryption_context,
        request.grant_tokens,
        length,
        "GenerateDataKey",
        request.dry_run,
        request.min_commit_index,
    )
    return pb.GenerateDataKeyResponse(
        ciphertext_blob=blob, plaintext=data_key, key_id=arn, key_material_id=used
    )


async def generate_data_key_without_plaintext(
    kms: Kms, request: pb.GenerateDataKeyWithoutPlaintextRequest, caller: Caller
) -> pb.GenerateDataKeyWithoutPlaintextResponse:
    length = _data_key_length(request.key_spec, request.number_of_bytes)
    _, blob, arn, used = await _data_key(
        kms,
        caller,
        request.key_id,
        request.encryption_context,
        request.grant_tokens,
        length,
        "GenerateDataKeyWithoutPlaintext",
        request.dry_run,
        request.min_commit_index,
    )
    return pb.GenerateDataKeyWithoutPlaintextResponse(
        ciphertext_blob=blob, key_id=arn, key_material_id=used
    )


async def generate_random(
    kms: Kms, request: pb.GenerateRandomRequest, caller: Caller
) -> pb.GenerateRandomResponse:
    if request.custom_key_store_id:
        raise UnsupportedOperationError("custom_key_store_id: custom key stores are not supported.")
    if request.HasField("recipient"):
        raise UnsupportedOperationError("recipient: Nitro enclave recipients are not supported.")
    if not request.number_of_bytes:
        raise ValidationError("number_of_bytes", "is required")
    validate.in_range("number_of_bytes", request.number_of_bytes, 1, 1024)
    access.require_account(kms, caller, "GenerateRandom")
    return pb.GenerateRandomResponse(plaintext=kms.rng(request.number_of_bytes))
