"""Key ids, ARNs and alias names: formatting them and resolving a KeyId parameter.

A KeyId parameter accepts, as in AWS, a key id (UUID), a key ARN, an alias name
(`alias/...`) or an alias ARN. ARNs carry the cluster's region and account from
the configuration; an ARN naming another region or account names no key here.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from kms.fsm.v1 import commands_pb2 as fsm

from kmsd.errors import InvalidAliasNameError, InvalidArnError, NotFoundError, ValidationError
from kmsd.fsm.store import KeyStore

MAX_KEY_ID_LENGTH = 2048
_ALIAS_NAME = re.compile(r"alias/[a-zA-Z0-9/_-]+")
MAX_ALIAS_NAME_LENGTH = 256


@dataclass(frozen=True)
class Names:
    """The ARN namespace of this cluster."""

    region: str
    account: str

    @property
    def _prefix(self) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:"

    def key_arn(self, key_id: str) -> str:
        return f"{self._prefix}key/{key_id}"

    def alias_arn(self, alias_name: str) -> str:
        return f"{self._prefix}{alias_name}"

    def resolve(self, store: KeyStore, key_ref: str, field: str = "key_id") -> fsm.KeyRecord:
        """The key a KeyId parameter names; NotFoundError if none."""
        known = store.key(key_ref)  # the common case: a plain key id, on the hot path
        if known is not None:
            return known
        key_id = self.key_id_of(store, key_ref, field)
        key = store.key(key_id)
        if key is None:
            raise NotFoundError(f"Key '{self.key_arn(key_id)}' does not exist.")
        return key

    def key_id_of(self, store: KeyStore, key_ref: str, field: str = "key_id") -> str:
        """The key UUID a KeyId parameter names (the key itself may not exist)."""
        if not key_ref:
            raise ValidationError(field, "is required")
        if len(key_ref) > MAX_KEY_ID_LENGTH:
            raise ValidationError(field, f"must be at most {MAX_KEY_ID_LENGTH} characters")
        if key_ref.startswith("arn:"):
            key_ref = self._strip_arn(key_ref, field)
        if key_ref.startswith("alias/"):
            alias = store.alias(key_ref)
            if alias is None:
                raise NotFoundError(f"Alias '{_echo(self.alias_arn(key_ref))}' is not found.")
            return alias.target_key_id
        if key_ref.startswith("key/"):
            key_ref = key_ref[len("key/") :]
        if not is_key_id(key_ref):
            raise NotFoundError(f"Invalid keyId '{_echo(key_ref)}'.")
        return key_ref

    def _strip_arn(self, arn: str, field: str) -> str:
        parts = arn.split(":", 5)
        if len(parts) != 6 or parts[1] != "aws" or parts[2] != "kms":
            raise InvalidArnError(field, f"'{_echo(arn)}' is not a KMS key or alias ARN")
        if parts[3] != self.region or parts[4] != self.account:
            raise NotFoundError(f"'{_echo(arn)}' names a key in another region or account.")
        resource = parts[5]
        if not resource.startswith(("key/", "alias/")):
            raise InvalidArnError(field, f"'{_echo(arn)}' is not a KMS key or alias ARN")
        return resource


def _echo(text: str, limit: int = 120) -> str:
    """Caller input quoted in an error, shortened: a 2048-character id echoed whole
    (twice, in the message and the status details) can overflow gRPC's metadata limit."""
    return text if len(text) <= limit else text[:limit] + "…"


def is_key_id(text: str) -> bool:
    """True for the canonical lowercase UUID form kmsd gives key ids."""
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def validate_alias_name(alias_name: str, field: str = "alias_name") -> None:
    """Raises InvalidAliasNameError unless `alias_name` is a legal customer alias."""
    if not alias_name:
        raise ValidationError(field, "is required")
    if len(alias_name) > MAX_ALIAS_NAME_LENGTH:
        raise InvalidAliasNameError(field, f"must be at most {MAX_ALIAS_NAME_LENGTH} characters")
    if not _ALIAS_NAME.fullmatch(alias_name):
        raise InvalidAliasNameError(
            field, "must be 'alias/' followed by letters, digits, '/', '_' or '-'"
        )
    if alias_name.startswith("alias/aws/"):
        raise InvalidAliasNameError(field, "must not begin with 'alias/aws/' (reserved)")
