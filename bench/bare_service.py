"""The benchmark's baseline: a bare gRPC service doing only kmsd's AES-GCM work per call.

Same stack as kmsd (grpc.aio server, the same server options, async handlers) and
the same service, method names and messages (kms.v1.KeyManagementService Encrypt,
Decrypt and GenerateDataKey), and per call the same crypto:
`kmsd.crypto.ciphertext.encrypt` / `decrypt` (HKDF-SHA256 per-message key and
AES-256-GCM) with one fixed in-memory 32-byte key; GenerateDataKey draws 32 random
bytes and encrypts them. Nothing else: no key lookup, no key-state or usage checks,
no request validation, no error mapping (a bad request ends in an UNKNOWN status).
Responses carry an ARN and a material id of kmsd's lengths, computed once at start,
so both servers send the same number of bytes.

Run: `python -m bench.bare_service --port N` (0 picks a free port); it prints
`bare service: serving on 127.0.0.1:<port>` once it serves and stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import uuid

import grpc
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res

from kmsd.api.server import SERVER_OPTIONS
from kmsd.config import DEFAULT_ACCOUNT, DEFAULT_REGION
from kmsd.crypto import ciphertext
from kmsd.crypto.keygen import material_id

__all__ = [
    "BareKeyManagementServicer",
    "build_bare_server",
    "build_server",
    "main",
    "serve_until_signalled",
]

SYMMETRIC = res.ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT
MATERIAL_VERSION = 1
DATA_KEY_BYTES = 32

Ctx = grpc.aio.ServicerContext[object, object]


class BareKeyManagementServicer(pb_grpc.KeyManagementServiceServicer):
    """Encrypt, Decrypt and GenerateDataKey under one fixed key, and nothing else."""

    def __init__(self, backing_key: bytes | None = None, key_id: uuid.UUID | None = None) -> None:
        self._backing_key = backing_key or os.urandom(ciphertext.KEY_SIZE)
        self._key_id = key_id or uuid.uuid4()
        self._arn = f"arn:aws:kms:{DEFAULT_REGION}:{DEFAULT_ACCOUNT}:key/{self._key_id}"
        self._material_id = material_id(self._key_id, MATERIAL_VERSION)

    async def Encrypt(self, request: pb.EncryptRequest, context: Ctx) -> pb.EncryptResponse:
        blob = ciphertext.encrypt(
            self._backing_key,
            self._key_id,
            MATERIAL_VERSION,
            request.plaintext,
            request.encryption_context,
        )
        return pb.EncryptResponse(
            ciphertext_blob=blob, key_id=self._arn, encryption_algorithm=SYMMETRIC
        )

    async def Decrypt(self, request: pb.DecryptRequest, context: Ctx) -> pb.DecryptResponse:
        plaintext = ciphertext.decrypt(
            self._backing_key, request.ciphertext_blob, request.encryption_context
        )
        return pb.DecryptResponse(
            key_id=self._arn,
            plaintext=plaintext,
            encryption_algorithm=SYMMETRIC,
            key_material_id=self._material_id,
        )

    async def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: Ctx
    ) -> pb.GenerateDataKeyResponse:
        data_key = os.urandom(DATA_KEY_BYTES)
        blob = ciphertext.encrypt(
            self._backing_key,
            self._key_id,
            MATERIAL_VERSION,
            data_key,
            request.encryption_context,
        )
        return pb.GenerateDataKeyResponse(
            ciphertext_blob=blob,
            plaintext=data_key,
            key_id=self._arn,
            key_material_id=self._material_id,
        )


def build_server(
    servicer: pb_grpc.KeyManagementServiceServicer, listen: str
) -> tuple[grpc.aio.Server, int]:
    """A not yet started server for `servicer` bound to `listen`, with kmsd's server
    options (shared by the benchmarks' stand-in servers)."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_KeyManagementServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, port


def build_bare_server(listen: str) -> tuple[grpc.aio.Server, int]:
    """The bare service, not yet started, bound to `listen`."""
    # The other methods keep the generated UNIMPLEMENTED bodies (abstract only in the stubs).
    return build_server(BareKeyManagementServicer(), listen)  # type: ignore[abstract]


async def serve_until_signalled(server: grpc.aio.Server, bound: int, name: str) -> None:
    """Starts `server`, says where it listens, serves until SIGINT or SIGTERM."""
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"{name}: serving on 127.0.0.1:{bound}", flush=True)
    await stop.wait()
    await server.stop(grace=2.0)


async def _serve(port: int) -> None:
    await serve_until_signalled(*build_bare_server(f"127.0.0.1:{port}"), "bare service")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_service", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
