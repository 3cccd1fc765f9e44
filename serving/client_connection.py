"""How a client reaches a `jaxinfer serve`: the address, TLS trusting a CA certificate, the bearer
token, and what a failed call means for the user. `jaxinfer client` (synchronous calls) and
`jaxinfer bench serve --target` (asyncio load) both connect through `ServerConnection`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc

from jaxinfer.errors import RequestError
from serving.security import read_token


@dataclasses.dataclass(frozen=True)
class ServerConnection:
    """`address` is HOST:PORT; `tls_ca` a PEM CA certificate (TLS when given); `auth_token_file`
    the file holding the server's bearer token; `address_flag` the option that set the address,
    named in errors."""

    address: str
    tls_ca: Path | None = None
    auth_token_file: Path | None = None
    address_flag: str = "--address"

    def channel(self) -> grpc.Channel:
        return self._open(grpc)

    def aio_channel(self) -> grpc.aio.Channel:
        return self._open(grpc.aio)

    def _open(self, api):
        """A channel from `api` (the grpc module or grpc.aio, which name their channels alike)."""
        if self.tls_ca is None:
            return api.insecure_channel(self.address)
        return api.secure_channel(self.address, grpc.ssl_channel_credentials(Path(self.tls_ca).read_bytes()))

    def metadata(self) -> list[tuple[str, str]]:
        """The call metadata: the bearer token, when there is one."""
        if self.auth_token_file is None:
            return []
        return [("authorization", f"Bearer {read_token(self.auth_token_file)}")]

    def call_error(self, err: grpc.RpcError, call: str) -> RequestError:
        """The error to show for a failed `call`: the server's status and details, and what to do
        where the cause is on the client's side."""
        hints = {
            grpc.StatusCode.UNAVAILABLE: f"start `jaxinfer serve` there and wait until it is ready, or fix "
                                         f"{self.address_flag} (and --tls-ca, for a server with TLS)",
            grpc.StatusCode.UNAUTHENTICATED: "pass the server's bearer token with --auth-token-file",
        }
        hint = hints.get(err.code())
        return RequestError(f"{self.address}: the {call} request failed ({err.code().name}: {err.details()})"
                            + (f"; {hint}" if hint else ""))
