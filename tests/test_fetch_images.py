"""`ctl fetch-images` against a real HTTP server on loopback that misbehaves on purpose, one way per
signature (the part before its first `-`): missing, gone, failing once, always down, slow, truncated, an
HTML page, redirected, reset, too large, a crafted signature. Then a resumed run, and a run stopped with
SIGINT in a subprocess and run again."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from ctl_app import fetch_images as fi
from tests.servers import REPO

HANG_GUARD = 60.0  # seconds; only a hang guard, never reached by a working run
MAX_BYTES = 20_000  # --max-image-bytes in these tests: the good images are ~1 KB
MAX_PIXELS = 500_000


def jpeg(signature: str, size: tuple[int, int] = (32, 24)) -> bytes:
    colour = tuple(hashlib.sha256(signature.encode()).digest()[:3])
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG")
    return out.getvalue()


def noise_jpeg(side: int) -> bytes:
    pixels = hashlib.shake_256(b"noise").digest(side * side * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def huge_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (1000, 1000), (9, 9, 9)).save(out, "PNG")  # 1 M pixels in a few KB
    return out.getvalue()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a CDN serves
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall between
    server: ImageServer

    def log_message(self, *args) -> None:
        pass

    def send(self, status: int, body: bytes, content_type: str = "image/jpeg", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/img/"):  # where redirects lead
            return self.send(200, jpeg(self.path))
        signature = self.path.removeprefix("/").removesuffix(".jpg")
        kind = signature.split("-")[0]
        with self.server.lock:
            self.server.requests[signature] += 1
            n = self.server.requests[signature]
        try:
            self.server.serve(self, kind, signature, n)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.requests: Counter = Counter()
        self.release = threading.Event()  # set at teardown: stalled handlers end
        self.hanging = True  # `hang-*`: half a body, then nothing until this is False
        self.streamed_all = False
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def template(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{{s}}.jpg"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up (timeouts, too large): what these tests cause on purpose

    def stall(self) -> None:
        self.release.wait(HANG_GUARD)

    def serve(self, h: Handler, kind: str, signature: str, n: int) -> None:
        image = jpeg(signature)
        if kind == "missing":
            h.send(404, b"<html>not found</html>", "text/html")
        elif kind == "gone":
            h.send(410, b"gone", "text/plain")
        elif kind == "flaky" and n == 1:
            h.send(500, b"oops", "text/plain")
        elif kind == "busy" and n == 1:
            h.send(429, b"slow down", "text/plain", Retry_After="0")
        elif kind == "down":
            h.send(503, b"down", "text/plain", Retry_After="0")
        elif kind == "forbidden":
            h.send(403, b"no", "text/plain")
        elif kind == "html":
            h.send(200, b"<!DOCTYPE html><html><body>Access denied</body></html>", "text/html")
        elif kind == "moved":
            h.send(302, b"", "text/plain", Location=f"/img/{signature}")
        elif kind == "loop":
            h.send(302, b"", "text/plain", Location=h.path)
        elif kind == "truncated":
            h.send_response(200)
            h.send_header("Content-Length", str(len(image) + 5000))
            h.end_headers()
            h.wfile.write(image[:100])
            h.close_connection = True
        elif kind == "reset":  # RST instead of an answer
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
        elif kind == "big":
            h.send(200, noise_jpeg(200))  # ~35 KB with its Content-Length
        elif kind == "endless":  # no Content-Length: the body ends when the connection does
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
            h.close_connection = True
            h.wfile.write(image)
            for _ in range(1024):
                h.wfile.write(bytes(64 << 10))  # 64 MiB in all, unless the client stops reading
            self.streamed_all = True
        elif kind == "huge":
            h.send(200, huge_png(), "image/png")
        elif kind == "stuck" or (kind == "slow" and n == 1):
            self.stall()
        elif kind == "hang" and self.hanging:
            h.send_response(200)
            h.send_header("Content-Length", str(len(image)))
            h.end_headers()
            h.wfile.write(image[: len(image) // 2])
            h.wfile.flush()
            self.stall()
        else:
            h.send(200, image)

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def server() -> Iterator[ImageServer]:
    s = ImageServer()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch) -> None:
    """httpx honours *_PROXY variables: a loopback test must not go through one."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctl")
    fi.add_parser(p.add_subparsers(dest="command", required=True))
    return p


