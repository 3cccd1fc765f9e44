"""Serving-side failures and the gRPC status each one (and each jaxinfer error) is answered with.

`grpc_status(exc)` -> (grpc.StatusCode, message); the handlers in serving/handlers.py call it so
servicers only raise.
"""

from __future__ import annotations

import grpc

from jaxinfer.errors import JaxinferError, RequestError


class ServingError(JaxinferError):
    """Base class of the request failures the server itself decides; `code` is the gRPC status."""

    code = grpc.StatusCode.INTERNAL


class NotReadyError(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class DrainingError(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class OverloadedError(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DuplicateRequestError(ServingError):
    code = grpc.StatusCode.ALREADY_EXISTS


class UnknownModelError(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class MalformedRequestError(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class RequestFailedError(ServingError):
    """The engine accepted the request but had to end it (e.g. it cannot fit in the KV pool)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class EngineFailedError(ServingError):
    code = grpc.StatusCode.INTERNAL


class ListenError(JaxinferError):
    """The server cannot open one of its ports (in use, or the host is not an address of this machine)."""


def grpc_status(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The status a failed RPC answers with, or None for exceptions that are bugs (re-raised)."""
    if isinstance(exc, ServingError):
        return exc.code, str(exc)
    if isinstance(exc, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return None
