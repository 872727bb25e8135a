"""An in-process fake kmsd for the client tests: a real gRPC server on 127.0.0.1:0.

(A module of its own, not conftest.py, so tests can import it by a unique name.)

The fake implements the wire contract of kms.v1 (including the google.rpc.Status
error details kmsd sends) with a small in-memory key store, so the client is
exercised over real sockets. It is not a model of the server's code: crypto
operations hand out opaque handles instead of real ciphertexts. Tests can script
failures per RPC (`FakeKms.fail`) and read every request received (`FakeKms.calls`).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res

ACCOUNT = "111122223333"
REGION = "eu-west-1"
CREATED = timestamp_pb2.Timestamp(seconds=1714564800)  # 2024-05-01T12:00:00Z


def make_status(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str = "",
    aws_exception: str = "",
    violations: tuple[tuple[str, str], ...] = (),
    retry_after: float | None = None,
    metadata: dict[str, str] | None = None,
) -> status_pb2.Status:
    """A google.rpc.Status shaped as kmsd sends it (one ErrorInfo, optional extras)."""
    details: list[any_pb2.Any] = []
    if reason or aws_exception:
        info = error_details_pb2.ErrorInfo(reason=reason, domain="kmsd")
        if aws_exception:
            info.metadata["aws_exception"] = aws_exception
        info.metadata.update(metadata or {})
        packed = any_pb2.Any()
        packed.Pack(info)
        details.append(packed)
    if violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(retry_after * 1000))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    return status_pb2.Status(code=code.value[0], message=message, details=details)


class FakeError(Exception):
    """Raised by fake handlers; carries the Status to abort with."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def _error(code: grpc.StatusCode, aws: str, reason: str, message: str, **kw: Any) -> FakeError:
    return FakeError(make_status(code, message, reason=reason, aws_exception=aws, **kw))


def _not_found(what: str) -> FakeError:
    return _error(grpc.StatusCode.NOT_FOUND, "NotFoundException", "NOT_FOUND", f"{what} not found")


@dataclass
class _Stored:
    key_id: str
    context: dict[str, str]
    plaintext: bytes


