"""Key material, data keys and material ids."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from kmsd.crypto.keygen import material_id, new_data_key, new_symmetric_key_material
from kmsd.errors import ValidationError

KEY_ID = uuid.UUID("11111111-2222-3333-4444-555555555555")


def test_symmetric_material() -> None:
    assert len(new_symmetric_key_material()) == 32
    assert new_symmetric_key_material() != new_symmetric_key_material()
    assert new_symmetric_key_material(rng=lambda n: b"\x07" * n) == b"\x07" * 32
    with pytest.raises(ValueError):
        new_symmetric_key_material(rng=lambda n: b"\x07" * 16)


@pytest.mark.parametrize("n", [1, 16, 32, 64, 1024])
def test_data_key_sizes(n: int) -> None:
    assert len(new_data_key(n)) == n
    assert new_data_key(n, rng=lambda k: b"\x01" * k) == b"\x01" * n


@pytest.mark.parametrize("n", [0, -1, 1025, 10**9, True])
def test_data_key_out_of_range(n: int) -> None:
    with pytest.raises(ValidationError) as info:
        new_data_key(n)
    assert info.value.violations[0].field == "number_of_bytes"


def test_material_id() -> None:
    expected = hashlib.sha256(KEY_ID.bytes + b"\x00\x00\x00\x01").hexdigest()
    assert material_id(KEY_ID, 1) == expected
    # Pinned: the id is shown to users and must never change for a given key/version.
    assert expected == "1af1d6a8d55e89ccdaf77956bfb69ad6ecb75e44a8627d6b3d2cde4989062e96"
    assert len(material_id(KEY_ID, 1)) == 64
    assert material_id(KEY_ID, 1) != material_id(KEY_ID, 2)
    assert material_id(KEY_ID, 1) != material_id(uuid.uuid4(), 1)
    for bad in (0, 2**32):
        with pytest.raises(ValueError):
            material_id(KEY_ID, bad)
