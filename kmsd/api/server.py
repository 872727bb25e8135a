"""Builds the gRPC server of a node: KeyManagementService, health checking, reflection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kms.v1 import cluster_service_pb2, cluster_service_pb2_grpc, kms_service_pb2

from kmsd.api.audit import AuditHook
from kmsd.api.cluster import ClusterServicer
from kmsd.api.servicer import Ctx, KeyManagementServicer
from kmsd.api.status import abort
from kmsd.auth.tls import ServerTls
from kmsd.errors import ValidationError
from kmsd.grpc_parsing import parsing_handler
from kmsd.service.context import Kms

# The largest valid request (ReEncrypt: 6 KiB ciphertext, two 8 KiB contexts, ten
# grant tokens) is far below this; anything bigger is refused before parsing.
MAX_MESSAGE_BYTES = 256 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
"""The client API server's options (the benchmarks' stand-in servers use them too)."""
SERVICE_NAME = kms_service_pb2.DESCRIPTOR.services_by_name["KeyManagementService"].full_name
CLUSTER_SERVICE_NAME = cluster_service_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name


async def _bad_request(context: Ctx, type_name: str) -> None:
    await abort(context, ValidationError("request", f"is not a valid {type_name} message"))


def _audited_bad_request(audit: AuditHook) -> Callable[[Ctx, str], Awaitable[None]]:
    async def bad_request(context: Ctx, type_name: str) -> None:
        error = ValidationError("request", f"is not a valid {type_name} message")
        await audit.refused(context, type_name, error)  # aborts if it cannot record
        await abort(context, error)

    return bad_request


def build_server(
    kms: Kms,
    listen: str,
    cluster: ClusterServicer,
    audit: AuditHook | None = None,
    *,
    tls: ServerTls | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A started-ready (not yet started) server bound to `listen`; returns it and its port.
    With `audit`, every KeyManagementService call is recorded (docs/audit.md). With
    `tls`, the port is mutual TLS (client certificates required); without, plaintext
    (the caller has checked that `[tls].plaintext` allows it: loopback only)."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    service = kms_service_pb2.DESCRIPTOR.services_by_name["KeyManagementService"]
    on_bad = _bad_request if audit is None else _audited_bad_request(audit)
    server.add_generic_rpc_handlers(
        (parsing_handler(service, kms_service_pb2, KeyManagementServicer(kms, audit), on_bad),)
    )
    cluster_service_pb2_grpc.add_ClusterServiceServicer_to_server(cluster, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = server.add_insecure_port(listen) if tls is None else tls.add_port(server, listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, port, health_servicer
