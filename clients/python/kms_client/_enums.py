"""Translation between kms.v1 proto enum values and the AWS KMS strings they mirror.

The proto enums carry a buf prefix (``KEY_SPEC_SYMMETRIC_DEFAULT``) while AWS
speaks ``SYMMETRIC_DEFAULT`` (and ``PendingDeletion`` for key states). Callers of
the client and of kmsctl may use either spelling; output uses the AWS one.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.descriptor import EnumDescriptor

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

_V = TypeVar("_V", bound=int)

# AWS spells these enums in CamelCase rather than UPPER_SNAKE.
_CAMEL_CASE_ENUMS = frozenset({"KeyState", "GrantOperation"})


def enum_prefix(descriptor: EnumDescriptor) -> str:
    """``KeySpec`` -> ``KEY_SPEC_``: the buf prefix of the enum's value names."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", descriptor.name).upper() + "_"


def enum_value(wrapper: _EnumTypeWrapper[_V], value: str | int) -> _V:
    """Resolves an AWS name, a full proto name or a number to the enum value.

    Matching ignores case, hyphens and underscores, so ``"SYMMETRIC_DEFAULT"``,
    ``"symmetric-default"``, ``"KEY_SPEC_SYMMETRIC_DEFAULT"`` and ``"PendingDeletion"``
    all work. Raises ValueError for anything else.
    """
    if isinstance(value, int):
        for known in wrapper.values():
            if known == value:
                return known
        # Open enums: a newer server may know numbers this client does not.
        raise ValueError(f"{value} is not a known {wrapper.DESCRIPTOR.name} value")

    def norm(text: str) -> str:
        return text.replace("-", "").replace("_", "").upper()

    wanted = norm(value)
    prefix = norm(enum_prefix(wrapper.DESCRIPTOR))
    for name, known in wrapper.items():
        full = norm(name)
        if wanted in (full, full.removeprefix(prefix)):
            return known
    choices = ", ".join(aws_names(wrapper.DESCRIPTOR))
    raise ValueError(f"{value!r} is not a valid {wrapper.DESCRIPTOR.name} (one of: {choices})")


def aws_name(descriptor: EnumDescriptor, number: int) -> str:
    """The AWS string for an enum number (``"Enabled"``, ``"SYMMETRIC_DEFAULT"``).

    An unknown number (a newer server) is shown as the number itself.
    """
    value = descriptor.values_by_number.get(number)
    if value is None:
        return str(number)
    short = value.name.removeprefix(enum_prefix(descriptor))
    if descriptor.name in _CAMEL_CASE_ENUMS:
        return "".join(part.capitalize() for part in short.split("_"))
    return short


def aws_names(descriptor: EnumDescriptor) -> list[str]:
    """Every settable AWS string of an enum (the UNSPECIFIED zero value excluded)."""
    return [aws_name(descriptor, v.number) for v in descriptor.values if v.number != 0]
