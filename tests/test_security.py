"""TLS, mutual TLS and scoped tokens, with real `ctl serve-encoder` and `ctl serve-ranker` processes.

The ranker reaches the encoder over TLS with a token of its own; callers reach the ranker over mutual TLS
with read or write tokens. Certificates are made for the test (tests/certs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import hashlib
import http.server
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctl.encoding import ModelInfo
from ctl.security import bearer, channel_credentials
from ctl.v1 import encoder_pb2, encoder_pb2_grpc, ranker_pb2, ranker_pb2_grpc
from ranker_service.config import RankerConfig
from ranker_service.errors import StoreError
from ranker_service.server import open_store, qdrant_credentials
from tests.certs import PKI, make_pki
from tests.servers import REPO, Process

READ_TOKEN = "read-token-0123456789abcdef"
WRITE_TOKEN = "write-token-0123456789abcdef"
ENCODER_TOKEN = "encoder-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _secure(address: str, pki: PKI, client: bool = True) -> grpc.Channel:
    creds = channel_credentials(pki.ca, pki.client_cert if client else "", pki.client_key if client else "")
    return grpc.secure_channel(address, creds)


def _wait_serving(address: str, pki: PKI, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with _secure(address, pki) as chan:
        while time.monotonic() < deadline:
            try:
                reply = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING")


@pytest.fixture(scope="module")
def servers(exported_repo, pki, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    token_file = tmp_path_factory.mktemp("secrets") / "write-tokens"
    token_file.write_text(f"# the ingestion job's token\n{WRITE_TOKEN}\n")
    encoder = Process(
        "serve-encoder", "--model-repo", str(exported_repo), "--port", "0", "--metrics-port", "-1",
        env={"CTL_ENCODER_TLS_CERT": pki.server_cert, "CTL_ENCODER_TLS_KEY": pki.server_key,
             "CTL_ENCODER_TOKENS": ENCODER_TOKEN},
    )  # fmt: skip
    ranker = Process(
        "serve-ranker", "--encoder", encoder.address, "--store-path", str(store / "{model_version}"),
        "--port", "0", "--metrics-port", "-1",
        env={"CTL_RANKER_TLS_CERT": pki.server_cert, "CTL_RANKER_TLS_KEY": pki.server_key,
             "CTL_RANKER_TLS_CLIENT_CA": pki.ca, "CTL_RANKER_READ_TOKENS": READ_TOKEN,
             "CTL_RANKER_WRITE_TOKENS": f"@{token_file}", "CTL_RANKER_ENCODER_TOKEN": ENCODER_TOKEN,
             "CTL_RANKER_ENCODER_TLS_CA": pki.ca, "CTL_RANKER_HEALTH_PORT": "0"},
    )  # fmt: skip
    try:
        _wait_serving(ranker.address, pki)  # SERVING: it reached the encoder over TLS with its token
        yield encoder, ranker
    finally:
        ranker.stop()
        encoder.stop()


def _error(call) -> tuple[grpc.StatusCode | None, str]:
    """The status code and message a call ended with (None, "" when it succeeded)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return None, ""


def _code(call) -> grpc.StatusCode | None:
    return _error(call)[0]


