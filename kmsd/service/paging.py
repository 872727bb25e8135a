"""`limit` / `marker` paging for every List operation.

A marker names the last item of the previous page (not an offset), so keys
created between pages neither repeat nor vanish. It is bound to the listing it
came from; a marker from another listing, or garbage, is InvalidMarkerException.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import TypeVar

from kmsd.errors import InvalidMarkerError, ValidationError

T = TypeVar("T")
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_VERSION = "m1"


def page(
    items: Sequence[T],
    sort_key: Callable[[T], str],
    listing: str,
    limit: int,
    marker: str,
    *,
    max_limit: int = MAX_LIMIT,
    default_limit: int = DEFAULT_LIMIT,
) -> tuple[list[T], str]:
    """One page of `items` (already in `sort_key` order) and the next marker ("" at the end).

    `limit` 0 means the listing's default; AWS's per-listing ranges apply."""
    if limit < 0 or limit > max_limit:
        raise ValidationError("limit", f"must be between 1 and {max_limit}")
    size = limit or default_limit
    start = 0
    if marker:
        after = _decode(marker, listing)
        start = len(items)
        for position, item in enumerate(items):
            if sort_key(item) > after:
                start = position
                break
    chosen = list(items[start : start + size])
    if start + size < len(items):
        return chosen, _encode(listing, sort_key(chosen[-1]))
    return chosen, ""


def _encode(listing: str, after: str) -> str:
    raw = f"{_VERSION}\x00{listing}\x00{after}".encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode(marker: str, listing: str) -> str:
    try:
        version, marked_listing, after = (
            base64.urlsafe_b64decode(marker.encode()).decode().split("\x00")
        )
    except (binascii.Error, UnicodeError, ValueError) as error:
        raise InvalidMarkerError("marker", "is not a marker this service issued") from error
    if version != _VERSION or marked_listing != listing:
        raise InvalidMarkerError("marker", "belongs to a different listing")
    return after
