"""Builds the gRPC server of a node: KeyManagementService, health checking, reflection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kms.v1 import cluster_service_pb2, cluster_service_pb2_grpc, kms_service_pb2

from kmsd.api.cluster import ClusterServicer
from kmsd.api.servicer import Ctx, KeyManagementServicer
from kmsd.api.status import to_grpc_status
from kmsd.errors import ValidationError
from kmsd.service.context import Kms

# The largest valid request (ReEncrypt: 6 KiB ciphertext, two 8 KiB contexts, ten
# grant tokens) is far below this; anything bigger is refused before parsing.
MAX_MESSAGE_BYTES = 256 * 1024
SERVICE_NAME = kms_service_pb2.DESCRIPTOR.services_by_name["KeyManagementService"].full_name
CLUSTER_SERVICE_NAME = cluster_service_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name


def _raw_request_handlers(servicer: KeyManagementServicer) -> grpc.GenericRpcHandler:
    """Handlers that take the request as bytes and parse it themselves, so a request
    that is not valid protobuf (bad UTF-8 in a string, a torn varint: other languages'
    clients can send these) gets a ValidationException instead of gRPC's UNKNOWN."""
    service = kms_service_pb2.DESCRIPTOR.services_by_name["KeyManagementService"]
    handlers: dict[str, grpc.RpcMethodHandler[bytes, Message]] = {}
    for method in service.methods:
        request_type = getattr(kms_service_pb2, method.input_type.name)
        response_type = getattr(kms_service_pb2, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _parsing(request_type, behaviour),
            request_deserializer=None,
            response_serializer=response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _parsing(
    request_type: type[Message], behaviour: Callable[[Message, Ctx], Awaitable[Message]]
) -> Callable[[bytes, Ctx], Awaitable[Message]]:
    async def handle(raw: bytes, context: Ctx) -> Message:
        request = request_type()
        try:
            request.ParseFromString(raw)
        except DecodeError:
            await context.abort_with_status(
                to_grpc_status(
                    ValidationError("request", f"is not a valid {request_type.__name__} message")
                )
            )
        return await behaviour(request, context)

    return handle


def build_server(
    kms: Kms, listen: str, cluster: ClusterServicer
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A started-ready (not yet started) server bound to `listen`; returns it and its port."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    server.add_generic_rpc_handlers((_raw_request_handlers(KeyManagementServicer(kms)),))
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
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, port, health_servicer
