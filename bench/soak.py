"""Soak: overload, short deadlines and clients that go away, then a recovery phase that must be clean.

    python -m bench.soak --seconds 60 --model-repo runs/bench-small/repo

A real encoder (in-process TorchScript backend) and ranker (embedded store holding `--products` products
of precomputed embeddings) run as subprocesses on loopback; they are `ctl serve-encoder`/`serve-ranker`
(same config, the same `Service.run`), launched through `python -m bench.soak serve ...` only so that their
/metrics also say how many asyncio tasks they hold. Then, for `--seconds` in all:

1. soak (60% of the time): `--clients` clients call EncodeScene (encoder) and Recommend with a scene image
   (ranker, which calls the encoder) back to back: most with short deadlines (they time out while queued
   or in a pass), some cancelled mid-call or dropped with their whole channel, some ordinary;
2. burst: `--burst` times the encoder's `--max-queue` in images, all at once (EncodeScene, EncodeProducts
   of 8 images, Recommend; half of them with short deadlines); a probe client sends ordinary calls one
   after another from the moment the burst is sent;
3. recovery (the rest, at least `--min-recovery-calls` calls): ordinary calls only (30 s deadline).

Prints calls and errors by status code per phase, the recovery time (from the burst being sent to the
first probe call after which every probe call succeeded), the servers' resident memory (sampled every
0.5 s) and asyncio tasks at start and end, and the encoder's queue gauges at the end. Exit status 1 when
an ordinary call of the recovery phase failed, the probe never recovered (no success in
`--probe-attempts` calls after the burst was answered), a queue gauge did not return to 0, or a server
ended with more than `--task-slack` asyncio tasks above its start (a leak). Nothing passes or fails on
speed: phase lengths are times, the verdict only counts outcomes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import random
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from bench.common import machine, percentiles, rss_mib, synthetic_catalog, table, wait_serving
from bench.load import build_store
from bench.recommend import model_of
from ctl.encoder_contract import MODEL_INFO_FILE
from ctl.v1 import encoder_pb2, encoder_pb2_grpc, ranker_pb2, ranker_pb2_grpc

ORDINARY_S = 30.0  # an ordinary call's deadline
METHODS = {"scene": "EncodeScene", "products": "EncodeProducts", "recommend": "Recommend"}
TASKS_GAUGE = "bench_asyncio_tasks"
QUEUE_GAUGE = "ctl_encoder_queue_images"
log = logging.getLogger("bench.soak")


# ---------------------------------------------------------------- the servers (subprocesses)


def _count_tasks(loop: asyncio.AbstractEventLoop) -> float:
    """The asyncio tasks of the server's loop, counted on that loop (called from the /metrics thread)."""

    async def count() -> int:
        return len(asyncio.all_tasks()) - 1  # not this one

    try:
        return float(asyncio.run_coroutine_threadsafe(count(), loop).result(5))
    except Exception:  # a loop too busy to answer in 5 s: no sample rather than a broken /metrics
        return float("nan")


def _add_task_gauge(registry) -> None:
    from prometheus_client import Gauge

    loop = asyncio.get_running_loop()
    gauge = Gauge(TASKS_GAUGE, "asyncio tasks of the server's event loop", registry=registry)
    gauge.set_function(lambda: _count_tasks(loop))


async def _serve_encoder(config) -> None:
    """`ctl serve-encoder`'s life (ctl.lifecycle), with the task gauge added to its metrics."""
    from encoder_service.server import Encoder

    encoder = Encoder(config)
    _add_task_gauge(encoder.metrics.registry)
    await encoder.run()


async def _serve_ranker(config) -> None:
    """`ctl serve-ranker`'s life (ctl.lifecycle), with the task gauge added to its metrics."""
    from ranker_service.server import Ranker

    ranker = Ranker(config)
    _add_task_gauge(ranker.metrics.registry)
    await ranker.run()


