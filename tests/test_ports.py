"""A port that cannot be listened on stops `ctl serve-*` with exit status 1 and one line naming the address
and the setting (issue 14 review): the gRPC and health ports printed grpc's 20-line traceback
(`RuntimeError: Failed to bind to address ...`), and the metrics port said only `[Errno 98] Address already
in use`. Real processes; the port is held by a socket of the test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


@contextmanager
def _held_port(*, reuse_port: bool = False) -> Iterator[int]:
    """A port on HOST that a socket of this process listens on (with SO_REUSEPORT if asked: another socket
    that sets it too may then bind the same port, unless it does not)."""
    with socket.socket() as held:
        if reuse_port:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((HOST, 0))
        held.listen()
        yield held.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _ctl(*args: str) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CTL_")}
    done = subprocess.run(
        [sys.executable, "-m", "ctl_app.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "CTL_OFFLINE": "1"},
        check=False,
    )
    return done.returncode, (done.stderr + done.stdout).strip()


def _ranker(tmp_path: Path, **flags: int) -> tuple[int, str]:
    settings = {"port": 0, "metrics_port": -1, **flags}
    args = [part for name, value in settings.items() for part in (f"--{name.replace('_', '-')}", str(value))]
    return _ctl(
        "serve-ranker", "--host", HOST, "--encoder", "127.0.0.1:9", "--startup-timeout-s", "1",
        "--store-path", str(tmp_path / "store"), *args,
    )  # fmt: skip


def _encoder(tmp_path: Path, **flags: int) -> tuple[int, str]:
    settings = {"port": 0, "metrics_port": -1, **flags}
    args = [part for name, value in settings.items() for part in (f"--{name.replace('_', '-')}", str(value))]
    return _ctl("serve-encoder", "--host", HOST, "--model-repo", str(tmp_path / "no-models"), *args)


SERVICES = {"ranker": (_ranker, "CTL_RANKER_"), "encoder": (_encoder, "CTL_ENCODER_")}


@pytest.mark.parametrize("service", sorted(SERVICES))
@pytest.mark.parametrize("setting", ["port", "health_port", "metrics_port"])
def test_a_port_in_use_stops_the_service_with_one_line_naming_address_and_setting(tmp_path, service, setting):
    start, prefix = SERVICES[service]
    with _held_port() as port:
        status, output = start(tmp_path, **{setting: port})
    assert status == 1, output
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    flag, variable = "--" + setting.replace("_", "-"), prefix + setting.upper()
    assert f"cannot listen on {HOST}:{port} ({flag} / {variable})" in output, output


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_the_health_port_is_not_shared_with_another_listener(tmp_path, service):
    """The gRPC port was bound without SO_REUSEPORT, the health port with grpc's default (on): a second
    server, or any socket that set SO_REUSEPORT, shared the health port, and probes reached either."""
    start, _ = SERVICES[service]
    with _held_port(reuse_port=True) as port:
        status, output = start(tmp_path, health_port=port)
    assert status == 1 and f"cannot listen on {HOST}:{port}" in output, output


def test_an_address_that_cannot_be_listened_on_is_named_too(tmp_path):
    """Not in use, but not this machine's: the same one line (grpc says nothing more precise)."""
    status, output = _ctl(
        "serve-ranker", "--host", "192.0.2.1", "--port", str(_free_port()), "--metrics-port", "-1",
        "--encoder", "127.0.0.1:9", "--startup-timeout-s", "1", "--store-path", str(tmp_path / "s"),
    )  # fmt: skip
    assert status == 1 and len(output.splitlines()) == 1, output
    assert "cannot listen on 192.0.2.1:" in output and "(--port / CTL_RANKER_PORT)" in output, output


# ---------------------------------------------------------------- in process: build_server and the ranker


def _build(address: str, health_address: str | None = None):
    from ctl import serving

    return serving.build_server(
        service_names=("ctl.v1.TestService",),
        add_servicers=lambda server: None,
        address=address,
        metrics=serving.Metrics("ctl.v1.TestService"),
        max_message_bytes=1024,
        health_address=health_address,
    )


def test_when_only_grpc_can_tell_its_failure_is_a_listen_error_too(monkeypatch):
    """The check before grpc binds may be unsure (or raced): grpc's RuntimeError becomes the same error."""
    import asyncio

    from ctl import serving

    monkeypatch.setattr(serving, "_cannot_bind", lambda address: None)

    async def build(port: int):
        return _build(f"{HOST}:{port}")

    with _held_port() as port, pytest.raises(serving.ListenError) as caught:
        asyncio.run(build(port))
    assert (caught.value.address, caught.value.setting) == (f"{HOST}:{port}", "port")
    assert isinstance(caught.value, OSError) and isinstance(caught.value.__cause__, RuntimeError)
    assert caught.value.naming("--port / CTL_X_PORT") == (
        f"cannot listen on {HOST}:{port} (--port / CTL_X_PORT): the address is in use or not available"
    )


def test_the_ranker_listens_on_an_ipv6_host_written_without_brackets(tmp_path):
    """`--host ::1` made the address ':::…' (grpc: 'Misformatted domain name'): the ranker never started."""
    import asyncio

    from ranker_service.config import RankerConfig
    from ranker_service.server import Ranker

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")

    async def listen() -> int:
        config = RankerConfig(host="::1", port=0, health_port=0, metrics_port=-1, store_path=str(tmp_path))
        ranker = Ranker(config)
        try:
            await ranker.server.start()
            return ranker.port
        finally:
            await ranker.stop(grace=0)

    assert asyncio.run(listen()) > 0
