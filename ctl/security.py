"""Transport security and bearer tokens, the same way for both servers and every client.

Servers: TLS from a PEM certificate and key, mutual TLS when a client CA is given (`server_credentials`);
the files are read again when they change (a renewed certificate is served from the next handshake on);
certificates of a key type gRPC cannot use in TLS (`GRPC_KEY_TYPES`: RSA, ECDSA P-256 and P-384) are
refused, at start and on a change, for servers and clients alike; tokens in the `authorization: Bearer
TOKEN` metadata, each method needing one scope (`TokenAuth`, a server interceptor; `token_auth` says
loudly when a server runs without). Health and reflection stay open unless asked (Kubernetes' gRPC probes
send no token). Tokens are compared in constant time (`hmac.compare_digest`) and never logged or echoed.

A token setting holds tokens separated by commas, or `@PATH`: a file with one token per line, for secrets
mounted as files; a line whose first non-blank character is `#` is a comment, and a token may hold neither
whitespace nor `#` (so that a comment can never become part of a token, in a file or inline), and only
printable ASCII (gRPC metadata and HTTP headers carry nothing else; a UTF-8 BOM opening a file is
dropped). An empty setting means no tokens; a setting given that yields none (an empty file, only
comments) is an error. A token file is read again when it changes (`Tokens`): a token removed from it is
refused, a new one taken.

Clients: `aio_channel` / `channel` (TLS with `channel_credentials`, optionally with a client certificate;
the token on every call of an asyncio channel, or `bearer(token)` as a call's metadata), and the flags
every ctl command that calls a server takes (`add_client_arguments`, `client_security`, which refuses to
send a token in plaintext to another machine unless told to). A plaintext channel to this machine never
goes through an HTTP proxy (`http_proxy` and the like): the proxy would reach its own localhost, and a
token would cross the network in plaintext on the way.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc

from ctl.serving import rewrap
from ctl.settings import parse_bool

log = logging.getLogger(__name__)

READ, WRITE = "read", "write"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MIN_TOKEN_LENGTH = 16
TOKEN_CHECK_S = 1.0  # how often, at most, a token file is looked at (one stat) for a change
ALLOW_INSECURE_TOKEN_ENV = "CTL_ALLOW_INSECURE_TOKEN"


class SecurityConfigError(ValueError):
    """A TLS file or a token setting cannot be used."""


# ---------------------------------------------------------------- token settings


def _token_problem(token: str, foreign: bool) -> str | None:
    """What is wrong with one token (never the token itself: messages must not echo it)."""
    if any(c.isspace() for c in token):
        return "contains whitespace"
    odd = next((c for c in token if not "!" <= c <= "~"), None)
    if odd is not None:  # a client could never send it: accepting it would leave a scope unusable
        return (
            f"contains U+{ord(odd):04X}, which is not printable ASCII "
            "(tokens travel in gRPC metadata and HTTP headers, which carry nothing else)"
        )
    if foreign:
        return None
    if "#" in token:
        return "contains '#' (a comment is a line of its own that starts with '#')"
    if len(token) < MIN_TOKEN_LENGTH:
        return (
            f"is too short: a token needs at least {MIN_TOKEN_LENGTH} characters (this one has {len(token)})"
        )
    return None


def parse_tokens(setting: str, what: str, *, foreign: bool = False) -> tuple[str, ...]:
    """The tokens of a setting: "a,b" or "@/path/file" (one per line, `#` lines are comments); () for an
    empty setting. A setting given that yields no token is an error (an empty Secret, a rotation half
    done: running open instead would be silent). Ours need 16 characters and no whitespace or `#`; a key
    chosen by another system (`foreign`: Qdrant's) is taken as it is but for whitespace. Every token is
    printable ASCII; a UTF-8 BOM at the start of a file (Windows editors write one) is not part of it."""
    setting = setting.strip()
    if not setting:
        return ()
    if setting.startswith("@"):
        path = Path(setting[1:])
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: drops a leading BOM
        except OSError as exc:
            raise SecurityConfigError(f"{what}: cannot read the token file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise SecurityConfigError(f"{what}: the token file {path} is not UTF-8 text") from exc
        entries = [(f"line {n} of {path}", line.strip()) for n, line in enumerate(lines, 1)]
        entries = [(where, t) for where, t in entries if t and not t.startswith("#")]
        if not entries:
            raise SecurityConfigError(
                f"{what}: the token file {path} holds no token (it is empty or holds only comments); "
                "put one token per line, or leave the setting empty to run without tokens"
            )
    else:
        entries = [(f"token {n}", t.strip()) for n, t in enumerate(setting.split(","), 1)]
        entries = [(where, t) for where, t in entries if t]
        if not entries:
            raise SecurityConfigError(f"{what}: the setting holds no token, only commas")
    for where, token in entries:
        problem = _token_problem(token, foreign)
        if problem:
            raise SecurityConfigError(
                f"{what}: {where} {problem}; generate a token with `openssl rand -hex 32`"
            )
    return tuple(token for _, token in entries)


def parse_token(setting: str, what: str, *, foreign: bool = False) -> str:
    """The one token of a client setting ("TOKEN" or "@FILE"); "" when empty."""
    tokens = parse_tokens(setting, what, foreign=foreign)
    if len(tokens) > 1:
        raise SecurityConfigError(f"{what}: give one token, not {len(tokens)}")
    return tokens[0] if tokens else ""


Stamp = tuple[int, ...] | tuple[str, int]


def _stamp(path: Path) -> Stamp:
    """What changes when a file is replaced or rewritten (a Secret's symlink swap gives another inode)."""
    try:
        st = path.stat()
    except OSError as exc:
        return ("unreadable", exc.errno or 0)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Tokens:
    """The tokens of one setting as they are now. Those of a file (`@FILE`) are read again once it has
    changed (its inode, size or modification time, looked at on use and at most every `check_s`
    seconds), so that a token removed from the file is refused and a new one taken without a restart. A
    file that changes into something unusable (empty or only comments during a rotation, a bad line, gone)
    is logged as an error, once per change, and the tokens read before stay in force: never none, which
    would let every caller in. `single`: one token (a client's)."""

    def __init__(
        self,
        setting: str,
        what: str,
        *,
        foreign: bool = False,
        single: bool = False,
        check_s: float = TOKEN_CHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self._setting = setting.strip()
        self._foreign, self._single, self.check_s, self._clock = foreign, single, check_s, clock
        self.path = Path(self._setting[1:]) if self._setting.startswith("@") else None
        # stamped before the read: a change while it is read is seen at the next check
        self._stamp = _stamp(self.path) if self.path is not None else None
        self._refused: Stamp | None = None
        self._set(self._parse())
        self._next_check = clock() + check_s

    def _parse(self) -> tuple[str, ...]:
        if self._single:
            token = parse_token(self._setting, self.what, foreign=self._foreign)
            return (token,) if token else ()
        return parse_tokens(self._setting, self.what, foreign=self._foreign)

    def _set(self, tokens: tuple[str, ...]) -> None:
        self.tokens = tokens
        self.encoded = tuple(t.encode() for t in tokens)

    def __bool__(self) -> bool:
        """Whether the setting was given (then it always holds a token)."""
        return bool(self.tokens)

    def refresh(self) -> None:
        """Reads the file again if it changed since it was last read (at most every `check_s` seconds)."""
        if self.path is None:
            return
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self.check_s
        stamp = _stamp(self.path)
        if stamp == self._stamp or stamp == self._refused:
            return
        try:
            tokens = self._parse()
        except SecurityConfigError as exc:
            self._refused = stamp
            log.error(
                "%s; the token file changed but cannot be used: the %d token(s) read before stay in force "
                "until it holds usable tokens again",
                exc,
                len(self.tokens),
            )
            return
        self._stamp, self._refused = stamp, None
        self._set(tokens)
        log.info("%s: read %s again (it changed): %d token(s) now", self.what, self.path, len(tokens))

    def current(self) -> tuple[str, ...]:
        self.refresh()
        return self.tokens


# ---------------------------------------------------------------- TLS


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _first_der(cert_pem: bytes) -> bytes | None:
    """The first certificate of a PEM chain (the server's own), DER-encoded."""
    found = _PEM_CERT.search(cert_pem)
    return None if found is None else ssl.PEM_cert_to_DER_cert(found.group().decode("ascii"))


def _fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the first certificate of a PEM chain, as `openssl x509 -fingerprint -sha256` shows it."""
    der = _first_der(cert_pem)
    if der is None:
        return "?"
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


# Key types by the OIDs of a certificate's SubjectPublicKeyInfo (RFC 5280, 5480, 8410). gRPC (BoringSSL)
# serves RSA and ECDSA P-256/P-384 to its own clients; it cannot load DSA, Ed448 or curves other than the
# NIST ones, and loads P-521 and Ed25519 but its clients (ctl's, the ranker's) refuse the handshake
# (NO_COMMON_SIGNATURE_ALGORITHMS); the same holds for client certificates and gRPC servers.
# tests/test_security.py checks this against gRPC itself.
_KEY_ALGORITHMS = {
    "1.2.840.113549.1.1.1": "RSA",
    "1.2.840.113549.1.1.10": "RSA-PSS",
    "1.2.840.10040.4.1": "DSA",
    "1.2.840.10045.2.1": "ECDSA",
    "1.3.101.112": "Ed25519",
    "1.3.101.113": "Ed448",
}
_CURVES = {
    "1.2.840.10045.3.1.7": "P-256",
    "1.3.132.0.34": "P-384",
    "1.3.132.0.35": "P-521",
    "1.3.132.0.33": "P-224",
    "1.3.132.0.10": "secp256k1",
}
GRPC_KEY_TYPES = ("RSA", "ECDSA P-256", "ECDSA P-384")


def _require_grpc_key_type(cert_pem: bytes, what: str) -> None:
    """Refuses a certificate (its first, own one) whose key type gRPC cannot use in a handshake."""
    try:
        der = _first_der(cert_pem)
        kind = key_type(der) if der is not None else "unknown"
    except (IndexError, ValueError):
        kind = "unknown"
    if kind not in GRPC_KEY_TYPES:
        raise SecurityConfigError(
            f"{what} has a key of type {kind}, which gRPC cannot use in TLS (the handshake fails): use a "
            f"key of type {', '.join(GRPC_KEY_TYPES[:-1])} or {GRPC_KEY_TYPES[-1]} "
            "(e.g. `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`)"
        )


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start, end) of the DER element at `pos`: its contents are der[start:end]."""
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(der[pos : pos + size], "big")
        pos += size
    if pos + length > len(der):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _elements(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        out.append(_tlv(der, start))
        start = out[-1][2]
    return out


def _oid(contents: bytes) -> str:
    arcs, value = [], 0
    for byte in contents:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


def key_type(cert_der: bytes) -> str:
    """The type of a certificate's public key ("RSA", "ECDSA P-256", "Ed25519", ... or the algorithm's
    OID), read from its SubjectPublicKeyInfo: the ssl module loads key types that gRPC cannot serve."""
    _, start, end = _tlv(cert_der, 0)  # Certificate
    _, start, end = _tlv(cert_der, start)  # TBSCertificate
    fields = _elements(cert_der, start, end)
    if fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    _, start, end = fields[5]  # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    _, start, end = _tlv(cert_der, start)  # AlgorithmIdentifier
    algorithm, *parameters = _elements(cert_der, start, end)
    oid = _oid(cert_der[algorithm[1] : algorithm[2]])
    name = _KEY_ALGORITHMS.get(oid, oid)
    if name == "ECDSA":
        tag, start, end = parameters[0] if parameters else (0, 0, 0)
        curve = _oid(cert_der[start:end]) if tag == 0x06 else "with explicit parameters"
        name = f"ECDSA {_CURVES.get(curve, curve)}"
    return name


class _CertificateFiles:
    """A server's TLS files as gRPC's certificate fetcher, which it calls before each TLS handshake, on
    its own threads: the files are looked at (one stat each) and, once they changed, read and checked
    (certificate and key parse and belong together, the client CA parses) and served from then on. Files
    caught half-written or mismatched (a certificate renewed before its key) are logged once per change
    and the last good ones stay in use; the next change is tried again."""

    def __init__(self, cert: str, key: str, client_ca: str) -> None:
        self._cert, self._key, self._client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._stamps = self._stat()  # before the read: a change while it is read is seen next time
        self._refused: tuple[Stamp, ...] | None = None
        self.initial, self.fingerprint = self._load()

    def _stat(self) -> tuple[Stamp, ...]:
        return tuple(_stamp(Path(p)) for p in (self._cert, self._key, self._client_ca) if p)

    def _contents(self) -> tuple[bytes, bytes, bytes | None]:
        return (
            _read(self._cert, "TLS certificate"),
            _read(self._key, "TLS key"),
            _read(self._client_ca, "TLS client CA") if self._client_ca else None,
        )

    def _load(self) -> tuple[grpc.ServerCertificateConfiguration, str]:
        """The files as a gRPC configuration, checked with the ssl module first (gRPC would take broken
        files and fail every handshake with them), and the key type with `GRPC_KEY_TYPES` (gRPC fails to
        bind with some others, keeps serving the old certificate on a reload with them, or serves them to
        no client of its own)."""
        contents = self._contents()
        cert, key, ca = contents
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self._cert, self._key, password=b"")
            if ca is not None:
                context.load_verify_locations(cadata=ca.decode("ascii"))
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise SecurityConfigError(
                f"TLS: the certificate {self._cert} and key {self._key}"
                f"{f' or the client CA {self._client_ca}' if ca is not None else ''} cannot be used: {exc}"
            ) from exc
        if self._contents() != contents:  # what was checked is what is served
            raise SecurityConfigError(f"TLS: the files {self._cert}, {self._key} changed while read")
        _require_grpc_key_type(cert, f"TLS: the certificate {self._cert}")
        config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        return config, _fingerprint(cert)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration if the files changed and can be used, else None (keep the current)."""
        try:
            with self._lock:
                stamps = self._stat()
                if stamps == self._stamps or stamps == self._refused:
                    return None
                try:
                    config, self.fingerprint = self._load()
                except SecurityConfigError as exc:
                    self._refused = stamps
                    log.error("%s; still serving the certificate read before", exc)
                    return None
                self._stamps, self._refused = stamps, None
                log.info("TLS: serving %s again, changed (SHA-256 %s)", self._cert, self.fingerprint)
                return config
        except Exception:  # on gRPC's thread: an error here must not end the server's handshakes
            log.exception("TLS: checking the certificate files failed; still serving the one read before")
            return None


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """TLS credentials for a server (None when no certificate is set: plaintext), read again when the
    files change (cert-manager renews them in place). With `client_ca`, clients must present a
    certificate signed by it (mutual TLS)."""
    if not cert and not key:
        if client_ca:
            raise SecurityConfigError("a client CA (mutual TLS) needs the server's own certificate and key")
        return None
    if not (cert and key):
        raise SecurityConfigError("TLS needs both a certificate and its private key")
    files = _CertificateFiles(cert, key, client_ca)
    log.info("TLS: serving %s (SHA-256 %s), read again when it changes", cert, files.fingerprint)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files, require_client_authentication=bool(client_ca)
    )


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """TLS credentials for a client (None: plaintext). `ca`: the CA that signed the server's certificate;
    `cert` and `key`: this client's own, for servers that require mutual TLS."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise SecurityConfigError("a client certificate needs its private key, and the other way round")
    chain = _read(cert, "TLS client certificate") if cert else None
    if chain is not None:  # a server would refuse it at every handshake: say so before connecting
        _require_grpc_key_type(chain, f"TLS: the client certificate {cert}")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "TLS CA") if ca else None,
        private_key=_read(key, "TLS client key") if key else None,
        certificate_chain=chain,
    )


# ---------------------------------------------------------------- clients


def _host(host_port: str) -> str:
    """The host of "host:port", "[v6]:port", "host" or a bare IPv6 address."""
    if host_port.startswith("["):
        return host_port[1:].split("]", 1)[0]
    if host_port.count(":") == 1:
        return host_port.split(":", 1)[0]
    return host_port


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (localhost, 127.0.0.0/8, ::1), from
    the text alone: `localhost.example.com` or `127.0.0.1.nip.io` are other machines."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def is_local(target: str) -> bool:
    """Whether a gRPC target stays on this machine: a unix socket, localhost, 127.0.0.0/8 or ::1. Judged
    from the text alone, before any connection (nothing is resolved: another name counts as remote)."""
    lower = target.strip().lower()
    if lower.startswith(("unix:", "unix-abstract:")):
        return True
    if lower.startswith("dns:"):
        rest = target.strip()[4:]
        if rest.startswith("//"):  # dns://[authority]/host:port
            rest = rest[2:].partition("/")[2]
        hosts = [rest]
    elif lower.startswith(("ipv4:", "ipv6:")):
        hosts = target.strip()[5:].split(",")
    else:
        hosts = [target.strip()]
    return all(is_loopback(_host(h.strip())) for h in hosts)


@functools.lru_cache(maxsize=64)
def _warn_plaintext_token(address: str) -> None:
    """Once per address and process."""
    log.warning("a bearer token goes in plaintext to %s: anyone on the way can read and reuse it", address)


# the variables gRPC takes an HTTP proxy from, in its order (it reads no upper-case ones)
PROXY_ENV = ("grpc_proxy", "https_proxy", "http_proxy")


def _proxy_variable() -> str | None:
    """The variable whose HTTP proxy gRPC would send a call through, if any is set."""
    return next((name for name in PROXY_ENV if os.environ.get(name, "").strip()), None)


def _direct(address: str, credentials: grpc.ChannelCredentials | None, options) -> list | None:
    """A channel's options: a plaintext channel to this machine never goes through an HTTP proxy, which
    gRPC would otherwise use (`http_proxy`...): the proxy would connect to its own `localhost`, and the
    call, token included, would cross the network in plaintext. Ours come last, so they win."""
    if credentials is None and is_local(address):
        return [*(options or ()), ("grpc.enable_http_proxy", 0)]
    return options


def check_token_transport(
    address: str, credentials: grpc.ChannelCredentials | None, token: str, *, allow: bool, what: str
) -> None:
    """Refuses (SecurityConfigError) to send `token` without TLS to anything but this machine, unless
    `allow`, which warns instead (a network trusted for it: a service mesh's own mutual TLS). A channel
    to this machine goes there directly (`_direct`), never through a proxy."""
    if not token or credentials is not None or is_local(address):
        return
    if not allow:
        proxy = _proxy_variable()
        raise SecurityConfigError(
            f"{what} would travel in plaintext to {address}"
            f"{f' (through the HTTP proxy that {proxy} names)' if proxy else ''}: connect with TLS "
            f"(--tls-ca), or, on a network you trust with it, pass --allow-insecure-token "
            f"({ALLOW_INSECURE_TOKEN_ENV}=true)"
        )
    _warn_plaintext_token(address)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (none for an empty token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), *bearer(token)))


