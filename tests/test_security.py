"""TLS, mutual TLS and scoped tokens, with real `ctl serve-encoder` and `ctl serve-ranker` processes.

The ranker reaches the encoder over TLS with a token of its own; callers reach the ranker over mutual TLS
with read or write tokens. Certificates are made for the test (tests/certs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctl.security import bearer, channel_credentials
from ctl.v1 import encoder_pb2, encoder_pb2_grpc, ranker_pb2, ranker_pb2_grpc
from ranker_service.config import RankerConfig
from ranker_service.encoder_client import ModelInfo
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
        [sys.executable, "-m", "ctl.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
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
    denied = _ctl("ingest", str(catalog), "--ranker", ranker.address, *tls, env={"CTL_TOKEN": READ_TOKEN})
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stdout + denied.stderr
    done = _ctl(
        "ingest", str(catalog), "--ranker", ranker.address, "--fresh", *tls, env={"CTL_TOKEN": WRITE_TOKEN}
    )
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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_the_qdrant_connection_verifies_tls_with_the_given_ca_and_sends_the_api_key(pki, tmp_path):
    key_file = tmp_path / "qdrant-api-key"
    key_file.write_text("qdrant-key-from-a-secret\n")
    info = ModelInfo("v1", input_size=64, grid=2, regions=4, dim=32, backend="test", max_batch_images=32)

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
