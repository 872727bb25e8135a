"""kms_client: the Python client of kmsd (typed calls, failover, retries, envelope encryption).

    from kms_client import KmsClient, NotFoundException, TlsFiles

    tls = TlsFiles(ca="ca.crt", cert="alice.crt", key="alice.key")
    with KmsClient(["10.0.0.1:7400", "10.0.0.2:7400"], tls=tls) as kms:
        key = kms.create_key("payments").key_metadata
        blob = kms.encrypt(key.key_id, b"secret", {"tenant": "a"}).ciphertext_blob

The generated protobuf modules live in the sibling package `kms.v1`.
"""

from kms_client._version import __version__
from kms_client.client import DEFAULT_ENDPOINT, KmsClient
from kms_client.envelope import InvalidEnvelopeError
from kms_client.errors import (
    AccessDeniedException,
    AlreadyExistsException,
    ConflictException,
    DisabledException,
    DryRunOperationException,
    IncorrectKeyException,
    InvalidAliasNameException,
    InvalidArnException,
    InvalidCiphertextException,
    InvalidGrantIdException,
    InvalidGrantTokenException,
    InvalidKeyUsageException,
    InvalidMarkerException,
    KmsClientError,
    KMSInternalException,
    KMSInvalidStateException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
    TagException,
    ThrottlingException,
    UnsupportedOperationException,
    ValidationException,
    from_rpc_error,
)
from kms_client.tls import TlsFiles

__all__ = [
    "DEFAULT_ENDPOINT",
    "AccessDeniedException",
    "AlreadyExistsException",
    "ConflictException",
    "DisabledException",
    "DryRunOperationException",
    "IncorrectKeyException",
    "InvalidAliasNameException",
    "InvalidArnException",
    "InvalidCiphertextException",
    "InvalidEnvelopeError",
    "InvalidGrantIdException",
    "InvalidGrantTokenException",
    "InvalidKeyUsageException",
    "InvalidMarkerException",
    "KMSInternalException",
    "KMSInvalidStateException",
    "KmsClient",
    "KmsClientError",
    "LimitExceededException",
    "MalformedPolicyDocumentException",
    "NotFoundException",
    "TagException",
    "ThrottlingException",
    "TlsFiles",
    "UnsupportedOperationException",
    "ValidationException",
    "__version__",
    "from_rpc_error",
]