def serve_main(argv: list[str]) -> None:
    """`python -m bench.soak serve encoder|ranker FLAGS`: the service as `ctl serve-*` runs it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    which, flags = argv[0], argv[1:]
    if which == "encoder":
        from encoder_service.config import add_arguments, from_args

        parser = argparse.ArgumentParser(prog="serve encoder")
        add_arguments(parser)
        asyncio.run(_serve_encoder(from_args(parser.parse_args(flags))))
    else:
        from ranker_service.config import add_arguments, from_args

        parser = argparse.ArgumentParser(prog="serve ranker")
        add_arguments(parser)
        asyncio.run(_serve_ranker(from_args(parser.parse_args(flags))))


class Service:
    """A server subprocess: its gRPC address, its /metrics port, its pid."""

    def __init__(self, which: str, flags: list[str], log_path: Path, timeout: float = 300):
        import re
        import subprocess

        with open(log_path, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.soak", "serve", which, "--host", "127.0.0.1", "--port", "0",
                 "--metrics-port", "0", *flags],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.log_path = log_path
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = log_path.read_text()
            port = re.search(r"listening on port (\d+)", text)
            metrics = re.search(r"metrics on http://\S+:(\d+)/metrics", text)
            if port and metrics:
                self.address = f"127.0.0.1:{port.group(1)}"
                self.metrics_url = f"http://127.0.0.1:{metrics.group(1)}/metrics"
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {which} exited:\n{text[-3000:]}")
            time.sleep(0.1)
        else:
            self.proc.kill()
            raise TimeoutError(f"the {which} logged no ports in {timeout} s:\n{text[-3000:]}")
        wait_serving(self.address, timeout)

    def gauges(self) -> dict[str, float]:
        """The gauges of /metrics: name{labels} -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(self.metrics_url, timeout=30).read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            if family.type == "gauge":
                for sample in family.samples:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def tasks(self) -> float:
        return self.gauges()[TASKS_GAUGE]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except Exception:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- the clients


@dataclass
class Phase:
    name: str
    began: float = 0.0
    ended: float = 0.0
    codes: Counter = field(default_factory=Counter)  # (method, status code name) -> calls
    ok_seconds: list[float] = field(default_factory=list)

    def record(self, method: str, code: str, seconds: float) -> None:
        self.codes[method, code] += 1
        if code == "OK":
            self.ok_seconds.append(seconds)

    @property
    def calls(self) -> int:
        return sum(self.codes.values())

    @property
    def ok(self) -> int:
        return sum(n for (_, code), n in self.codes.items() if code == "OK")

    def errors(self) -> str:
        """Failed calls by method and status code, e.g. "Recommend: UNAVAILABLE 3; EncodeScene: ..."."""
        by_method: dict[str, list[str]] = {}
        for (method, code), n in sorted(self.codes.items()):
            if code != "OK":
                by_method.setdefault(method, []).append(f"{code} {n:,}")
        return "; ".join(f"{method}: {', '.join(codes)}" for method, codes in by_method.items()) or "none"


