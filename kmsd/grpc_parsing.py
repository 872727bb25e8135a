"""gRPC method handlers that parse request bytes themselves.

grpcio's own deserializer turns undecodable bytes (bad UTF-8 in a string, a torn
varint: other languages' clients and hostile peers can send these) into UNKNOWN
and a logged traceback. These handlers parse inside the call instead, so the
service answers with its own error and nothing is logged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

Ctx = grpc.aio.ServicerContext[Any, Any]
# Aborts the call, saying the request of this type did not parse.
OnBadRequest = Callable[[Ctx, str], Awaitable[None]]


def parsing_handler(
    service: ServiceDescriptor, messages: ModuleType, servicer: object, on_bad: OnBadRequest
) -> grpc.GenericRpcHandler:
    """A generic handler for every method of `service` (unary or client-streaming),
    calling `servicer.<Method>(request(s), context)` with parsed messages."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_type: type[Message] = getattr(messages, method.input_type.name)
        response_type: type[Message] = getattr(messages, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                _parsing_stream(request_type, behaviour, on_bad),
                request_deserializer=None,
                response_serializer=response_type.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _parsing_unary(request_type, behaviour, on_bad),
                request_deserializer=None,
                response_serializer=response_type.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


async def _parse(
    request_type: type[Message], raw: bytes, context: Ctx, on_bad: OnBadRequest
) -> Message:
    request = request_type()
    try:
        request.ParseFromString(raw)
    except DecodeError:
        await on_bad(context, request_type.__name__)
    return request


def _parsing_unary(
    request_type: type[Message],
    behaviour: Callable[[Message, Ctx], Awaitable[Message]],
    on_bad: OnBadRequest,
) -> Callable[[bytes, Ctx], Awaitable[Message]]:
    async def handle(raw: bytes, context: Ctx) -> Message:
        return await behaviour(await _parse(request_type, raw, context, on_bad), context)

    return handle


def _parsing_stream(
    request_type: type[Message],
    behaviour: Callable[[AsyncIterator[Message], Ctx], Awaitable[Message]],
    on_bad: OnBadRequest,
) -> Callable[[AsyncIterator[bytes], Ctx], Awaitable[Message]]:
    async def handle(raws: AsyncIterator[bytes], context: Ctx) -> Message:
        async def parsed() -> AsyncIterator[Message]:
            async for raw in raws:
                yield await _parse(request_type, raw, context, on_bad)

        return await behaviour(parsed(), context)

    return handle