class FakeKms(pb_grpc.KeyManagementServiceServicer):
    """In-memory KeyManagementService. Handlers for the RPCs it does not model return
    an empty response, which is enough to check what the client sent."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.address = ""
        self.calls: list[tuple[str, Message]] = []
        self._scripted: dict[str, list[status_pb2.Status]] = {}
        self._always: status_pb2.Status | None = None
        self._lock = threading.Lock()
        self.keys: dict[str, res.KeyMetadata] = {}
        self.aliases: dict[str, str] = {}
        self.tags: dict[str, dict[str, str]] = {}
        self._blobs: dict[bytes, _Stored] = {}
        self._counter = itertools.count(1)

    # -------------------------------------------------------------- scripting

    def fail(self, rpc: str, status: status_pb2.Status, times: int = 1) -> None:
        """The next `times` calls of `rpc` fail with `status`."""
        with self._lock:
            self._scripted.setdefault(rpc, []).extend([status] * times)

    def fail_always(self, status: status_pb2.Status | None) -> None:
        """Every call fails with `status` (None heals the node)."""
        with self._lock:
            self._always = status

    def calls_of(self, rpc: str) -> list[Any]:
        with self._lock:
            return [req for name, req in self.calls if name == rpc]

    def dispatch(self, rpc: str, request: Message, context: grpc.ServicerContext) -> Message:
        copy = type(request)()
        copy.CopyFrom(request)
        with self._lock:
            self.calls.append((rpc, copy))
            queued = self._scripted.get(rpc)
            failure = queued.pop(0) if queued else self._always
        if failure is not None:
            context.abort_with_status(rpc_status.to_status(failure))
        handler: Callable[[Any], Message] | None = getattr(self, f"do_{rpc}", None)
        try:
            if handler is not None:
                return handler(request)
            return getattr(pb, f"{rpc}Response")()  # type: ignore[no-any-return]
        except FakeError as err:
            context.abort_with_status(rpc_status.to_status(err.status))
            raise AssertionError("unreachable") from err

    # -------------------------------------------------------------- key store

    def _resolve(self, key_id: str) -> res.KeyMetadata:
        if key_id.startswith("alias/"):
            key_id = self.aliases.get(key_id, key_id)
        key_id = key_id.rsplit("/", 1)[-1] if key_id.startswith("arn:") else key_id
        meta = self.keys.get(key_id)
        if meta is None:
            raise _not_found(f"Key '{key_id}'")
        return meta

    def do_CreateKey(self, req: pb.CreateKeyRequest) -> pb.CreateKeyResponse:
        if req.key_spec not in (res.KEY_SPEC_UNSPECIFIED, res.KEY_SPEC_SYMMETRIC_DEFAULT):
            raise _error(
                grpc.StatusCode.INVALID_ARGUMENT,
                "UnsupportedOperationException",
                "UNSUPPORTED_OPERATION",
                "only SYMMETRIC_DEFAULT keys are supported",
            )
        key_id = str(uuid.UUID(int=next(self._counter)))
        meta = res.KeyMetadata(
            key_id=key_id,
            arn=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}",
            aws_account_id=ACCOUNT,
            creation_date=CREATED,
            enabled=True,
            description=req.description,
            key_usage=res.KEY_USAGE_ENCRYPT_DECRYPT,
            key_state=res.KEY_STATE_ENABLED,
            origin=res.ORIGIN_AWS_KMS,
            key_manager=res.KEY_MANAGER_CUSTOMER,
            key_spec=res.KEY_SPEC_SYMMETRIC_DEFAULT,
            encryption_algorithms=[res.ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT],
        )
        self.keys[key_id] = meta
        self.tags[key_id] = {t.tag_key: t.tag_value for t in req.tags}
        return pb.CreateKeyResponse(key_metadata=meta, commit_index=next(self._counter))

    def do_DescribeKey(self, req: pb.DescribeKeyRequest) -> pb.DescribeKeyResponse:
        return pb.DescribeKeyResponse(key_metadata=self._resolve(req.key_id))

    def do_ListKeys(self, req: pb.ListKeysRequest) -> pb.ListKeysResponse:
        ids = sorted(self.keys)
        start = self._marker(req.marker)
        end = start + (req.limit or 100)
        page = [res.KeyListEntry(key_id=k, key_arn=self.keys[k].arn) for k in ids[start:end]]
        more = end < len(ids)
        return pb.ListKeysResponse(keys=page, truncated=more, next_marker=str(end) if more else "")

    @staticmethod
    def _marker(marker: str) -> int:
        if not marker:
            return 0
        if not marker.isdigit():
            raise _error(
                grpc.StatusCode.INVALID_ARGUMENT,
                "InvalidMarkerException",
                "INVALID_MARKER",
                "marker: not issued by this service",
                violations=(("marker", "not issued by this service"),),
            )
        return int(marker)

    def do_DisableKey(self, req: pb.DisableKeyRequest) -> pb.DisableKeyResponse:
        meta = self._resolve(req.key_id)
        meta.key_state = res.KEY_STATE_DISABLED
        meta.enabled = False
        return pb.DisableKeyResponse(commit_index=next(self._counter))

    def _usable(self, key_id: str) -> res.KeyMetadata:
        meta = self._resolve(key_id)
        if meta.key_state == res.KEY_STATE_DISABLED:
            raise _error(
                grpc.StatusCode.FAILED_PRECONDITION,
                "DisabledException",
                "KEY_DISABLED",
                f"{meta.arn} is disabled.",
            )
        return meta

    def _wrap(self, key_id: str, context: dict[str, str], plaintext: bytes) -> bytes:
        handle = b"FAKECT" + os.urandom(16)
        self._blobs[handle] = _Stored(key_id, context, plaintext)
        return handle

    def _unwrap(self, blob: bytes, context: dict[str, str], key_id: str) -> _Stored:
        stored = self._blobs.get(blob)
        if stored is None or stored.context != context:
            raise _error(
                grpc.StatusCode.INVALID_ARGUMENT,
                "InvalidCiphertextException",
                "INVALID_CIPHERTEXT",
                "The ciphertext is invalid.",
            )
        if key_id and self._resolve(key_id).key_id != stored.key_id:
            raise _error(
                grpc.StatusCode.INVALID_ARGUMENT,
                "IncorrectKeyException",
                "INCORRECT_KEY",
                "The key is not the one that encrypted the ciphertext.",
            )
        self._usable(stored.key_id)
        return stored

    def do_Encrypt(self, req: pb.EncryptRequest) -> pb.EncryptResponse:
        meta = self._usable(req.key_id)
        if not 1 <= len(req.plaintext) <= 4096:
            raise _error(
                grpc.StatusCode.INVALID_ARGUMENT,
                "ValidationException",
                "VALIDATION_FAILED",
                "plaintext: must be 1-4096 bytes",
                violations=(("plaintext", "must be 1-4096 bytes"),),
            )
        blob = self._wrap(meta.key_id, dict(req.encryption_context), req.plaintext)
        return pb.EncryptResponse(
            ciphertext_blob=blob,
            key_id=meta.arn,
            encryption_algorithm=res.ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT,
        )

    def do_Decrypt(self, req: pb.DecryptRequest) -> pb.DecryptResponse:
        stored = self._unwrap(req.ciphertext_blob, dict(req.encryption_context), req.key_id)
        return pb.DecryptResponse(
            key_id=self.keys[stored.key_id].arn,
            plaintext=stored.plaintext,
            encryption_algorithm=res.ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT,
            key_material_id="ab" * 32,
        )

    def do_GenerateDataKey(self, req: pb.GenerateDataKeyRequest) -> pb.GenerateDataKeyResponse:
        meta = self._usable(req.key_id)
        size = {res.DATA_KEY_SPEC_AES_256: 32, res.DATA_KEY_SPEC_AES_128: 16}.get(
            req.key_spec, req.number_of_bytes
        )
        data_key = os.urandom(size)
        blob = self._wrap(meta.key_id, dict(req.encryption_context), data_key)
        return pb.GenerateDataKeyResponse(
            ciphertext_blob=blob, plaintext=data_key, key_id=meta.arn, key_material_id="ab" * 32
        )

    def do_GenerateRandom(self, req: pb.GenerateRandomRequest) -> pb.GenerateRandomResponse:
        return pb.GenerateRandomResponse(plaintext=bytes(range(req.number_of_bytes)))

    def do_CreateAlias(self, req: pb.CreateAliasRequest) -> pb.CreateAliasResponse:
        if req.alias_name in self.aliases:
            raise _error(
                grpc.StatusCode.ALREADY_EXISTS,
                "AlreadyExistsException",
                "ALREADY_EXISTS",
                f"{req.alias_name} already exists",
            )
        self.aliases[req.alias_name] = self._resolve(req.target_key_id).key_id
        return pb.CreateAliasResponse(commit_index=next(self._counter))

    def do_TagResource(self, req: pb.TagResourceRequest) -> pb.TagResourceResponse:
        meta = self._resolve(req.key_id)
        self.tags[meta.key_id].update({t.tag_key: t.tag_value for t in req.tags})
        return pb.TagResourceResponse(commit_index=next(self._counter))

    def do_ListResourceTags(self, req: pb.ListResourceTagsRequest) -> pb.ListResourceTagsResponse:
        meta = self._resolve(req.key_id)
        tags = [res.Tag(tag_key=k, tag_value=v) for k, v in sorted(self.tags[meta.key_id].items())]
        return pb.ListResourceTagsResponse(tags=tags)


def _install_handlers() -> None:
    service = pb.DESCRIPTOR.services_by_name["KeyManagementService"]
    for method in service.methods:

        def handler(
            self: FakeKms, request: Message, context: grpc.ServicerContext, _rpc: str = method.name
        ) -> Message:
            return self.dispatch(_rpc, request, context)

        setattr(FakeKms, method.name, handler)


_install_handlers()


@dataclass
class FakeCluster:
    """Several fake nodes; `nodes[i].address` is each one's host:port."""

    nodes: list[FakeKms] = field(default_factory=list)
    servers: list[grpc.Server] = field(default_factory=list)

    def start(self, name: str) -> FakeKms:
        fake = FakeKms(name)  # type: ignore[abstract]  # handlers are installed below the class
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_KeyManagementServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        fake.address = f"127.0.0.1:{port}"
        self.nodes.append(fake)
        self.servers.append(server)
        return fake

    def stop(self) -> None:
        for server in self.servers:
            server.stop(None).wait()


@dataclass
class Sleeps:
    """Stands in for time.sleep: records the delays instead of waiting."""

    delays: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def unused_loopback_address() -> str:
    """A loopback address nothing listens on (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"