def run(*args: str) -> int:
    parsed = parser().parse_args(["fetch-images", *args])
    return parsed.func(parsed)


def stl_folder(root: Path, products: list[str], scenes: int | None = None) -> Path:
    """An STL folder: one pair per product, each in a scene of its own (scene-0...), all of one category,
    so that the images needed are exactly the scenes and the products."""
    root.mkdir(exist_ok=True)
    lines = [
        json.dumps({"product": p, "scene": f"scene-{i}", "bbox": [0.8, 0.8, 0.9, 0.9]})
        for i, p in enumerate(products)
    ]
    (root / "fashion.json").write_text("\n".join(lines) + "\n")
    (root / "fashion-cat.json").write_text(json.dumps(dict.fromkeys(products, "Apparel|Shoes")))
    return root


def report(root: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in (root / fi.REPORT).read_text().splitlines()]
    by_signature = {r["signature"]: r for r in lines}
    assert len(by_signature) == len(lines), "one line per signature"
    return by_signature


def files(root: Path) -> set[str]:
    return {p.name for p in (root / "images").iterdir()}


PRODUCTS = [
    "good-1",
    "good-2",
    "missing-1",
    "gone-1",
    "forbidden-1",
    "flaky-1",
    "busy-1",
    "down-1",
    "html-1",
    "moved-1",
    "loop-1",
    "truncated-1",
    "reset-1",
    "big-1",
    "endless-1",
    "huge-1",
    "../../x",
    "evil/../../y",
]
EXPECTED = {
    "good-1": ("downloaded", 1),
    "good-2": ("downloaded", 1),
    "missing-1": ("not_found", 1),
    "gone-1": ("not_found", 1),
    "forbidden-1": ("http_error", 1),
    "flaky-1": ("downloaded", 2),
    "busy-1": ("downloaded", 2),
    "down-1": ("http_error", 3),  # --retries 2
    "html-1": ("not_an_image", 1),
    "moved-1": ("downloaded", 1),
    "loop-1": ("too_many_redirects", 1),
    "truncated-1": ("connection_error", 3),
    "reset-1": ("connection_error", 3),
    "big-1": ("too_large", 1),
    "endless-1": ("too_large", 1),
    "huge-1": ("too_large", 1),
    "../../x": ("invalid_signature", 0),
    "evil/../../y": ("invalid_signature", 0),
}


