"""The AWS KMS key-state table: which operation is allowed in which key state.

Mirrors "Key states of AWS KMS keys" (AWS KMS Developer Guide) for the states
kmsd uses. An operation not allowed in a state raises the exact exception AWS
documents: `DisabledException` for most uses of a Disabled key,
`KMSInvalidStateException` otherwise.
"""

from __future__ import annotations

from kms.v1 import resources_pb2 as res

from kmsd.errors import DisabledError, InvalidStateError, KmsError

ENABLED = res.KEY_STATE_ENABLED
DISABLED = res.KEY_STATE_DISABLED
PENDING_DELETION = res.KEY_STATE_PENDING_DELETION

_Rule = dict[int, type[KmsError]]

# Operations allowed in every state kmsd uses.
_ALWAYS: _Rule = {}
# Cryptographic use: Disabled -> DisabledException, PendingDeletion -> KMSInvalidState.
_CRYPTO: _Rule = {DISABLED: DisabledError, PENDING_DELETION: InvalidStateError}
# Management of a key that is not being deleted.
_NOT_PENDING: _Rule = {PENDING_DELETION: InvalidStateError}

_TABLE: dict[str, _Rule] = {
    "DescribeKey": _ALWAYS,
    "ListResourceTags": _ALWAYS,
    "ListAliases": _ALWAYS,
    "DeleteAlias": _ALWAYS,
    "GetKeyRotationStatus": _ALWAYS,
    "ListKeyRotations": _ALWAYS,
    "Encrypt": _CRYPTO,
    "Decrypt": _CRYPTO,
    "ReEncrypt": _CRYPTO,
    "GenerateDataKey": _CRYPTO,
    "GenerateDataKeyWithoutPlaintext": _CRYPTO,
    "EnableKeyRotation": _CRYPTO,
    "DisableKeyRotation": _CRYPTO,
    "RotateKeyOnDemand": _CRYPTO,
    "EnableKey": _NOT_PENDING,
    "DisableKey": _NOT_PENDING,
    "ScheduleKeyDeletion": _NOT_PENDING,
    "UpdateKeyDescription": _NOT_PENDING,
    "CreateAlias": _NOT_PENDING,
    "UpdateAlias": _NOT_PENDING,
    "TagResource": _NOT_PENDING,
    "UntagResource": _NOT_PENDING,
    "CreateGrant": _NOT_PENDING,
    "PutKeyPolicy": _ALWAYS,
    "GetKeyPolicy": _ALWAYS,
    "ListKeyPolicies": _ALWAYS,
    "ListGrants": _ALWAYS,
    "RetireGrant": _ALWAYS,
    "RevokeGrant": _ALWAYS,
    "CancelKeyDeletion": {ENABLED: InvalidStateError, DISABLED: InvalidStateError},
}

_STATE_NAMES: dict[int, str] = {
    ENABLED: "Enabled",
    DISABLED: "Disabled",
    PENDING_DELETION: "PendingDeletion",
}


def state_name(state: int) -> str:
    """The AWS spelling of a key state ("PendingDeletion")."""
    return _STATE_NAMES.get(state) or res.KeyState.Name(res.KeyState.ValueType(state))


def check_key_state(operation: str, key_arn: str, state: int) -> None:
    """Raises the AWS exception for `operation` on a key in `state`, if any."""
    error = _TABLE[operation].get(state)
    if error is None:
        return
    if error is DisabledError:
        raise DisabledError(f"{key_arn} is disabled.")
    raise error(f"{key_arn} is {state_name(state)}; {operation} is not allowed in that state.")
