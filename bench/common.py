"""What the benchmarks share: synthetic embeddings, latency statistics, process memory, markdown tables.

Benchmarks print numbers; nothing here passes or fails on timing.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctl.tensors import Scene


def machine() -> str:
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class Catalog:
    """N products over `categories` categories: ids, category names, unit style vectors and attention keys."""

    ids: list[str]
    categories: np.ndarray  # [N] category index
    names: list[str]
    styles: np.ndarray  # [N, D]
    keys: np.ndarray  # [N, D]

    def of(self, category: int) -> np.ndarray:
        return np.flatnonzero(self.categories == category)


def synthetic_catalog(n: int, dim: int, categories: int = 10, clusters: int = 64, seed: int = 0) -> Catalog:
    """Clustered unit vectors (styles around `clusters` centres, keys around 8): closer to real embeddings
    than uniform noise, where every candidate is equally far."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, dim)))
    key_centres = _unit(rng.standard_normal((8, dim)))
    styles = _unit(
        centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)) / np.sqrt(dim) * 4
    )
    keys = _unit(key_centres[rng.integers(0, 8, n)] + 0.5 * rng.standard_normal((n, dim)) / np.sqrt(dim) * 4)
    cats = np.arange(n) % categories
    names = [f"category-{c:02d}" for c in range(categories)]
    return Catalog([f"p{i:07d}" for i in range(n)], cats, names, styles, keys)


def synthetic_scenes(q: int, dim: int, regions: int, seed: int = 1) -> list[Scene]:
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(q):
        g = _unit(rng.standard_normal(dim))
        local = _unit(g[None, :] + 1.2 * rng.standard_normal((regions, dim)) / np.sqrt(dim) * 4)
        attention = _unit(rng.standard_normal((regions, dim)))
        scenes.append(Scene(g, local, attention))
    return scenes


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def rss_mib(pid: int | None = None) -> tuple[float, float]:
    """(resident, peak resident) memory of a process in MiB, from /proc."""
    fields = {}
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table (floats with 2 decimals unless given as text)."""

    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def start_ctl(*args: str, log_path: str, timeout: float = 120) -> tuple[object, int]:
    """`ctl ARGS` as a subprocess (a server with --port 0): the process and the port it logged."""
    import re
    import subprocess
    import sys

    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctl_app.cli", *args], stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"listening on port (\d+)", Path(log_path).read_text())
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"ctl {' '.join(args)} exited:\n{Path(log_path).read_text()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"ctl {' '.join(args)}: no port after {timeout} s")


def wait_serving(address: str, timeout: float = 300) -> None:
    """Until the server's gRPC health says SERVING (it opens its port before its model or store)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        while time.monotonic() < deadline:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {timeout} s")


def serve_encoder(model_repo: Path, work: Path, *flags: str) -> tuple[object, str]:
    """`ctl serve-encoder` (in-process backend, more `flags` if given) on a free loopback port, SERVING:
    (process, address)."""
    proc, port = start_ctl(
        "serve-encoder",
        "--model-repo",
        str(model_repo),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        *flags,
        log_path=str(work / "encoder.log"),
    )
    wait_serving(f"127.0.0.1:{port}")
    return proc, f"127.0.0.1:{port}"


def serve_ranker(encoder: str, store_path: str, work: Path) -> tuple[object, str]:
    """`ctl serve-ranker` on the embedded store at `store_path` ({model_version} replaced), SERVING."""
    proc, port = start_ctl(
        "serve-ranker",
        "--encoder",
        encoder,
        "--store-path",
        store_path,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        log_path=str(work / "ranker.log"),
    )
    wait_serving(f"127.0.0.1:{port}")
    return proc, f"127.0.0.1:{port}"