def test_every_failure_has_its_outcome_and_a_rerun_fetches_only_what_is_missing(server, tmp_path, capsys):
    root = stl_folder(tmp_path / "stl", PRODUCTS)
    flags = [
        *("--data", str(root), "--url-template", server.template, "--retries", "2", "--backoff", "0.01"),
        *("--timeout", str(HANG_GUARD), "--rate", "0", "--concurrency", "4"),
        *("--max-image-bytes", str(MAX_BYTES), "--max-image-pixels", str(MAX_PIXELS)),
    ]
    assert run(*flags) == 1
    lines = report(root)
    scenes = {f"scene-{i}" for i in range(len(PRODUCTS))}
    assert set(lines) == scenes | set(PRODUCTS)
    for scene in scenes:
        assert lines[scene]["outcome"] == "downloaded"
        assert lines[scene]["bytes"] == len(jpeg(scene))
    got = {s: (lines[s]["outcome"], lines[s]["attempts"]) for s in PRODUCTS}
    assert got == EXPECTED
    assert "HTTP 503" in lines["down-1"]["reason"]
    assert "markup" in lines["html-1"]["reason"]
    assert "stopped reading" in lines["endless-1"]["reason"]
    assert not server.streamed_all, "the client stopped reading the endless body"
    assert "pixels" in lines["huge-1"]["reason"]
    assert lines["../../x"]["url"] is None
    assert set(server.requests) <= {s for s in lines if fi.SIGNATURE.fullmatch(s)}

    # only complete images, nothing temporary, nothing outside DIR/images
    good = {s for s, (outcome, _) in got.items() if outcome == "downloaded"} | scenes
    assert files(root) == {f"{s}.jpg" for s in good}
    for s in good:
        Image.open(root / "images" / f"{s}.jpg").verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stl"]
    assert sorted(p.name for p in root.iterdir()) == ["fashion-cat.json", "fashion.json", fi.REPORT, "images"]
    out = capsys.readouterr().out
    assert "downloaded" in out and "not_found                   2" in out

    # resumed: what is there is not asked for again; what failed is tried again
    before = server.requests.copy()
    assert run(*flags) == 1
    lines = report(root)
    assert {s for s, r in lines.items() if r["outcome"] == "present"} == good
    assert all(server.requests[s] == before[s] for s in good)
    assert server.requests["missing-1"] == before["missing-1"] + 1
    assert files(root) == {f"{s}.jpg" for s in good}


def test_a_file_that_is_not_a_valid_image_is_fetched_again(server, tmp_path):
    root = tmp_path
    (root / "images").mkdir()
    (root / "images" / "good-1.jpg").write_bytes(jpeg("good-1")[:200])  # cut short (a crash, another tool)
    (root / "images" / "good-2.jpg").write_bytes(jpeg("good-2"))
    (root / "images" / ".good-3.0123abcd.part").write_bytes(b"left by a run killed outright")
    (root / "images" / ".keep").write_bytes(b"")
    (root / "list.txt").write_text("# the images\ngood-1\n\ngood-2\ngood-1\n")
    assert run("--data", str(root), "--list", str(root / "list.txt"), "--url-template", server.template) == 0
    lines = report(root)
    assert {s: r["outcome"] for s, r in lines.items()} == {"good-1": "downloaded", "good-2": "present"}
    assert (root / "images" / "good-1.jpg").read_bytes() == jpeg("good-1")
    assert server.requests == Counter({"good-1": 1})
    assert files(root) == {"good-1.jpg", "good-2.jpg", ".keep"}


