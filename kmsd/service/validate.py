"""Request-field checks shared by the operations; each failure names the field."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from google.protobuf.message import Message
from kms.v1 import resources_pb2 as res

from kmsd.crypto.ciphertext import MAX_CIPHERTEXT, MAX_PLAINTEXT
from kmsd.errors import TagError, ValidationError

MAX_DESCRIPTION = 8192
MAX_GRANT_TOKENS = 10
MAX_GRANT_TOKEN_LENGTH = 8192
MAX_TAG_KEY = 128
MAX_TAG_VALUE = 256
MAX_REQUEST_ID = 128
MAX_CONTEXT_PAIRS = 64
MAX_CONTEXT_BYTES = 8192


def length_between(field: str, value: str | bytes, low: int, high: int) -> None:
    if not low <= len(value) <= high:
        unit = "bytes" if isinstance(value, bytes) else "characters"
        if low == high:
            raise ValidationError(field, f"must be {low} {unit}")
        raise ValidationError(field, f"must be {low} to {high} {unit} (got {len(value)})")


def plaintext(value: bytes, field: str = "plaintext") -> None:
    length_between(field, value, 1, MAX_PLAINTEXT)


def ciphertext(value: bytes, field: str = "ciphertext_blob") -> None:
    length_between(field, value, 1, MAX_CIPHERTEXT)


def description(value: str) -> None:
    length_between("description", value, 0, MAX_DESCRIPTION)


def request_id(value: str) -> None:
    length_between("request_id", value, 0, MAX_REQUEST_ID)


def grant_tokens(tokens: Sequence[str]) -> None:
    if len(tokens) > MAX_GRANT_TOKENS:
        raise ValidationError("grant_tokens", f"at most {MAX_GRANT_TOKENS} tokens")
    for token in tokens:
        length_between("grant_tokens", token, 1, MAX_GRANT_TOKEN_LENGTH)


def encryption_context(ctx: Mapping[str, str], field: str = "encryption_context") -> None:
    if len(ctx) > MAX_CONTEXT_PAIRS:
        raise ValidationError(field, f"at most {MAX_CONTEXT_PAIRS} pairs")
    size = 0
    for key, value in ctx.items():
        if not key:
            raise ValidationError(field, "keys must not be empty")
        size += len(key.encode("utf-8", "surrogatepass")) + len(
            value.encode("utf-8", "surrogatepass")
        )
    if size > MAX_CONTEXT_BYTES:
        raise ValidationError(field, f"at most {MAX_CONTEXT_BYTES} bytes of keys and values")


def tags(values: Sequence[res.Tag], field: str = "tags") -> None:
    seen: set[str] = set()
    for tag in values:
        tag_key(tag.tag_key, f"{field}.tag_key")
        if len(tag.tag_value) > MAX_TAG_VALUE:
            raise TagError(f"{field}.tag_value", f"must be at most {MAX_TAG_VALUE} characters")
        if tag.tag_key in seen:
            raise TagError(f"{field}.tag_key", f"'{tag.tag_key}' is given twice")
        seen.add(tag.tag_key)


def tag_key(value: str, field: str = "tag_keys") -> None:
    if not 1 <= len(value) <= MAX_TAG_KEY:
        raise TagError(field, f"must be 1 to {MAX_TAG_KEY} characters")
    if value.startswith("aws:"):
        raise TagError(field, "must not begin with 'aws:' (reserved)")


def in_range(field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValidationError(field, f"must be between {low} and {high} (got {value})")


# Per message type: (field name, enum name, defined numbers, repeated).
_ENUM_FIELDS: dict[str, list[tuple[str, str, frozenset[int], bool]]] = {}


def known_enum_values(message: Message) -> None:
    """Refuses enum values the API does not define (proto3 keeps unknown numbers)."""
    descriptor = message.DESCRIPTOR
    fields = _ENUM_FIELDS.get(descriptor.full_name)
    if fields is None:
        fields = [
            (f.name, f.enum_type.name, frozenset(f.enum_type.values_by_number), f.is_repeated)
            for f in descriptor.fields
            if f.enum_type is not None
        ]
        _ENUM_FIELDS[descriptor.full_name] = fields
    for name, enum_name, defined, repeated in fields:
        value = getattr(message, name)
        for number in value if repeated else (value,):
            if number not in defined:
                raise ValidationError(name, f"{number} is not a {enum_name} value")
