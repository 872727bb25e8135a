"""Protobuf wire-format pieces, for writing a message whose big bytes field is made of
many chunks without building it first: the same bytes the protobuf library would
write, in one join instead of a copy per level of nesting."""

from __future__ import annotations


def varint(value: int) -> bytes:
    """`value` (>= 0) as a base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def bytes_field_tag(field_number: int) -> bytes:
    """The tag of a length-delimited field (bytes, string, message)."""
    return varint(field_number << 3 | 2)


def bytes_field_head(field_number: int, length: int) -> bytes:
    """What precedes a length-delimited field's `length` bytes of content. proto3 writes
    no empty bytes field at all: callers omit the field when `length` is 0."""
    return bytes_field_tag(field_number) + varint(length)
