"""Registers a servicer's methods on a grpc.aio server from the service descriptor.

Instead of the generated `add_*_to_server`, each method gets two guards so that every bad input
becomes a clear status and the server keeps serving:
- a request that does not parse (e.g. a string field with malformed UTF-8) is answered
  INVALID_ARGUMENT naming the problem, not grpc's generic "Exception deserializing request";
- a servicer that raises a ServingError or RequestError is answered with its status
  (serving/errors.py: grpc_status).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError

from serving.errors import grpc_status


class _Unparsable:
    def __init__(self, type_name: str, error: Exception):
        self.message = (f"the request is not a valid {type_name} ({error}); string fields must be UTF-8 "
                        "and the message must match the service's proto")


def _tolerant_parser(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as err:
            return _Unparsable(message_class.DESCRIPTOR.full_name, err)
    return parse


async def _abort_for(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    status = grpc_status(exc)
    if status is None:
        raise exc
    await context.abort(*status)


def _guard_unary(method):
    async def handle(request, context):
        if isinstance(request, _Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return await method(request, context)
        except Exception as exc:
            await _abort_for(context, exc)
    return handle


def _guard_stream(method):
    async def handle(request, context) -> AsyncIterator:
        if isinstance(request, _Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            async for response in method(request, context):
                yield response
        except Exception as exc:
            await _abort_for(context, exc)
    return handle


def _handler(method: MethodDescriptor, implementation) -> grpc.RpcMethodHandler:
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    serializer = response_class.SerializeToString
    if method.client_streaming:
        # Streamed requests are read by the servicer itself; a bad one fails the call as grpc does.
        factory = (grpc.stream_stream_rpc_method_handler if method.server_streaming
                   else grpc.stream_unary_rpc_method_handler)
        return factory(implementation, request_deserializer=request_class.FromString,
                       response_serializer=serializer)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(_guard_stream(implementation),
                                                    request_deserializer=_tolerant_parser(request_class),
                                                    response_serializer=serializer)
    return grpc.unary_unary_rpc_method_handler(_guard_unary(implementation),
                                               request_deserializer=_tolerant_parser(request_class),
                                               response_serializer=serializer)


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer) -> None:
    """Registers `servicer`'s methods (named as in the proto) for `service`."""
    handlers = {method.name: _handler(method, getattr(servicer, method.name)) for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