def _images(count: int, seed: int = 0) -> list[bytes]:
    """Distinct smooth pictures, 320×240 JPEG (decoded and letterboxed by the encoder like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize((320, 240), Image.Resampling.BILINEAR).save(buffer, "JPEG")
        out.append(buffer.getvalue())
    return out


class Clients:
    """The calls the phases make, on one channel per server (a dropped client gets its own channel)."""

    def __init__(self, encoder: str, ranker: str, images: list[bytes], categories: list[str], seed: int):
        self.encoder_address, self.ranker_address = encoder, ranker
        self.encoder_channel = grpc.aio.insecure_channel(encoder)
        self.ranker_channel = grpc.aio.insecure_channel(ranker)
        self.images, self.categories = images, categories
        self.rng = random.Random(seed)

    async def close(self) -> None:
        await self.encoder_channel.close()
        await self.ranker_channel.close()

    def _call(self, kind: str, channel: grpc.aio.Channel | None, timeout: float):
        image = self.rng.choice(self.images)
        if kind == "scene":
            stub = encoder_pb2_grpc.EncoderServiceStub(channel or self.encoder_channel)
            return stub.EncodeScene(encoder_pb2.EncodeSceneRequest(image=image), timeout=timeout)
        if kind == "products":
            stub = encoder_pb2_grpc.EncoderServiceStub(channel or self.encoder_channel)
            images = self.rng.sample(self.images, 8)
            return stub.EncodeProducts(encoder_pb2.EncodeProductsRequest(images=images), timeout=timeout)
        stub = ranker_pb2_grpc.RankerServiceStub(channel or self.ranker_channel)
        request = ranker_pb2.RecommendRequest(
            scene_image=image, categories=[self.rng.choice(self.categories)], limit=10
        )
        return stub.Recommend(request, timeout=timeout)

    async def call(self, kind: str, timeout: float, cancel_after: float | None = None, drop: bool = False):
        """(method, status code name, seconds). `cancel_after`: the client cancels the call then (CANCELLED);
        `drop`: instead, it closes its own channel then (a client that goes away)."""
        channel = None
        if drop:
            address = self.encoder_address if kind in ("scene", "products") else self.ranker_address
            channel = grpc.aio.insecure_channel(address)
        start = time.perf_counter()
        call = self._call(kind, channel, timeout)
        try:
            if cancel_after is None:
                await call
            else:
                answer = asyncio.ensure_future(_answer(call))
                done, _ = await asyncio.wait([answer], timeout=cancel_after)
                if not done:
                    if channel is not None:
                        await channel.close()  # the client goes away with its connection
                    else:
                        call.cancel()
                await answer
            return METHODS[kind], "OK", time.perf_counter() - start
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # this client task itself was cancelled
                raise
            return METHODS[kind], "CANCELLED", time.perf_counter() - start
        except grpc.aio.AioRpcError as exc:
            return METHODS[kind], exc.code().name, time.perf_counter() - start
        finally:
            if channel is not None:
                await channel.close()


async def _answer(call) -> None:
    await call


async def soak_phase(clients: Clients, phase: Phase, until: float, n: int) -> None:
    """`n` clients, each: 35% EncodeScene and 35% Recommend with a short deadline, 15% cancelled or
    dropped mid-call, 15% ordinary."""
    rng = random.Random(11)

    async def client() -> None:
        while time.monotonic() < until:
            kind = rng.choice(("scene", "recommend"))
            r = rng.random()
            if r < 0.70:
                deadline = rng.uniform(0.005, 0.25) if kind == "scene" else rng.uniform(0.01, 0.5)
                phase.record(*await clients.call(kind, deadline))
            elif r < 0.85:
                after, drop = rng.uniform(0.0, 0.15), rng.random() < 0.5
                phase.record(*await clients.call(kind, 10.0, cancel_after=after, drop=drop))
            else:
                phase.record(*await clients.call(kind, ORDINARY_S))

    await asyncio.gather(*(client() for _ in range(n)))


async def burst_phase(
    clients: Clients, phase: Phase, images: int, probe: Phase, attempts: int
) -> list[tuple[float, bool]]:
    """`images` images of demand at once (half in EncodeProducts calls of 8, a quarter each in EncodeScene
    and Recommend; every other call with a short deadline), while a probe sends ordinary calls one after
    another until the burst is answered and a probe call has succeeded (at most `attempts` calls after
    the burst was answered: a server that recovers needs one). Returns the probe's calls as (start,
    succeeded)."""
    kinds = ["products"] * (images // 2 // 8) + ["scene"] * (images // 4) + ["recommend"] * (images // 4)
    random.Random(5).shuffle(kinds)
    calls = [
        clients.call(kind, ORDINARY_S if i % 2 else random.Random(i).uniform(0.01, 0.3))
        for i, kind in enumerate(kinds)
    ]
    probes: list[tuple[float, bool]] = []
    burst_done = asyncio.Event()

    async def probe_client() -> None:
        k, after = 0, 0
        probe.began = time.monotonic()
        while not burst_done.is_set() or (not (probes and probes[-1][1]) and after < attempts):
            after += burst_done.is_set()
            started = time.monotonic()
            method, code, seconds = await clients.call("scene" if k % 2 else "recommend", ORDINARY_S)
            probe.record(method, code, seconds)
            probes.append((started, code == "OK"))
            k += 1
        probe.ended = time.monotonic()

    async def burst() -> None:
        for outcome in await asyncio.gather(*calls):
            phase.record(*outcome)
        burst_done.set()

    await asyncio.gather(burst(), probe_client())
    return probes


async def recovery_phase(clients: Clients, phase: Phase, until: float, n: int, min_calls: int) -> None:
    """Ordinary calls only, from `n` clients, until `until` and at least `min_calls` calls."""

    async def client(k: int) -> None:
        while time.monotonic() < until or phase.calls < min_calls:
            phase.record(*await clients.call("scene" if k % 2 else "recommend", ORDINARY_S))
            k += n

    await asyncio.gather(*(client(k) for k in range(n)))


# ---------------------------------------------------------------- the run


@dataclass
class Result:
    phases: list[Phase]
    probe: Phase
    burst_images: int
    burst_answered_s: float
    recovered_s: float | None  # from the burst being sent; None: never
    rss: dict[str, list[float]]  # every 0.5 s
    rss_marks: dict[str, list[float]]  # at the start, after the soak, after the burst, at the end
    tasks: dict[str, tuple[float, float]]
    queues: dict[str, float]


async def run(args, encoder: Service, ranker: Service, categories: list[str]) -> Result:
    images = _images(24)
    clients = Clients(encoder.address, ranker.address, images, categories, seed=3)
    servers = {"encoder": encoder, "ranker": ranker}
    rss: dict[str, list[float]] = {name: [] for name in servers}
    marks: dict[str, list[float]] = {name: [] for name in servers}

    def mark() -> None:
        for name, server in servers.items():
            marks[name].append(rss_mib(server.proc.pid)[0])

    sampling = True

    async def sample() -> None:
        while sampling:
            for name, server in servers.items():
                rss[name].append(rss_mib(server.proc.pid)[0])
            await asyncio.sleep(0.5)

    try:
        for kind in ("scene", "recommend", "products"):  # warm: every path answered once
            _, code, _ = await clients.call(kind, ORDINARY_S)
            if code != "OK":
                raise RuntimeError(f"the warm-up {kind} call failed: {code}")
        start_tasks = {name: await asyncio.to_thread(s.tasks) for name, s in servers.items()}
        sampler = asyncio.create_task(sample())
        mark()
        began = time.monotonic()
        soak, burst, recovery = Phase("soak"), Phase("burst"), Phase("recovery")
        probe = Phase("probe (during the burst)")

        soak.began = time.monotonic()
        await soak_phase(clients, soak, began + 0.6 * args.seconds, args.clients)
        soak.ended = burst.began = time.monotonic()
        mark()
        burst_images = args.burst * args.max_queue
        probes = await burst_phase(clients, burst, burst_images, probe, args.probe_attempts)
        burst.ended = recovery.began = time.monotonic()
        mark()
        await recovery_phase(
            clients, recovery, began + args.seconds, args.recovery_clients, args.min_recovery_calls
        )
        recovery.ended = time.monotonic()
        mark()
        sampling = False
        await sampler
    finally:
        await clients.close()

    # the first probe call after which every probe call succeeded
    recovered = None
    for i in range(len(probes) - 1, -1, -1):
        if not probes[i][1]:
            break
        recovered = probes[i][0] - burst.began
    end_tasks, queues = await asyncio.to_thread(_settle, servers, start_tasks, args.task_slack)
    return Result(
        [soak, burst, recovery],
        probe,
        burst_images,
        burst.ended - burst.began,
        recovered,
        rss,
        marks,
        {name: (start_tasks[name], end_tasks[name]) for name in servers},
        queues,
    )


def _settle(servers: dict[str, Service], start: dict[str, float], slack: int, within: float = 30.0):
    """Once every call is answered: the servers' task counts and the encoder's queue gauges, read again
    (up to `within` s) until the queues are 0 and the tasks back within `slack` of the start."""
    deadline = time.monotonic() + within
    while True:
        gauges = {name: s.gauges() for name, s in servers.items()}
        tasks = {name: g[TASKS_GAUGE] for name, g in gauges.items()}
        queues = {k: v for k, v in gauges["encoder"].items() if k.startswith(QUEUE_GAUGE)}
        settled = all(v == 0 for v in queues.values()) and all(
            tasks[name] <= start[name] + slack for name in servers
        )
        if settled or time.monotonic() > deadline:
            return tasks, queues
        time.sleep(0.2)


def report(args, r: Result, version: str) -> tuple[str, list[str]]:
    """The tables, and the reasons to fail (empty: passed)."""
    failures = []
    rows = []
    for phase in [*r.phases, r.probe]:
        p = percentiles(phase.ok_seconds) if phase.ok_seconds else None
        rows.append(
            [
                phase.name,
                f"{phase.ended - phase.began:.1f}" if phase.ended else "",
                f"{phase.calls:,}",
                f"{phase.ok:,}",
                f"{p['p50']:.1f}" if p else "-",
                f"{p['p99']:.1f}" if p else "-",
                phase.errors(),
            ]
        )
    recovery = r.phases[2]
    bad = recovery.calls - recovery.ok
    if bad:
        failures.append(f"{bad} ordinary calls failed in the recovery phase: {recovery.errors()}")
    if r.recovered_s is None:
        failures.append("the probe's last call failed: ordinary calls never all succeeded after the burst")
    nonzero = {k: v for k, v in r.queues.items() if v != 0}
    if nonzero or not r.queues:
        failures.append(f"queue gauges not back to 0: {nonzero or 'none found'}")
    for name, (start, end) in r.tasks.items():
        if not end <= start + args.task_slack:
            failures.append(f"the {name} holds {end:.0f} asyncio tasks, {start:.0f} at the start")
    servers = []
    for name in ("encoder", "ranker"):
        samples = r.rss[name] or [0.0]
        marked = " / ".join(f"{v:,.0f}" for v in r.rss_marks[name])
        start, end = r.tasks[name]
        queues = (
            ", ".join(f"{k.split('encoder=')[1].rstrip('}')} {v:.0f}" for k, v in sorted(r.queues.items()))
            if name == "encoder"
            else "-"
        )
        servers.append(
            [
                name,
                marked,
                f"{max(samples):,.0f}",
                f"{start:.0f} / {end:.0f}",
                queues,
            ]
        )
    recovered = "never" if r.recovered_s is None else f"{max(r.recovered_s, 0.0):.2f}"
    text = "\n\n".join(
        [
            f"Model {version}; encoder --max-queue {args.max_queue} (--max-batch {args.max_batch}); "
            f"{args.products:,} products; {args.clients} soak clients; {args.seconds:.0f} s in all.",
            "Calls by phase (client side; OK latency in ms):",
            table(["phase", "s", "calls", "OK", "p50 ms", "p99 ms", "errors by status"], rows),
            table(
                [
                    "burst images",
                    "burst answered s",
                    "ordinary calls all OK from s",
                    "recovery calls",
                    "recovery failures",
                ],
                [
                    [
                        f"{r.burst_images:,}",
                        f"{r.burst_answered_s:.2f}",
                        recovered,
                        f"{recovery.calls:,}",
                        f"{bad:,}",
                    ]
                ],
            ),
            "Servers (RSS sampled every 0.5 s; tasks: asyncio tasks of the server's loop, idle, before "
            "the soak and after the last call):",
            table(
                [
                    "server",
                    "RSS MiB start / after soak / after burst / end",
                    "peak",
                    "asyncio tasks start / end",
                    "queue images at end",
                ],
                servers,
            ),
            "Result: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)),
        ]
    )
    return text, failures


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repo", type=Path, default=Path("runs/demo/triton_repo"))
    parser.add_argument("--seconds", type=float, default=60.0, help="soak + burst + recovery")
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=32, help="clients in the soak phase")
    parser.add_argument("--max-queue", type=int, default=64, help="the encoder's --max-queue (images)")
    parser.add_argument("--max-batch", type=int, default=32, help="the encoder's --max-batch")
    parser.add_argument("--burst", type=int, default=8, help="burst size, in multiples of --max-queue")
    parser.add_argument("--recovery-clients", type=int, default=4)
    parser.add_argument("--min-recovery-calls", type=int, default=20)
    parser.add_argument(
        "--probe-attempts", type=int, default=50, help="probe calls after the burst before it never recovered"
    )
    parser.add_argument("--task-slack", type=int, default=10, help="tasks over the start that are a leak")
    parser.add_argument("--work", type=Path, help="where the store and logs go (default: a temporary folder)")
    args = parser.parse_args()
    if not (args.model_repo / MODEL_INFO_FILE).exists():
        sys.exit(f"{args.model_repo}: no exported model (run `make demo`, or give --model-repo)")
    version, dim, _ = model_of(args.model_repo)
    print(
        f"# bench/soak.py — {time.strftime('%Y-%m-%d')}\n\nMachine: {machine()}, device: CPU. Command: "
        f"`python -m bench.soak {' '.join(sys.argv[1:])}`\n"
    )
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        asyncio.run(build_store(work / "store" / version, args.products, version, dim))
        categories = synthetic_catalog(10, dim).names
        encoder = Service(
            "encoder",
            ["--model-repo", str(args.model_repo), "--max-queue", str(args.max_queue), "--max-batch",
             str(args.max_batch)],
            work / "encoder.log",
        )  # fmt: skip
        ranker = None
        try:
            ranker = Service(
                "ranker",
                ["--encoder", encoder.address, "--store-path", str(work / "store" / "{model_version}")],
                work / "ranker.log",
            )
            result = asyncio.run(run(args, encoder, ranker, categories))
        finally:
            for service in (ranker, encoder):
                if service is not None:
                    service.stop()
    text, failures = report(args, result, version)
    print(text)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