def test_one_run_at_a_time_in_a_folder(server, tmp_path):
    import fcntl

    (tmp_path / "list.txt").write_text("good-1\n")
    with open(tmp_path / fi.REPORT, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        listed = ("--list", str(tmp_path / "list.txt"), "--url-template", server.template)
        assert run("--data", str(tmp_path), *listed) == 2
    assert not server.requests


def test_a_report_that_is_a_link_is_refused_and_its_target_untouched(server, tmp_path, caplog):
    """A planted fetch-report.jsonl link was opened through: the run emptied the file it points at."""
    victim = tmp_path / "precious.txt"
    victim.write_text("precious\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / fi.REPORT).symlink_to(victim)
    (tmp_path / "list.txt").write_text("good-1\n")
    listed = ("--list", str(tmp_path / "list.txt"), "--url-template", server.template)
    assert run("--data", str(data), *listed) == 2
    assert any("symbolic link" in r.getMessage() for r in caplog.records)
    assert victim.read_text() == "precious\n" and not server.requests


def test_timeouts_are_retried_and_then_given_up(server, tmp_path):
    (tmp_path / "list.txt").write_text("slow-1\nstuck-1\ngood-1\n")
    code = run(
        *("--data", str(tmp_path), "--list", str(tmp_path / "list.txt"), "--url-template", server.template),
        *("--timeout", "0.5", "--retries", "3", "--backoff", "0.01"),
    )
    assert code == 1
    lines = report(tmp_path)
    assert lines["slow-1"]["outcome"] == "downloaded"
    assert lines["slow-1"]["attempts"] >= 2
    assert (lines["stuck-1"]["outcome"], lines["stuck-1"]["attempts"]) == ("timeout", 4)
    assert server.requests["stuck-1"] == 4
    assert files(tmp_path) == {"slow-1.jpg", "good-1.jpg"}


def test_a_run_stopped_with_sigint_leaves_no_partial_file_and_a_rerun_completes(server, tmp_path):
    names = [f"good-{i}" for i in range(6)] + ["hang-1", "hang-2"] + [f"good-{i}" for i in range(6, 10)]
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    args = [
        *("fetch-images", "--data", str(tmp_path), "--list", str(tmp_path / "list.txt")),
        *("--url-template", server.template, "--concurrency", "2", "--timeout", str(HANG_GUARD)),
    ]
    script = (
        "import argparse, sys\n"
        "from ctl_app.fetch_images import add_parser\n"
        "p = argparse.ArgumentParser(); add_parser(p.add_subparsers())\n"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not (server.requests["hang-1"] and server.requests["hang-2"]):  # both downloads half-way
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=HANG_GUARD)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "run the same command again to continue" in out
    assert files(tmp_path) == {f"good-{i}.jpg" for i in range(6)}  # no partial hang-*, no temporary file
    assert {r["outcome"] for r in report(tmp_path).values()} == {"downloaded"}

    server.hanging = False
    assert run(*args[1:]) == 0
    lines = report(tmp_path)
    assert {s for s, r in lines.items() if r["outcome"] == "present"} == {f"good-{i}" for i in range(6)}
    assert files(tmp_path) == {f"{s}.jpg" for s in names}


@pytest.mark.parametrize(
    "template",
    [
        "http://h/{x}.jpg",
        "http://h/{s.__class__}.jpg",
        "http://h/{s[0]}.jpg",
        "http://h/{s!r}.jpg",
        "http://h/{s:>40}.jpg",
        "http://h/{}.jpg",
        "http://h/{s.jpg",
        "http://h/image.jpg",
        "ftp://h/{s}.jpg",
        "{s}.jpg",
    ],
)
def test_a_template_with_other_fields_is_refused(template, tmp_path, capsys):
    (tmp_path / "list.txt").write_text("abc\n")
    assert run("--data", str(tmp_path), "--list", str(tmp_path / "list.txt"), "--url-template", template) == 2
    assert not (tmp_path / "images").exists()


def test_the_default_template_is_shop_the_looks():
    url = fi.url_maker(fi.DEFAULT_URL_TEMPLATE)
    sig = "6ed662b9d79db0760e933a75de3d9558"
    assert url(sig) == f"http://i.pinimg.com/400x/6e/d6/62/{sig}.jpg"
    assert fi.url_maker("https://m/{s[-2:]}/{{x}}/{s[:1]}{s}")("abcd") == "https://m/cd/{x}/aabcd"


def test_retry_after():
    assert fi.retry_after("3") == 3.0
    assert fi.retry_after("86400") == fi.MAX_RETRY_AFTER
    assert fi.retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert fi.retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert fi.retry_after(None) is None
    assert fi.retry_after("soon") is None
    assert fi.retry_after("-1") is None


def test_bad_arguments_exit_2(tmp_path):
    for bad in (["--concurrency", "0"], ["--rate", "nan"], ["--timeout", "0"], ["--retries", "1_0"]):
        with pytest.raises(SystemExit) as stopped:
            run("--data", str(tmp_path), *bad)
        assert stopped.value.code == 2
    assert run("--data", str(tmp_path / "absent"), "--list", str(tmp_path / "none.txt")) == 2
    assert run("--data", str(tmp_path)) == 2  # no fashion.json: not an STL folder


def test_limits_are_the_encoders():
    from encoder_service.config import EncoderConfig

    config = EncoderConfig()
    assert (fi.FetchConfig.max_image_bytes, fi.FetchConfig.max_image_pixels) == (
        config.max_image_bytes,
        config.max_image_pixels,
    )