def _current(token: str | Tokens) -> str:
    return token if isinstance(token, str) else next(iter(token.current()), "")


# One class per call type: grpc.aio files each interceptor under the first type it matches.
class _UnaryBearer(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str | Tokens) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, _current(self._token)), request)


class _StreamBearer(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str | Tokens) -> None:
        self._token = token

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, _current(self._token)), request_iterator)


def aio_channel(
    address: str, credentials: grpc.ChannelCredentials | None = None, token: str | Tokens = "", options=None
) -> grpc.aio.Channel:
    """An asyncio channel to `address`: TLS with `credentials` (plaintext without), `token` on every call
    (a `Tokens` of one token: as its file holds it now). A token in plaintext to another machine is
    logged as a warning; `client_security` refuses it earlier, unless allowed. Plaintext to this
    machine: never through a proxy."""
    if token and credentials is None and not is_local(address):
        _warn_plaintext_token(address)
    interceptors = [_UnaryBearer(token), _StreamBearer(token)] if token else None
    options = _direct(address, credentials, options)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def channel(address: str, credentials: grpc.ChannelCredentials | None = None, options=None) -> grpc.Channel:
    """A blocking channel to `address` (tokens go with each call: `metadata=bearer(token)`); plaintext to
    this machine: never through a proxy."""
    options = _direct(address, credentials, options)
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def add_client_arguments(parser, env_prefix: str = "CTL_") -> None:
    """--token, --tls-ca, --tls-cert, --tls-key, --allow-insecure-token for a command that calls a ctl
    server; each has an environment variable (CTL_TOKEN, CTL_TLS_CA, ...). The token's value is never
    printed."""
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
    parser.add_argument(
        "--allow-insecure-token",
        action="store_true",
        default=None,  # None: not given, read the variable when the command runs
        help="send --token without TLS to a host other than this machine (refused otherwise: anyone on "
        f"the way could read it), with a warning (env {ALLOW_INSECURE_TOKEN_ENV}=true)",
    )


