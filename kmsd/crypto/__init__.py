"""kmsd's cryptography: ciphertext format, key derivation, key generation and the seal.

No gRPC or protobuf here. Submodules: `context` (canonical encryption context),
`ciphertext` (symmetric blob v1), `keygen` (material, data keys, material ids),
`seal` (root-key seals). Formats: docs/ciphertext-format.md.
"""

from kmsd.crypto.ciphertext import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    OVERHEAD,
    CiphertextHeader,
    decrypt,
    encrypt,
    parse_header,
)
from kmsd.crypto.context import canonical_encryption_context
from kmsd.crypto.keygen import material_id, new_data_key, new_symmetric_key_material
from kmsd.crypto.seal import FileSeal, Seal, material_aad

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAX_CIPHERTEXT",
    "MAX_PLAINTEXT",
    "OVERHEAD",
    "CiphertextHeader",
    "FileSeal",
    "Seal",
    "canonical_encryption_context",
    "decrypt",
    "encrypt",
    "material_aad",
    "material_id",
    "new_data_key",
    "new_symmetric_key_material",
    "parse_header",
]