def test_tokens_are_checked_per_scope(servers, pki, synth_dir):
    _, ranker = servers
    image = next((synth_dir / "images").glob("*.jpg")).read_bytes()
    product = ranker_pb2.Product(product_id="p-1", category="shoes", image=image)
    with _secure(ranker.address, pki) as chan:
        stub = ranker_pb2_grpc.RankerServiceStub(chan)
        stats = ranker_pb2.GetCatalogStatsRequest()
        code, message = _error(lambda: stub.GetCatalogStats(stats, timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in message
        assert _code(lambda: stub.GetCatalogStats(stats, timeout=10, metadata=bearer("x" * 20))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert _code(
            lambda: stub.GetCatalogStats(stats, timeout=10, metadata=(("authorization", READ_TOKEN),))
        ) == (
            grpc.StatusCode.UNAUTHENTICATED  # not "Bearer TOKEN"
        )
        upsert = [ranker_pb2.UpsertProductsRequest(product=product)]
        code, message = _error(
            lambda: stub.UpsertProducts(iter(upsert), timeout=30, metadata=bearer(READ_TOKEN))
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "write" in message and READ_TOKEN not in message
        reply = stub.UpsertProducts(iter(upsert), timeout=60, metadata=bearer(WRITE_TOKEN))
        assert reply.upserted == 1  # through the ranker to the encoder, over TLS with the encoder's token
        assert stub.GetCatalogStats(stats, timeout=10, metadata=bearer(READ_TOKEN)).total_products == 1
        assert stub.GetCatalogStats(stats, timeout=10, metadata=bearer(WRITE_TOKEN)).total_products == 1
        recommend = ranker_pb2.RecommendRequest(scene_image=image, categories=["shoes"], limit=1)
        got = stub.Recommend(recommend, timeout=30, metadata=bearer(READ_TOKEN))
        assert [p.product_id for p in got.results[0].products] == ["p-1"]
        delete = ranker_pb2.DeleteProductsRequest(product_ids=["p-1"])
        assert _code(lambda: stub.DeleteProducts(delete, timeout=10, metadata=bearer(READ_TOKEN))) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        # health and reflection stay open (Kubernetes' gRPC probes send no token)
        reply = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    for server in servers:
        assert READ_TOKEN not in server.output() and WRITE_TOKEN not in server.output()
        assert ENCODER_TOKEN not in server.output()


def test_tls_and_mutual_tls_are_enforced(servers, pki):
    encoder, ranker = servers
    stats = ranker_pb2.GetCatalogStatsRequest()
    # plaintext to a TLS server fails; TLS without a client certificate fails where mutual TLS is required
    with grpc.insecure_channel(ranker.address) as chan:
        assert _code(lambda: ranker_pb2_grpc.RankerServiceStub(chan).GetCatalogStats(stats, timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    with _secure(ranker.address, pki, client=False) as chan:
        assert _code(lambda: ranker_pb2_grpc.RankerServiceStub(chan).GetCatalogStats(stats, timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    rogue = channel_credentials(pki.ca, pki.rogue_cert, pki.rogue_key)  # a client certificate from another CA
    with grpc.secure_channel(ranker.address, rogue) as chan:
        assert _code(lambda: ranker_pb2_grpc.RankerServiceStub(chan).GetCatalogStats(stats, timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    # the encoder: TLS without client certificates, and its own token
    with _secure(encoder.address, pki, client=False) as chan:
        stub = encoder_pb2_grpc.EncoderServiceStub(chan)
        info = encoder_pb2.GetModelInfoRequest()
        assert _code(lambda: stub.GetModelInfo(info, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: stub.GetModelInfo(info, timeout=5, metadata=bearer(READ_TOKEN))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert stub.GetModelInfo(info, timeout=5, metadata=bearer(ENCODER_TOKEN)).model_version


def _ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "ctl_app.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def test_probes_get_plaintext_health_on_their_own_port(servers):
    _, ranker = servers
    port = int(re.search(r"plaintext health checks on port (\d+)", ranker.output()).group(1))
    with grpc.insecure_channel(f"localhost:{port}") as chan:
        reply = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stats = ranker_pb2.GetCatalogStatsRequest()
        code = _code(lambda: ranker_pb2_grpc.RankerServiceStub(chan).GetCatalogStats(stats, timeout=5))
        assert code == grpc.StatusCode.UNIMPLEMENTED  # only health is there: no way around TLS and tokens
    assert _ctl("health", f"localhost:{port}", "--service", "ctl.v1.RankerService").returncode == 0


def test_ctl_clients_speak_tls_and_tokens(servers, pki, synth_dir, tmp_path):
    _, ranker = servers
    tls = ["--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key]
    assert _ctl("health", ranker.address, *tls).returncode == 0
    assert _ctl("health", ranker.address).returncode == 1  # plaintext to a TLS server
    image = next((synth_dir / "images").glob("*.jpg"))
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(f'{{"product_id": "cli-1", "category": "bags", "image": "{image}"}}\n')
    ingest = ["ingest", str(catalog), "--ranker", ranker.address, "--images", str(synth_dir), *tls]
    denied = _ctl(*ingest, env={"CTL_TOKEN": READ_TOKEN})
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stdout + denied.stderr
    done = _ctl(*ingest, "--fresh", env={"CTL_TOKEN": WRITE_TOKEN})
    assert done.returncode == 0, done.stdout + done.stderr
    found = _ctl(
        "recommend", "--scene", str(image), "--category", "bags", "--ranker", ranker.address, *tls,
        "--token", READ_TOKEN,
    )  # fmt: skip
    assert found.returncode == 0 and "cli-1" in found.stdout, found.stdout + found.stderr
    for result in (denied, done, found):
        assert (
            READ_TOKEN not in result.stdout + result.stderr
            and WRITE_TOKEN not in result.stdout + result.stderr
        )


def test_unusable_security_settings_stop_the_server_with_a_clear_message(tmp_path, exported_repo, pki):
    short = _ctl("serve-encoder", "--model-repo", str(exported_repo), "--port", "0", "--tokens", "short")
    assert short.returncode == 2 and "at least 16 characters" in short.stderr + short.stdout
    missing = _ctl(
        "serve-encoder", "--model-repo", str(exported_repo), "--port", "0", "--tls-cert", pki.server_cert,
        "--tls-key", str(tmp_path / "nope.key"),
    )  # fmt: skip
    assert missing.returncode == 2 and "nope.key" in missing.stderr + missing.stdout
    help_text = _ctl("serve-ranker", "--help", env={"CTL_RANKER_READ_TOKENS": READ_TOKEN}).stdout
    assert "--read-tokens" in help_text and READ_TOKEN not in help_text
    for setting in (["--qdrant-tls-ca", str(tmp_path / "nope-ca.pem")], ["--qdrant-api-key", "@/nope/key"]):
        bad = _ctl("serve-ranker", "--port", "0", "--qdrant-url", "https://localhost:6333", *setting)
        assert bad.returncode == 2 and "nope" in bad.stderr + bad.stdout, setting


@contextlib.contextmanager
def _in_thread(server: socketserver.BaseServer) -> Iterator[int]:
    """Serves `server` on a daemon thread while the block runs; yields its port."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _https_listener(pki: PKI) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """An HTTPS listener with the test CA's server certificate that records the headers of each request
    and answers 503. NOT a Qdrant server (this machine has none): it shows what the ranker puts on the
    wire towards one, which is the part of the Qdrant connection that is ours."""
    seen: list[dict[str, str]] = []

    class Record(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_PUT = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Record)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with _in_thread(server) as port:
        yield f"https://localhost:{port}", seen


def test_the_qdrant_connection_verifies_tls_with_the_given_ca_and_sends_the_api_key(pki, tmp_path):
    key_file = tmp_path / "qdrant-api-key"
    key_file.write_text("qdrant-key-from-a-secret\n")
    info = ModelInfo(
        "v1", input_size=64, grid=2, regions=4, embedding_dim=32, backend="test", max_batch_images=32
    )

    def open_with(config: RankerConfig) -> None:
        asyncio.run(open_store(config, info, qdrant_credentials(config)))

    with _https_listener(pki) as (url, seen):
        config = RankerConfig(
            qdrant_url=url, qdrant_api_key=f"@{key_file}", qdrant_tls_ca=pki.ca, qdrant_timeout_s=5
        )
        with pytest.raises(StoreError, match=re.escape(f"Qdrant at {url} answered 503")):
            open_with(config)  # past the TLS handshake: the server's certificate was verified with the CA
        assert seen and all(h.get("api-key") == "qdrant-key-from-a-secret" for h in seen)
        seen.clear()
        with pytest.raises(StoreError, match=r"cannot reach Qdrant .*CERTIFICATE_VERIFY_FAILED"):
            open_with(replace(config, qdrant_tls_ca=""))  # the system's CAs do not know the test CA
        assert not seen  # no request, so no key, reached a server that could not be verified


# ---------------------------------------------------------------- token settings (issue 20, items 9 and 12)


def test_a_comment_is_a_line_of_its_own_and_a_token_holds_neither_whitespace_nor_hash(tmp_path):
    from ctl.security import SecurityConfigError, parse_tokens

    good = "a" * 20
    listed = tmp_path / "tokens"
    listed.write_text(f"# the ingestion job\n   # indented, still a comment\n{good}\n\n  {'b' * 20}  \n")
    assert parse_tokens(f"@{listed}", "--tokens") == (good, "b" * 20)
    assert parse_tokens(f" {good} , {'c' * 16},", "--tokens") == (good, "c" * 16)
    cases = {  # setting -> what the message must say
        f"{good} {good}": "token 1 contains whitespace",
        f"{good},{good}\tx": "token 2 contains whitespace",
        f"{good}#comment": "token 1 contains '#'",
        f"#{good}": "token 1 contains '#'",  # inline, '#' never starts a comment
    }
    inline_comment = tmp_path / "inline-comment"
    inline_comment.write_text(f"{good} # the reader's token\n")
    cases[f"@{inline_comment}"] = f"line 1 of {inline_comment} contains whitespace"
    glued = tmp_path / "glued"
    glued.write_text(f"# ok\n{good}#old\n")
    cases[f"@{glued}"] = f"line 2 of {glued} contains '#'"
    for setting, expected in cases.items():
        with pytest.raises(SecurityConfigError) as caught:
            parse_tokens(setting, "--tokens")
        message = str(caught.value)
        assert message.startswith("--tokens: ") and expected in message, (setting, message)
        assert "characters" not in message and good not in message, message  # no length talk, no echo
    with pytest.raises(SecurityConfigError, match=r"token 2 is too short: .*at least 16 characters"):
        parse_tokens(f"{good},short", "--tokens")
    # a key chosen by another system (Qdrant's) is taken as it is, '#' included, but not whitespace
    assert parse_tokens("k#y", "--qdrant-api-key", foreign=True) == ("k#y",)
    with pytest.raises(SecurityConfigError, match="contains whitespace"):
        parse_tokens("k y", "--qdrant-api-key", foreign=True)


def test_a_token_setting_given_that_yields_no_token_is_an_error(tmp_path):
    from ctl.security import SecurityConfigError, parse_token, parse_tokens

    empty, comments = tmp_path / "empty", tmp_path / "comments"
    empty.write_text("")
    comments.write_text("# rotated: the new token goes here\n\n   \n")
    assert parse_tokens("", "--tokens") == () and parse_tokens("  ", "--tokens") == ()  # not given: none
    for setting in (f"@{empty}", f"@{comments}", " , ,"):
        for parse in (parse_tokens, parse_token):
            with pytest.raises(SecurityConfigError, match="holds no token"):
                parse(setting, "--tokens")


def _refused_at_start(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """(exit status, output) of `ctl ARGS`, a server expected to stop before it listens; fails the test
    if it serves instead."""
    try:
        server = Process(*args, env=env)
    except RuntimeError as exc:  # it exited before it listened
        return int(re.search(r"ctl exited with (-?\d+)", str(exc)).group(1)), str(exc)
    output = server.output()
    server.stop(kill=True)
    pytest.fail(f"ctl {args[0]} started serving instead:\n{output}")


def test_servers_refuse_to_start_when_a_token_setting_yields_no_token(tmp_path, exported_repo, caplog):
    from ctl.security import Tokens, token_auth, warn_unauthenticated

    empty, comments = tmp_path / "empty", tmp_path / "comments"
    empty.write_text("")
    comments.write_text("# the token is written here at rotation\n")
    encoder = ("serve-encoder", "--model-repo", str(exported_repo), "--port", "0", "--metrics-port", "-1")
    ranker = ("serve-ranker", "--encoder", "localhost:1", "--store-path", str(tmp_path / "store"),
              "--port", "0", "--metrics-port", "-1")  # fmt: skip
    for path in (empty, comments):
        code, output = _refused_at_start(*encoder, env={"CTL_ENCODER_TOKENS": f"@{path}"})
        assert code == 2 and f"--tokens / CTL_ENCODER_TOKENS: the token file {path} holds no token" in output
        assert "Traceback" not in output
        for setting, other in (("read", "write"), ("write", "read")):  # the other scope has a token
            code, output = _refused_at_start(
                *ranker, f"--{setting}-tokens", f"@{path}", f"--{other}-tokens", WRITE_TOKEN
            )
            named = f"--{setting}-tokens / CTL_RANKER_{setting.upper()}_TOKENS"
            assert code == 2 and f"{named}: the token file {path} holds no token" in output
    code, output = _refused_at_start(*ranker, "--encoder-token", f"@{empty}")
    assert code == 2 and f"--encoder-token / CTL_RANKER_ENCODER_TOKEN: the token file {empty}" in output
    code, output = _refused_at_start(*ranker, "--read-tokens", f"{READ_TOKEN} extra")
    assert code == 2 and "--read-tokens / CTL_RANKER_READ_TOKENS: token 1 contains whitespace" in output
    assert READ_TOKEN not in output
    # no token setting at all: it runs, and says so loudly (quietly on loopback only: `ctl demo`)
    with caplog.at_level("INFO", logger="ctl.security"):
        for host in ("127.0.0.1", "[::1]", "localhost", "0.0.0.0", "[::]", "10.1.2.3"):
            scopes = {"any": Tokens("", "--tokens")}
            assert token_auth(scopes, {}, protect_open=False) is None
            warn_unauthenticated(scopes, service="s", host=host)
    assert [r.levelname for r in caplog.records] == ["INFO"] * 3 + ["WARNING"] * 3
    open_ranker = Process(*ranker, "--store-path", str(tmp_path / "open-store"))
    try:
        assert "WARNING" in open_ranker.output()
        assert "ctl.v1.RankerService runs WITHOUT authentication" in open_ranker.output()
    finally:
        open_ranker.stop(kill=True)


# ---------------------------------------------------------------- reloading (issue 20, item 10)


def test_a_token_file_is_read_again_when_it_changes_and_never_falls_open(tmp_path, caplog):
    from ctl.security import Tokens

    old, new = "old-token-0123456789abcdef", "new-token-0123456789abcdef"
    path = tmp_path / "tokens"
    path.write_text(f"{old}\n")
    tokens = Tokens(f"@{path}", "--tokens", check_s=0)  # 0: look at the file on every use
    assert tokens.current() == (old,)
    path.write_text(f"{old}\n{new}\n")
    assert tokens.current() == (old, new)
    path.write_text(f"# {old} was revoked\n{new}\n")
    assert tokens.current() == (new,)
    with caplog.at_level("ERROR", logger="ctl.security"):
        for half_done in ("", "# only a comment\n", f"{new} # a comment\n"):
            path.write_text(half_done)
            assert tokens.current() == (new,) and tokens.current() == (new,)  # the last good ones stay
        path.unlink()
        assert tokens.current() == (new,)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 4, errors  # once per change, not once per use
    assert "holds no token" in errors[0] and "stay in force" in errors[0] and "cannot read" in errors[3]
    assert all(new not in e for e in errors)
    path.write_text(f"{old}\n")
    assert tokens.current() == (old,)
    # looked at no more often than asked: a change is seen once check_s has passed
    now = [0.0]
    slow = Tokens(f"@{path}", "--tokens", check_s=1.0, clock=lambda: now[0])
    path.write_text(f"{new}\n")
    assert slow.current() == (old,)
    now[0] = 1.0
    assert slow.current() == (new,)


def _bearer_server(tmp_path, server_tokens: str, client_token: str):
    """A health-only server on loopback whose every call needs a token of `server_tokens`, and a client
    channel sending `client_token`; both read their files again on every use (check_s=0)."""
    from grpc_health.v1 import health as health_aio

    from ctl.security import TokenAuth, Tokens, aio_channel

    auth = TokenAuth({"any": Tokens(server_tokens, "--tokens", check_s=0)}, {}, protect_open=True)
    server = grpc.aio.server(interceptors=[auth])
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    client = aio_channel(f"127.0.0.1:{port}", None, Tokens(client_token, "--token", single=True, check_s=0))
    return server, client


def test_the_ranker_sends_the_encoder_token_its_file_holds_now(tmp_path):
    """The ranker's token for the encoder and the encoder's tokens come from files that rotate together
    (the secure overlay mounts one Secret key for both): the client side reads its file again too."""
    first, second = "first-token-0123456789abcdef", "second-token-0123456789abcdef"
    server_file, client_file = tmp_path / "encoder-tokens", tmp_path / "encoder-token"
    server_file.write_text(f"{first}\n")
    client_file.write_text(f"{first}\n")

    async def scenario() -> list[grpc.StatusCode | None]:
        server, client = _bearer_server(tmp_path, f"@{server_file}", f"@{client_file}")
        await server.start()
        codes = []
        try:
            stub = health_pb2_grpc.HealthStub(client)
            for change in (None, "server", "client"):
                if change == "server":
                    server_file.write_text(f"{second}\n")
                elif change == "client":
                    client_file.write_text(f"# rotated\n{second}\n")
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    codes.append(None)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
        finally:
            await client.close()
            await server.stop(0)
        return codes

    assert asyncio.run(scenario()) == [None, grpc.StatusCode.UNAUTHENTICATED, None]


def _atomic_write(path, data: bytes) -> None:
    """As a Kubernetes Secret volume changes: the new file appears whole, under the old name."""
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(data)
    staged.replace(path)


@pytest.fixture
def reloading_ranker(pki, tmp_path):
    """A ranker with TLS (mutual), read and write tokens from files it may not keep: copies, which the
    tests change. Its encoder never answers, so a call with a valid token is answered UNAVAILABLE (it
    waits for the encoder) and one without UNAUTHENTICATED: which tokens it takes can be seen."""
    folder = tmp_path / "reloading"
    folder.mkdir()
    files = {name: folder / name for name in ("tls.crt", "tls.key", "read", "write")}
    files["tls.crt"].write_bytes(Path(pki.server_cert).read_bytes())
    files["tls.key"].write_bytes(Path(pki.server_key).read_bytes())
    files["read"].write_text(f"{READ_TOKEN}\n")
    files["write"].write_text(f"{WRITE_TOKEN}\n")
    ranker = Process(
        "serve-ranker", "--encoder", "localhost:1", "--startup-timeout-s", "0", "--store-path",
        str(folder / "store"), "--port", "0", "--metrics-port", "-1",
        env={"CTL_RANKER_TLS_CERT": str(files["tls.crt"]), "CTL_RANKER_TLS_KEY": str(files["tls.key"]),
             "CTL_RANKER_TLS_CLIENT_CA": pki.ca, "CTL_RANKER_READ_TOKENS": f"@{files['read']}",
             "CTL_RANKER_WRITE_TOKENS": f"@{files['write']}"},
    )  # fmt: skip
    try:
        yield ranker, files
    finally:
        ranker.stop(kill=True)  # SIGTERM waits for the start-up wait on the encoder to end (reported)


ACCEPTED, REFUSED = "accepted", "refused"


def _token_taken(address: str, ca: str, pki: PKI, token: str) -> str:
    """Whether the ranker takes `token` for GetCatalogStats: ACCEPTED (past the token check, the call
    waits for the encoder), REFUSED (UNAUTHENTICATED), else the call's code and message. A new
    connection, its TLS verified with `ca`."""
    creds = channel_credentials(ca, pki.client_cert, pki.client_key)
    with grpc.secure_channel(address, creds) as chan:
        stub = ranker_pb2_grpc.RankerServiceStub(chan)
        code, message = _error(lambda: stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest(),
                                                            timeout=10, metadata=bearer(token)))  # fmt: skip
    if code == grpc.StatusCode.UNAVAILABLE and "waiting for the encoder" in message:
        return ACCEPTED
    return REFUSED if code == grpc.StatusCode.UNAUTHENTICATED else f"{code}: {message}"


def _eventually(condition, what: str, timeout: float = 30) -> None:
    """Polls `condition` until it holds (the ranker looks at its token files about once a second)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


def test_the_ranker_revokes_and_takes_tokens_as_their_files_change(reloading_ranker, pki):
    ranker, files = reloading_ranker
    new_reader = "new-reader-0123456789abcdef"
    code = functools.partial(_token_taken, ranker.address, pki.ca, pki)
    assert code(READ_TOKEN) == ACCEPTED and code(new_reader) == REFUSED
    # a rotation: the new token first, then the old one removed (revoked)
    _atomic_write(files["read"], f"{READ_TOKEN}\n{new_reader}\n".encode())
    _eventually(lambda: code(new_reader) == ACCEPTED, "a token added to the file is taken")
    assert code(READ_TOKEN) == ACCEPTED
    _atomic_write(files["read"], f"# {len(READ_TOKEN)} characters, revoked\n{new_reader}\n".encode())
    _eventually(lambda: code(READ_TOKEN) == REFUSED, "a token removed from the file is refused")
    assert code(new_reader) == ACCEPTED and code(WRITE_TOKEN) == ACCEPTED  # the write scope may read
    # emptied in place (a rotation half done): logged, and the last good tokens stay; never open
    files["read"].write_text("")
    # (a file is looked at when a token is checked: each poll makes a call)
    _eventually(lambda: code(READ_TOKEN) and "holds no token" in ranker.output(), "the empty file is logged")
    assert code(new_reader) == ACCEPTED and code(READ_TOKEN) == REFUSED and code("") == REFUSED
    assert code("x" * 20) == REFUSED
    line = next(x for x in ranker.output().splitlines() if "holds no token" in x)
    assert " ERROR " in line and "--read-tokens / CTL_RANKER_READ_TOKENS" in line and "stay in force" in line
    files["read"].write_text(f"{READ_TOKEN}\n")
    _eventually(lambda: code(READ_TOKEN) == ACCEPTED, "usable again: the file's tokens are taken")
    assert code(new_reader) == REFUSED
    assert READ_TOKEN not in ranker.output() and new_reader not in ranker.output()


def _served_fingerprint(address: str) -> str:
    """SHA-256 of the certificate the server presents on a new TLS connection (not verified here:
    which one it is is the question)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def _fingerprint(cert_file: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(Path(cert_file).read_text())).hexdigest()


def test_a_renewed_certificate_is_served_and_a_half_written_one_is_not(reloading_ranker, pki, tmp_path):
    ranker, files = reloading_ranker
    renewed, later = make_pki(tmp_path / "renewed"), make_pki(tmp_path / "later")  # other CAs: other certs
    assert _served_fingerprint(ranker.address) == _fingerprint(pki.server_cert)
    # renewed as cert-manager does: the Secret's files replaced (key first, then certificate)
    _atomic_write(files["tls.key"], Path(renewed.server_key).read_bytes())
    _atomic_write(files["tls.crt"], Path(renewed.server_cert).read_bytes())
    assert _served_fingerprint(ranker.address) == _fingerprint(renewed.server_cert)
    assert _token_taken(ranker.address, renewed.ca, pki, READ_TOKEN) == ACCEPTED  # verified with the new CA
    assert _token_taken(ranker.address, pki.ca, pki, READ_TOKEN).startswith("StatusCode.UNAVAILABLE")
    assert f"SHA-256 {_colons(_fingerprint(renewed.server_cert))}" in ranker.output()
    # caught half-written: the last good certificate stays, and the failure is logged once
    full = Path(later.server_cert).read_bytes()
    files["tls.crt"].write_bytes(full[: len(full) // 2])
    for _ in range(3):
        assert _served_fingerprint(ranker.address) == _fingerprint(renewed.server_cert)
    refused = [line for line in ranker.output().splitlines() if "still serving the certificate" in line]
    assert len(refused) == 1 and " ERROR " in refused[0] and str(files["tls.crt"]) in refused[0]
    # a certificate whose key is not there yet is not served either; both written: served
    files["tls.crt"].write_bytes(full)
    assert _served_fingerprint(ranker.address) == _fingerprint(renewed.server_cert)
    files["tls.key"].write_bytes(Path(later.server_key).read_bytes())
    assert _served_fingerprint(ranker.address) == _fingerprint(later.server_cert)
    assert _token_taken(ranker.address, later.ca, pki, READ_TOKEN) == ACCEPTED


def _colons(hexdigest: str) -> str:
    upper = hexdigest.upper()
    return ":".join(upper[i : i + 2] for i in range(0, len(upper), 2))


# ---------------------------------------------------------------- clients (issue 20, item 11)


def test_only_this_machine_counts_as_local():
    from ctl.security import is_local

    local = [
        "localhost:50052",
        "LOCALHOST:1",
        "localhost",
        "127.0.0.1:50052",
        "127.8.9.10:1",
        "[::1]:50052",
        "::1",
        "unix:/run/ctl.sock",
        "unix:///run/ctl.sock",
        "unix-abstract:ctl",
        "dns:///localhost:1",
        "dns://8.8.8.8/localhost:1",
        "ipv4:127.0.0.1:1,127.0.0.2:2",
        "ipv6:[::1]:1",
        "[::ffff:127.0.0.1]:1",
    ]
    remote = [
        "10.255.255.1:50052",
        "ctl-ranker:50052",
        "ctl-ranker.ctl.svc:50052",
        "[2001:db8::1]:1",
        "0.0.0.0:50052",
        "dns:///ctl-ranker:1",
        "ipv4:127.0.0.1:1,10.0.0.1:2",
        "localhost.example.com:1",
        "127.0.0.1.nip.io:1",
        "xds:///ctl-ranker",
        ":50052",
        "",
    ]
    assert [t for t in local if not is_local(t)] == []
    assert [t for t in remote if is_local(t)] == []


def test_clients_refuse_to_send_a_token_in_plaintext_to_another_machine(tmp_path, pki):
    from ctl.security import SecurityConfigError, client_security
    from ctl_app.cli import build_parser

    remote = "10.255.255.1:50052"  # not routed: a call there would hang until its deadline
    args = build_parser().parse_args(["health", remote, "--token", READ_TOKEN])
    with pytest.raises(SecurityConfigError) as caught:
        client_security(args)  # before any channel exists
    message = str(caught.value)
    assert f"--token would travel in plaintext to {remote}" in message and "--allow-insecure-token" in message
    assert READ_TOKEN not in message
    for allowed in (
        ["health", "localhost:1", "--token", READ_TOKEN],  # this machine
        ["health", remote],  # no token
        ["health", remote, "--token", READ_TOKEN, "--tls-ca", pki.ca],  # TLS
        ["health", remote, "--token", READ_TOKEN, "--allow-insecure-token"],
    ):
        assert client_security(build_parser().parse_args(allowed))[1] == (
            "" if len(allowed) == 2 else READ_TOKEN
        )
    # through the commands: one line, exit 2, nothing sent
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text('{"product_id": "p", "category": "bags", "image": "x.jpg"}\n')
    scene = tmp_path / "scene.jpg"
    scene.write_bytes(b"not read")
    for command in (
        ["health", remote, "--timeout", "60"],
        ["recommend", "--scene", str(scene), "--category", "bags", "--ranker", remote, "--timeout", "60"],
        ["ingest", str(catalog), "--ranker", remote],
    ):
        result = _ctl(*command, env={"CTL_TOKEN": READ_TOKEN})
        output = result.stdout + result.stderr
        assert result.returncode == 2, (command, output)
        assert f"--token would travel in plaintext to {remote}" in output and "Traceback" not in output
        assert READ_TOKEN not in output
    # allowed: it goes, with a warning (and fails here for want of a server)
    allowed = _ctl("health", "127.0.0.1:1", "--timeout", "5", env={"CTL_TOKEN": READ_TOKEN})
    assert allowed.returncode == 1 and "plaintext" not in allowed.stdout + allowed.stderr  # this machine
    for how in ({"CTL_ALLOW_INSECURE_TOKEN": "true"}, {}):
        flags = [] if how else ["--allow-insecure-token"]
        result = _ctl(
            "health", "10.255.255.1:1", "--timeout", "1", *flags, env={"CTL_TOKEN": READ_TOKEN, **how}
        )
        assert result.returncode == 1, result.stdout + result.stderr
        assert (
            "WARNING" in result.stderr
            and "a bearer token goes in plaintext to 10.255.255.1:1" in result.stderr
        )
    bad = _ctl("health", remote, env={"CTL_TOKEN": READ_TOKEN, "CTL_ALLOW_INSECURE_TOKEN": "maybe"})
    assert bad.returncode == 2 and "CTL_ALLOW_INSECURE_TOKEN='maybe': expected true or false" in bad.stdout


def test_the_qdrant_key_in_plaintext_is_warned_of_unless_it_stays_on_this_machine(caplog):
    """A sibling of item 11: the ranker's warning matched URL prefixes, so `http://localhost.example.com`
    passed as loopback."""
    key = "qdrant-key-from-a-secret"
    warned = {}
    local = ("http://localhost:6333", "http://127.0.0.1:6333", "http://[::1]:6333", "https://qdrant:6333")
    remote = ("http://localhost.example.com:6333", "http://127.0.0.1.nip.io:6333", "HTTP://qdrant:6333")
    for url in local + remote:
        caplog.clear()
        with caplog.at_level("WARNING", logger="ranker_service.server"):
            assert qdrant_credentials(RankerConfig(qdrant_url=url, qdrant_api_key=key)) == (key, None)
        warned[url] = any("plaintext" in r.getMessage() for r in caplog.records)
    assert tuple(url for url, w in warned.items() if w) == remote


# ---------------------------------------------------------------- review of issue 20: items 8, 15, 17


@contextlib.contextmanager
def _recording_proxy() -> Iterator[tuple[str, list[str]]]:
    """An HTTP CONNECT proxy on loopback, as `http_proxy` names one: it records each request line, then
    relays the bytes to the loopback port asked for (standing in for a proxy on another machine, which
    would see the same bytes, a plaintext token among them)."""
    seen: list[str] = []

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    class Relay(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                head += chunk
            line, _, _ = head.partition(b"\r\n")
            seen.append(line.decode("latin-1"))
            port = int(line.split()[1].rsplit(b":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as upstream:
                upstream.settimeout(None)
                self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                upstream.sendall(head.partition(b"\r\n\r\n")[2])
                back = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
                back.start()
                pump(self.request, upstream)
                back.join(10)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Relay)
    server.daemon_threads = True
    with _in_thread(server) as port:
        yield f"http://127.0.0.1:{port}", seen


def test_a_plaintext_token_to_this_machine_never_goes_through_a_proxy(monkeypatch):
    """gRPC sends a call to `localhost:PORT` through the proxy of `http_proxy` (or `https_proxy`,
    `grpc_proxy`), which connects to its own localhost: a token judged to stay on this machine crossed the
    network in plaintext. ctl's channels to this machine now go there directly; to another machine the
    token is refused as before (the proxy is named)."""
    from grpc_health.v1 import health as health_aio

    from ctl.security import SecurityConfigError, TokenAuth, Tokens, aio_channel, channel, client_security
    from ctl_app.cli import build_parser

    request = health_pb2.HealthCheckRequest()
    serving = health_pb2.HealthCheckResponse.SERVING
    proxy_variables = ("grpc_proxy", "https_proxy", "http_proxy")  # gRPC reads these (lower case only)
    for name in ("no_proxy", "NO_PROXY", "no_grpc_proxy", *proxy_variables):
        monkeypatch.delenv(name, raising=False)

    def blocking_check(target: str) -> int:
        with channel(target) as chan:
            return (
                health_pb2_grpc.HealthStub(chan)
                .Check(request, timeout=10, metadata=bearer(READ_TOKEN))
                .status
            )

    async def scenario(variable: str, seen: list[str]) -> None:
        auth = TokenAuth({"any": Tokens(READ_TOKEN, "--tokens")}, {}, protect_open=True)
        server = grpc.aio.server(interceptors=[auth])
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.aio.HealthServicer(), server)
        target = f"localhost:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            # gRPC's own channel: through the proxy (so the proxy does take calls, and passes them on)
            async with grpc.aio.insecure_channel(target) as plain:
                reply = await health_pb2_grpc.HealthStub(plain).Check(
                    request, timeout=10, metadata=bearer(READ_TOKEN)
                )
            assert reply.status == serving and seen == [f"CONNECT {target} HTTP/1.1"], (variable, seen)
            async with aio_channel(target, None, READ_TOKEN) as chan:  # ctl ingest, the ranker's encoder
                assert (await health_pb2_grpc.HealthStub(chan).Check(request, timeout=10)).status == serving
            assert await asyncio.to_thread(blocking_check, target) == serving  # ctl recommend, ctl health
            done = await asyncio.to_thread(
                _ctl, "health", target, "--timeout", "10", env={"CTL_TOKEN": READ_TOKEN}
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert len(seen) == 1, (variable, seen)  # nothing more reached the proxy
        finally:
            await server.stop(0)

    for variable in proxy_variables:
        with _recording_proxy() as (proxy, seen), monkeypatch.context() as patched:
            patched.setenv(variable, proxy)
            asyncio.run(scenario(variable, seen))
            # to another machine the token would pass the proxy: refused, unless allowed, as without one
            args = build_parser().parse_args(["health", "10.255.255.1:50052", "--token", READ_TOKEN])
            with pytest.raises(SecurityConfigError, match=f"through the HTTP proxy that {variable} names"):
                client_security(args)
            assert client_security(
                build_parser().parse_args(["health", "localhost:1", "--token", READ_TOKEN])
            )


# Key types and whether gRPC (its C core, ctl's servers and clients) serves them to its own clients.
KEY_TYPES = {
    "RSA": (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), True),
    "ECDSA P-256": (lambda: ec.generate_private_key(ec.SECP256R1()), True),
    "ECDSA P-384": (lambda: ec.generate_private_key(ec.SECP384R1()), True),
    "ECDSA P-521": (lambda: ec.generate_private_key(ec.SECP521R1()), False),  # loaded; clients refuse
    "ECDSA secp256k1": (lambda: ec.generate_private_key(ec.SECP256K1()), False),
    "Ed25519": (ed25519.Ed25519PrivateKey.generate, False),  # loaded; clients refuse
    "Ed448": (ed448.Ed448PrivateKey.generate, False),
    "DSA": (lambda: dsa.generate_private_key(key_size=2048), False),
}


@pytest.fixture(scope="module")
def key_type_certs(tmp_path_factory) -> tuple[str, dict[str, tuple[str, str]]]:
    """(CA, {key type: (certificate, key)}): a server certificate for localhost of each key type in
    KEY_TYPES, signed by one ECDSA P-256 CA."""
    folder = tmp_path_factory.mktemp("key-types")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731

    def issue(subject: str, key, ca: bool = False) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name("key-type CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
            )
        return builder.sign(ca_key, hashes.SHA256())

    ca = folder / "ca.pem"
    ca.write_bytes(issue("key-type CA", ca_key, ca=True).public_bytes(serialization.Encoding.PEM))
    certs = {}
    for i, (kind, (make, _)) in enumerate(KEY_TYPES.items()):
        key = make()
        cert, key_file = folder / f"{i}.crt", folder / f"{i}.key"
        cert.write_bytes(issue("localhost", key).public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        certs[kind] = (str(cert), str(key_file))
    return str(ca), certs


def _grpc_handshake(ca: str, server: tuple[str, str], client: tuple[str, str] | None = None) -> str:
    """What gRPC itself does with these files (a server's certificate and key; a client's, for mutual
    TLS): "ok" when a gRPC client's call went through, else where it failed. Independent of ctl: the
    truth ctl's check is held to."""
    from concurrent import futures

    from grpc_health.v1 import health

    read = lambda pair: (Path(pair[1]).read_bytes(), Path(pair[0]).read_bytes())  # noqa: E731 (key, chain)
    root = Path(ca).read_bytes()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), grpc_server)
    try:
        credentials = grpc.ssl_server_credentials(
            [read(server)], root_certificates=root if client else None, require_client_auth=bool(client)
        )
        try:
            port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
        except RuntimeError:
            return "server cannot bind"
        grpc_server.start()
        key, chain = read(client) if client else (None, None)
        creds = grpc.ssl_channel_credentials(root, private_key=key, certificate_chain=chain)
        with grpc.secure_channel(f"localhost:{port}", creds) as chan:
            stub = health_pb2_grpc.HealthStub(chan)
            code = _code(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=10))
        return "ok" if code is None else f"call: {code.name}"
    finally:
        grpc_server.stop(None)


def test_a_tls_key_of_a_type_grpc_cannot_use_is_refused(key_type_certs):
    """The ssl module loads DSA, Ed448, Ed25519 and any curve; gRPC fails to bind with some (at start:
    "the address is in use"), and serves others (P-521, Ed25519) that its clients cannot verify; the same
    types fail as client certificates. ctl takes what gRPC takes, on both sides, and names the rest;
    each verdict is checked against gRPC itself."""
    from ctl.security import SecurityConfigError, channel_credentials, server_credentials

    ca, certs = key_type_certs
    for kind, (_, usable) in KEY_TYPES.items():
        cert, key = certs[kind]
        as_server = _grpc_handshake(ca, (cert, key))
        as_client = _grpc_handshake(ca, certs["ECDSA P-256"], (cert, key))
        assert (as_server == "ok", as_client == "ok") == (usable, usable), (kind, as_server, as_client)
        if usable:
            assert server_credentials(cert, key) is not None
            assert channel_credentials(ca, cert, key) is not None
            continue
        for make, what in ((server_credentials, "certificate"), (channel_credentials, "client certificate")):
            with pytest.raises(SecurityConfigError) as caught:
                make(*((cert, key) if make is server_credentials else (ca, cert, key)))
            message = str(caught.value)
            assert f"the {what} {cert} has a key of type {kind}, which gRPC cannot use" in message, message
            assert "RSA, ECDSA P-256 or ECDSA P-384" in message


def test_a_server_with_a_tls_key_grpc_cannot_serve_stops_at_start_naming_it(key_type_certs, tmp_path):
    _, certs = key_type_certs
    cert, key = certs["DSA"]
    code, output = _refused_at_start(
        "serve-ranker", "--encoder", "localhost:1", "--store-path", str(tmp_path / "store"), "--port", "0",
        "--metrics-port", "-1", "--tls-cert", cert, "--tls-key", key,
    )  # fmt: skip
    assert code == 2 and f"the certificate {cert} has a key of type DSA" in output, output
    assert "address is in use" not in output and "Traceback" not in output


def test_a_renewed_certificate_of_a_type_grpc_cannot_serve_is_not_served(
    reloading_ranker, pki, key_type_certs
):
    """Before: "serving ... again, changed" was logged while gRPC kept the old certificate (DSA), or gRPC
    served one that no gRPC client accepts (Ed25519)."""
    ranker, files = reloading_ranker
    _, certs = key_type_certs
    for kind in ("DSA", "Ed25519"):
        cert, key = certs[kind]
        _atomic_write(files["tls.key"], Path(key).read_bytes())
        _atomic_write(files["tls.crt"], Path(cert).read_bytes())
        assert _served_fingerprint(ranker.address) == _fingerprint(pki.server_cert), kind
        assert _token_taken(ranker.address, pki.ca, pki, READ_TOKEN) == ACCEPTED, kind
        _eventually(
            lambda k=kind: f"has a key of type {k}" in ranker.output() or "again, changed" in ranker.output(),
            f"the {kind} certificate is logged",
        )
        assert "again, changed" not in ranker.output(), kind
    refused = [line for line in ranker.output().splitlines() if "which gRPC cannot use" in line]
    assert all(" ERROR " in line and "still serving the certificate read before" in line for line in refused)


def test_a_token_is_printable_ascii_and_a_bom_opening_its_file_is_dropped(tmp_path, exported_repo):
    """A token file saved with a BOM (Windows editors) held a token no client could send: gRPC metadata
    is ASCII. The BOM is dropped; any other character outside printable ASCII stops the server (exit 2)
    naming the setting and the line, never the token."""
    from ctl.security import SecurityConfigError, parse_token, parse_tokens

    good = "a" * 20
    bom = tmp_path / "bom"
    bom.write_text(f"\ufeff{READ_TOKEN}\n# the next reader\n{good}\n", encoding="utf-8")
    assert parse_tokens(f"@{bom}", "--tokens") == (READ_TOKEN, good)
    client_bom = tmp_path / "client-bom"
    client_bom.write_text(f"\ufeff{READ_TOKEN}\n", encoding="utf-8")
    assert parse_token(f"@{client_bom}", "--token") == READ_TOKEN

    async def call() -> grpc.StatusCode | None:
        server, client = _bearer_server(tmp_path, f"@{bom}", f"@{client_bom}")
        await server.start()
        try:
            await health_pb2_grpc.HealthStub(client).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return None
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        finally:
            await client.close()
            await server.stop(0)

    assert asyncio.run(call()) is None  # the token of a file with a BOM is sent and taken
    later_bom = tmp_path / "later-bom"
    later_bom.write_text(f"{good}\n\ufeff{READ_TOKEN}\n", encoding="utf-8")
    accented = tmp_path / "accented"
    accented.write_text(f"{good}\u00e9\n", encoding="utf-8")
    cases = {
        f"@{later_bom}": f"line 2 of {later_bom} contains U+FEFF, which is not printable ASCII",
        f"@{accented}": f"line 1 of {accented} contains U+00E9, which is not printable ASCII",
        f"{good},{good}\x7f": "token 2 contains U+007F, which is not printable ASCII",
        f"{good}\x00": "token 1 contains U+0000",
    }
    for setting, expected in cases.items():
        for foreign in (False, True):  # Qdrant's key travels in a header too
            with pytest.raises(SecurityConfigError) as caught:
                parse_tokens(setting, "--tokens", foreign=foreign)
            assert expected in str(caught.value) and good not in str(caught.value), (setting, caught.value)
    code, output = _refused_at_start(
        "serve-encoder", "--model-repo", str(exported_repo), "--port", "0", "--metrics-port", "-1",
        env={"CTL_ENCODER_TOKENS": f"@{accented}"},
    )  # fmt: skip
    assert code == 2 and f"--tokens / CTL_ENCODER_TOKENS: line 1 of {accented} contains U+00E9" in output
    assert good not in output and "Traceback" not in output