def client_security(args, address: str | None = None) -> tuple[grpc.ChannelCredentials | None, str]:
    """(TLS credentials, token) from the flags of `add_client_arguments`, for calls to `address` (default:
    the command's `--ranker`, else its ADDRESS); a token that would go in plaintext to another machine is
    refused unless allowed, before anything connects."""
    if address is None:
        address = getattr(args, "ranker", None) or args.address
    credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    token = parse_token(args.token, "--token")
    check_token_transport(address, credentials, token, allow=allow_insecure_token(args), what="--token")
    return credentials, token


def allow_insecure_token(args) -> bool:
    """--allow-insecure-token, else CTL_ALLOW_INSECURE_TOKEN (read when the command runs)."""
    allow = getattr(args, "allow_insecure_token", None)
    if allow is not None:
        return allow
    text = os.environ.get(ALLOW_INSECURE_TOKEN_ENV, "")
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError:
        raise SecurityConfigError(f"{ALLOW_INSECURE_TOKEN_ENV}={text!r}: expected true or false") from None


# ---------------------------------------------------------------- servers: tokens


class TokenAuth(grpc.aio.ServerInterceptor):
    """Requires a token of the method's scope. `scopes`: scope -> its `Tokens` (read again when their file
    changes); `methods`: method name (the last part of the path, e.g. "Recommend") -> scope. A method not
    listed needs a token of any scope; with `protect_open`, health and reflection do too. Missing or
    unknown token: UNAUTHENTICATED; a token without the method's scope: PERMISSION_DENIED."""

    def __init__(
        self,
        scopes: Mapping[str, Tokens],
        methods: Mapping[str, str],
        *,
        protect_open: bool = False,
    ) -> None:
        self._scopes = dict(scopes)
        self._methods = dict(methods)
        self._protect_open = protect_open

    @property
    def enabled(self) -> bool:
        return any(self._scopes.values())

    def _scopes_of(self, token: bytes) -> set[str]:
        found = set()
        for scope, tokens in self._scopes.items():
            tokens.refresh()
            matched = False
            for known in tokens.encoded:  # every comparison runs: no early exit that timing could reveal
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


def token_auth(
    scopes: Mapping[str, Tokens], methods: Mapping[str, str], *, protect_open: bool
) -> TokenAuth | None:
    """The interceptor for `scopes`, or None when no token setting is given: the server then lets every
    caller in, which must never go unnoticed: once it listens, the server says so with
    `warn_unauthenticated`."""
    auth = TokenAuth(scopes, methods, protect_open=protect_open)
    return auth if auth.enabled else None


def warn_unauthenticated(scopes: Mapping[str, Tokens], *, service: str, host: str) -> None:
    """Log that a server listening on `host` runs without tokens: a warning, unless it listens on loopback
    only (`ctl demo`, `ctl ingest --embedded`). Called once the port is bound: a server that cannot
    listen says only that."""
    log.log(
        logging.INFO if is_loopback(host.strip("[]")) else logging.WARNING,
        "%s runs WITHOUT authentication: no tokens are set (%s), so whoever reaches its port may call every "
        "method (it listens on %s)",
        service,
        ", ".join(tokens.what for tokens in scopes.values()),
        host,
    )
