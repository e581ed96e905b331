"""TLS, mutual TLS and scoped tokens, with real `ctl serve-encoder` and `ctl serve-ranker` processes.

The ranker reaches the encoder over TLS with a token of its own; callers reach the ranker over mutual TLS
with read or write tokens. Certificates are made for the test (tests/certs.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctl.security import bearer, channel_credentials
from ctl.v1 import encoder_pb2, encoder_pb2_grpc, ranker_pb2, ranker_pb2_grpc
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
