"""Transport security of the server: TLS credentials from PEM files and the bearer-token check.

With a token configured, every call must carry metadata `authorization: Bearer <token>` or it is
answered UNAUTHENTICATED, except the standard health service (load balancers and orchestrators
probe it without credentials; it reveals only SERVING / NOT_SERVING).
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from jaxinfer.errors import EngineError

_UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def read_token(path: str | Path) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise EngineError(f"the auth token file {path} is empty; write the bearer token into it")
    return token


def server_credentials(cert_path: str | Path, key_path: str | Path) -> grpc.ServerCredentials:
    try:
        cert, key = Path(cert_path).read_bytes(), Path(key_path).read_bytes()
    except OSError as err:
        raise EngineError(f"cannot read the TLS certificate or key: {err}") from None
    return grpc.ssl_server_credentials([(key, cert)])


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # makes this an async generator, as streaming handlers must be

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    streaming = (handler.request_streaming, handler.response_streaming)
    return kinds[streaming](deny_stream if handler.response_streaming else deny_unary,
                            request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_UNAUTHENTICATED_PREFIXES):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str):
            given = given.encode()
        if hmac.compare_digest(given, self._expected):
            return handler
        reason = "missing" if not given else "wrong"
        return _deny(handler, f"{reason} bearer token: send metadata 'authorization: Bearer <token>'")
