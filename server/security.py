"""Bearer-token authentication for the gRPC server.

With ``--auth-token-file``, every call must carry ``authorization: Bearer <token>`` metadata;
a missing or wrong token ends as ``UNAUTHENTICATED`` before any work is done. Health checks and
reflection stay open so load balancers and tooling work without the secret.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped); errors name the file."""
    path = Path(path)
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"--auth-token-file {path}: cannot read ({e.strerror})") from None
    if not token:
        raise ValueError(f"--auth-token-file {path}: file is empty")
    if any(c.isspace() for c in token):
        raise ValueError(f"--auth-token-file {path}: the token must be one line without spaces")
    return token


def _deny(message: str) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator, as a streaming handler must be)

    # The denial must match the method's cardinality; request bodies are not even parsed.
    return unary, stream


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization")
        handler = await continuation(handler_call_details)
        if given is not None and hmac.compare_digest(given.encode(), self._expected):
            return handler
        message = "missing authorization metadata: send 'authorization: Bearer <token>'" if given is None else "invalid bearer token"
        unary, stream = _deny(message)
        if handler is None:
            return None
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)
