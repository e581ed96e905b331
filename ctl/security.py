"""Transport security and bearer tokens, the same way for both servers and every client.

Servers: TLS from a PEM certificate and key, mutual TLS when a client CA is given (`server_credentials`);
tokens in the `authorization: Bearer TOKEN` metadata, each method needing one scope (`TokenAuth`, a server
interceptor). Health and reflection stay open unless asked (Kubernetes' gRPC probes send no token).
Tokens are compared in constant time (`hmac.compare_digest`) and never logged or echoed.

A token setting holds tokens separated by commas, or `@PATH`: a file with one token per line (`#` starts
a comment), for secrets mounted as files.

Clients: `aio_channel` / `channel` (TLS with `channel_credentials`, optionally with a client certificate;
the token on every call of an asyncio channel, or `bearer(token)` as a call's metadata), and the flags
every ctl command that calls a server takes (`add_client_arguments`, `client_security`).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from ctl.serving import rewrap

READ, WRITE = "read", "write"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class SecurityConfigError(ValueError):
    """A TLS file or a token setting cannot be used."""


def parse_tokens(setting: str, what: str, min_length: int = 16) -> tuple[str, ...]:
    """The tokens of a setting: "a,b" or "@/path/file" (one per line). Empty: none. Ours must be at least
    16 characters; a key chosen by another system (Qdrant's) is taken as it is (`min_length=1`)."""
    setting = setting.strip()
    if setting.startswith("@"):
        path = Path(setting[1:])
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise SecurityConfigError(f"{what}: cannot read the token file {path}: {exc.strerror}") from exc
        tokens = [line.split("#", 1)[0].strip() for line in lines]
    else:
        tokens = [t.strip() for t in setting.split(",")]
    tokens = [t for t in tokens if t]
    for token in tokens:
        if len(token) < min_length or any(c.isspace() for c in token):
            raise SecurityConfigError(
                f"{what}: every token must be at least {min_length} characters without spaces "
                f"(one has {len(token)}); generate one with `openssl rand -hex 32`"
            )
    return tuple(tokens)


def parse_token(setting: str, what: str, min_length: int = 16) -> str:
    """The one token of a client setting ("TOKEN" or "@FILE"); "" when empty."""
    tokens = parse_tokens(setting, what, min_length)
    if len(tokens) > 1:
        raise SecurityConfigError(f"{what}: give one token, not {len(tokens)}")
    return tokens[0] if tokens else ""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """TLS credentials for a server (None when no certificate is set: plaintext). With `client_ca`,
    clients must present a certificate signed by it (mutual TLS)."""
    if not cert and not key:
        if client_ca:
            raise SecurityConfigError("a client CA (mutual TLS) needs the server's own certificate and key")
        return None
    if not (cert and key):
        raise SecurityConfigError("TLS needs both a certificate and its private key")
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    if client_ca:
        return grpc.ssl_server_credentials(
            [pair], root_certificates=_read(client_ca, "TLS client CA"), require_client_auth=True
        )
    return grpc.ssl_server_credentials([pair])


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """TLS credentials for a client (None: plaintext). `ca`: the CA that signed the server's certificate;
    `cert` and `key`: this client's own, for servers that require mutual TLS."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise SecurityConfigError("a client certificate needs its private key, and the other way round")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "TLS CA") if ca else None,
        private_key=_read(key, "TLS client key") if key else None,
        certificate_chain=_read(cert, "TLS client certificate") if cert else None,
    )


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (none for an empty token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), *bearer(token)))


# One class per call type: grpc.aio files each interceptor under the first type it matches.
class _UnaryBearer(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self._token), request)


class _StreamBearer(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self._token), request_iterator)


def aio_channel(
    address: str, credentials: grpc.ChannelCredentials | None = None, token: str = "", options=None
) -> grpc.aio.Channel:
    """An asyncio channel to `address`: TLS with `credentials` (plaintext without), `token` on every call."""
    interceptors = [_UnaryBearer(token), _StreamBearer(token)] if token else None
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def channel(address: str, credentials: grpc.ChannelCredentials | None = None, options=None) -> grpc.Channel:
    """A blocking channel to `address` (tokens go with each call: `metadata=bearer(token)`)."""
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def add_client_arguments(parser, env_prefix: str = "CTL_") -> None:
    """--token, --tls-ca, --tls-cert, --tls-key for a command that calls a ctl server; each has an
    environment variable (CTL_TOKEN, CTL_TLS_CA, ...). The token's value is never printed."""
    import os

    for name, text in (
        ("token", "token sent as 'authorization: Bearer TOKEN', or @FILE holding it"),
        ("tls_ca", "PEM CA of the server's certificate: connect with TLS"),
        ("tls_cert", "PEM client certificate (servers that require mutual TLS)"),
        ("tls_key", "PEM private key of --tls-cert"),
    ):
        env = env_prefix + name.upper()
        parser.add_argument(
            "--" + name.replace("_", "-"), default=os.environ.get(env, ""), help=f"{text} (env {env})"
        )


def client_security(args) -> tuple[grpc.ChannelCredentials | None, str]:
    """(TLS credentials, token) from the flags of `add_client_arguments`."""
    return channel_credentials(args.tls_ca, args.tls_cert, args.tls_key), parse_token(args.token, "--token")


class TokenAuth(grpc.aio.ServerInterceptor):
    """Requires a token of the method's scope. `scopes`: scope -> tokens; `methods`: method name (the last
    part of the path, e.g. "Recommend") -> scope. A method not listed needs a token of any scope; with
    `protect_open`, health and reflection do too. Missing or unknown token: UNAUTHENTICATED; a token
    without the method's scope: PERMISSION_DENIED."""

    def __init__(
        self,
        scopes: Mapping[str, Iterable[str]],
        methods: Mapping[str, str],
        *,
        protect_open: bool = False,
    ) -> None:
        self._scopes = {scope: tuple(t.encode() for t in tokens) for scope, tokens in scopes.items()}
        self._methods = dict(methods)
        self._protect_open = protect_open

    @property
    def enabled(self) -> bool:
        return any(self._scopes.values())

    def _scopes_of(self, token: bytes) -> set[str]:
        found = set()
        for scope, tokens in self._scopes.items():
            matched = False
            for known in tokens:  # every comparison runs: no early exit that timing could reveal
                matched |= hmac.compare_digest(token, known)
            if matched:
                found.add(scope)
        return found

    def _refusal(self, path: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        if not self._protect_open and path.startswith(OPEN_SERVICES):
            return None
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, (
                "this server needs a token: send the metadata 'authorization: Bearer TOKEN' "
                "(ctl: --token or CTL_TOKEN)"
            )
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must be 'Bearer TOKEN'"
        held = self._scopes_of(token.strip().encode())
        if WRITE in held:
            held.add(READ)  # who may change the catalog may also read it (an ingestion job asks for stats)
        if not held:
            return grpc.StatusCode.UNAUTHENTICATED, "the token is not valid here"
        method = path.rsplit("/", 1)[-1]
        needed = self._methods.get(method)
        if needed is not None and needed not in held:
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"this token may not call {method}: it needs a token of the {needed!r} scope "
                f"(this one has: {', '.join(sorted(held))})"
            )
        return None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self.enabled:
            return handler
        refusal = self._refusal(handler_call_details.method, handler_call_details.invocation_metadata)
        if refusal is None:
            return handler
        code, message = refusal

        async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
            await context.abort(code, message)

        return rewrap(handler, lambda _behaviour: refuse)
