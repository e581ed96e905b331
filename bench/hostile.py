"""Hostile requests against a running ranker: answered or refused in time, health kept, memory bounded.

    python -m bench.hostile --products 100000 --model-repo runs/demo/triton_repo

A real encoder and ranker (`ctl serve-*` through bench.soak's launcher) run as subprocesses on loopback; the
ranker's embedded store holds `--products` products of precomputed embeddings over 10 categories, plus a
category of identical products (where certify cannot stop early). Then each request of issue 20's security
review is sent, one at a time, with a `--deadline`, while a prober asks the ranker's health every 0.5 s.
Per request: the status it got (and the one it should get), the seconds, the slowest health answer
meanwhile, and the ranker's peak resident memory meanwhile (its high-water mark, reset before each one).

Targets (issue 20): every request answered or refused within its deadline, no health check slower than
1 s, peak RSS under 1 GB. Exit status 1 when a request got another status than it should (a refusal
became an answer, or an answer an error), or no answer within its deadline; the times, health and
memory are numbers, printed against their targets, never a verdict (they depend on the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import machine, synthetic_catalog, synthetic_scenes, table
from bench.recommend import fill, model_of
from bench.soak import Service
from ctl.encoder_contract import MODEL_INFO_FILE
from ctl.tensors import product_to_proto, scene_to_proto
from ctl.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_service.store.base import ProductPoint
from ranker_service.store.edge import open_edge_store

MiB = 1024 * 1024
SAME = "identical"  # the category of identical products
HEALTH_EVERY_S = 0.5


class HealthProber:
    """Asks the server's health every 0.5 s from its own thread; keeps (time sent, seconds to answer or
    None for no answer within 10 s)."""

    def __init__(self, address: str):
        self._channel = grpc.insecure_channel(address)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self.checks: list[tuple[float, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                reply = self._stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                took = (
                    time.monotonic() - sent
                    if reply.status == health_pb2.HealthCheckResponse.SERVING
                    else None
                )
            except grpc.RpcError:
                took = None
            self.checks.append((sent, took))
            self._stop.wait(max(0.0, HEALTH_EVERY_S - (time.monotonic() - sent)))

    def slowest(self, since: float, until: float) -> tuple[float, int]:
        """The slowest answer among the checks sent in [since, until] (a check still waiting counts from
        when it was sent), and how many got no SERVING answer."""
        window = [(s, t) for s, t in self.checks if since <= s <= until]
        missed = sum(1 for _, t in window if t is None)
        slowest = max((t for _, t in window if t is not None), default=0.0)
        return slowest, missed

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self._channel.close()


def _peak_reset(pid: int) -> None:
    """Reset the process's resident high-water mark (Linux: clear_refs 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Hostile:
    """One hostile request: what it is, how to send it, the status it should get."""

    name: str
    send: Callable[[ranker_pb2_grpc.RankerServiceStub, float], object]
    expect: str  # a status code name


async def _build(path: Path, products: int, same: int, version: str, dim: int) -> None:
    """10 categories of clustered products, and `same` identical products in SAME."""
    store = await open_edge_store(path, version, dim)
    try:
        await fill(store, synthetic_catalog(products, dim), version)
        rng = np.random.default_rng(9)
        style, key = (v / np.linalg.norm(v) for v in rng.standard_normal((2, dim)).astype(np.float32))
        for start in range(0, same, 4096):
            await store.upsert(
                [
                    ProductPoint(f"same-{i:07d}", SAME, style, key, {}, version)
                    for i in range(start, min(same, start + 4096))
                ]
            )
    finally:
        await store.close()


def hostile_requests(args, version: str, dim: int, regions: int, categories: list[str]) -> list[Hostile]:
    scene = scene_to_proto(synthetic_scenes(1, dim, regions)[0], version)
    rng = np.random.default_rng(3)

    def recommend(**fields) -> Callable:
        def send(stub, deadline):
            return stub.Recommend(
                ranker_pb2.RecommendRequest(scene_embedding=scene, **fields), timeout=deadline
            )

        return send

    def upsert(make: Callable[[], list[ranker_pb2.Product]]) -> Callable:
        def send(stub, deadline):
            reply = stub.UpsertProducts(
                (ranker_pb2.UpsertProductsRequest(product=p) for p in make()), timeout=deadline
            )
            codes = sorted({f.error.code for f in reply.failures})
            return f"{reply.upserted:,} stored, {len(reply.failures):,} failed ({', '.join(codes) or '-'})"

        return send

    def embedding() -> object:
        v = rng.standard_normal((2, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
        return product_to_proto(v[0], v[1], version)

    def conditions(n: int) -> list[ranker_pb2.MetadataCondition]:
        return [ranker_pb2.MetadataCondition(key=f"k{i}", none_of=["v"]) for i in range(n)]

    def images(count: int, size: int) -> list[ranker_pb2.Product]:
        blob = os.urandom(size)  # the encoder refuses them (not an image) after the ranker sent them
        return [
            ranker_pb2.Product(product_id=f"img-{i}", category=categories[0], image=blob)
            for i in range(count)
        ]

    many = args.exclusions
    everything = [*categories, SAME]
    certify = ranker_pb2.RETRIEVAL_MODE_CERTIFY
    exhaustive = ranker_pb2.RETRIEVAL_MODE_EXHAUSTIVE
    first = categories[:1]
    refused = "INVALID_ARGUMENT"

    def product(pid: str, category: str = categories[0], **fields) -> ranker_pb2.Product:
        return ranker_pb2.Product(product_id=pid, category=category, embedding=embedding(), **fields)

    def stats(stub, deadline) -> str:
        reply = stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest(), timeout=deadline)
        return f"{len(reply.products_by_category):,} categories"

    def excluded(n: int) -> list[str]:
        return [f"p{i:07d}" for i in range(n)]

    def long_values() -> list[ranker_pb2.MetadataCondition]:  # 16 × 1,000 values of 4,000 bytes: 61 MiB
        values = [f"{j:04d}" + "x" * 3996 for j in range(1000)]
        return [ranker_pb2.MetadataCondition(key=f"k{i}", any_of=values) for i in range(16)]

    def streams(n: int, count: int, size: int) -> Callable:
        """`n` streams at once; each is answered, or refused at once (RESOURCE_EXHAUSTED: over
        --max-upsert-streams); any other status fails the row."""

        def send(stub, deadline) -> str:
            def one(_) -> str:
                try:
                    return upsert(lambda: images(count, size))(stub, deadline)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    return "refused"

            with ThreadPoolExecutor(n) as pool:
                answers = list(pool.map(one, range(n)))
            answered = [a for a in answers if a != "refused"]
            shown = answered[0] if answered else "-"
            return f"{len(answered)} answered ({shown}), {answers.count('refused')} refused at once"

        return send

    return [
        Hostile(
            "Recommend, 1,000 filter conditions",
            recommend(categories=first, filters=conditions(1000)),
            refused,
        ),
        Hostile(
            "Recommend, 100,000 filter conditions",
            recommend(categories=first, filters=conditions(100_000)),
            refused,
        ),
        Hostile(
            "Recommend, 16 conditions (the most), every category, certify",
            recommend(categories=everything, filters=conditions(16), mode=certify),
            "OK",
        ),
        Hostile(
            "Recommend, 16 filters of 1,000 values of 4 KB (61 MiB)",
            recommend(categories=everything, filters=long_values(), mode=certify),
            refused,
        ),
        Hostile(
            f"Recommend, {many:,} exclusions, every category",
            recommend(categories=everything, exclude_product_ids=excluded(many)),
            refused,
        ),
        Hostile(
            "Recommend, 10,000 exclusions (the most), every category, certify",
            recommend(categories=everything, exclude_product_ids=excluded(10_000), mode=certify),
            "OK",
        ),
        Hostile("Recommend, certify on identical products", recommend(categories=[SAME], mode=certify), "OK"),
        Hostile(
            "Recommend, exhaustive, every category", recommend(categories=everything, mode=exhaustive), "OK"
        ),
        Hostile(
            f"UpsertProducts, {args.big_images} images of 20 MB",
            upsert(lambda: images(args.big_images, 20 * MiB)),
            "OK",
        ),
        Hostile("UpsertProducts, 2 images of 60 MB", upsert(lambda: images(2, 60 * MiB)), "OK"),
        Hostile(
            f"UpsertProducts, {args.streams} streams of 10 images of 2 MB at once",
            streams(args.streams, 10, 2 * MiB),
            "OK",
        ),
        Hostile(
            "UpsertProducts, a 40 MB metadata value",
            upsert(lambda: [product("meta", metadata={"story": "x" * (40 * MiB)})]),
            "OK",
        ),
        Hostile(
            f"UpsertProducts, {args.keys:,} metadata keys",
            upsert(lambda: [product("keys", metadata={f"k{i}": "" for i in range(args.keys)})]),
            "OK",
        ),
        Hostile(
            f"UpsertProducts, {args.new_categories:,} new categories",
            upsert(lambda: [product(f"new-{i}", f"new-{i:06d}") for i in range(args.new_categories)]),
            "OK",
        ),
        Hostile("GetCatalogStats after that", stats, "OK"),
        Hostile("Recommend after all that", recommend(categories=categories[:2]), "OK"),
    ]


def run(args, ranker: Service, hostile: list[Hostile]) -> tuple[list[list[str]], list[str]]:
    """Sends each request; the table rows and the reasons to fail."""
    pid = ranker.proc.pid
    prober = HealthProber(ranker.address)
    rows, failures = [], []
    options = [("grpc.max_send_message_length", 256 * MiB), ("grpc.max_receive_message_length", 256 * MiB)]
    try:
        with grpc.insecure_channel(ranker.address, options=options) as channel:
            stub = ranker_pb2_grpc.RankerServiceStub(channel)
            for h in hostile:
                time.sleep(2 * HEALTH_EVERY_S)  # health checks before it too
                _peak_reset(pid)
                began = time.monotonic()
                try:
                    answer = h.send(stub, args.deadline)
                    code, detail = "OK", str(answer) if isinstance(answer, str) else ""
                except grpc.RpcError as exc:
                    code, detail = exc.code().name, (exc.details() or "")
                took = time.monotonic() - began
                time.sleep(2 * HEALTH_EVERY_S)  # the checks sent meanwhile are answered (or not)
                slowest, missed = prober.slowest(began - HEALTH_EVERY_S, began + took)
                peak = _peak_mib(pid)
                if code != h.expect:
                    failures.append(f"{h.name}: {code} (expected {h.expect}): {detail[:200]}")
                if code == "DEADLINE_EXCEEDED" or took > args.deadline + 1:
                    failures.append(f"{h.name}: not answered within its {args.deadline:.0f} s deadline")
                answer = detail[:90].replace("|", "/")
                rows.append(
                    [h.name, code, answer, f"{took:.2f}", f"{slowest:.2f}", str(missed), f"{peak:,.0f}"]
                )
    finally:
        prober.close()
    return rows, failures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repo", type=Path, default=Path("runs/demo/triton_repo"))
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--identical", type=int, default=20_000, help="identical products in their category")
    parser.add_argument("--deadline", type=float, default=30.0, help="each request's deadline, seconds")
    parser.add_argument("--exclusions", type=int, default=1_000_000, help="exclusions of the refused request")
    parser.add_argument("--big-images", type=int, default=32, help="20 MB images in one stream")
    parser.add_argument("--streams", type=int, default=16, help="concurrent UpsertProducts streams")
    parser.add_argument("--keys", type=int, default=1_000_000, help="metadata keys of one product")
    parser.add_argument("--new-categories", type=int, default=20_000)
    parser.add_argument("--only", action="append", default=[], help="run the requests whose name holds this")
    parser.add_argument(
        "--ranker-flags", default="", help="more flags for the ranker, e.g. '--max-filters 8'"
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="folder for the temporary store and logs (removed at the end; default: /tmp)",
    )
    args = parser.parse_args()
    if not (args.model_repo / MODEL_INFO_FILE).exists():
        sys.exit(f"{args.model_repo}: no exported model (run `make demo`, or give --model-repo)")
    version, dim, regions = model_of(args.model_repo)
    print(
        f"# bench/hostile.py — {time.strftime('%Y-%m-%d')}\n\nMachine: {machine()}. Command: "
        f"`python -m bench.hostile {' '.join(sys.argv[1:])}`\n"
    )
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        asyncio.run(_build(work / "store" / version, args.products, args.identical, version, dim))
        categories = synthetic_catalog(10, dim).names
        encoder = Service("encoder", ["--model-repo", str(args.model_repo)], work / "encoder.log")
        ranker = None
        try:
            ranker = Service(
                "ranker",
                [
                    "--encoder",
                    encoder.address,
                    "--store-path",
                    str(work / "store" / "{model_version}"),
                    *args.ranker_flags.split(),
                ],
                work / "ranker.log",
            )
            requests = hostile_requests(args, version, dim, regions, categories)
            if args.only:
                requests = [h for h in requests if any(part in h.name for part in args.only)]
                if not requests:
                    sys.exit(f"no request's name holds any of {args.only}")
            rows, failures = run(args, ranker, requests)
        finally:
            for service in (ranker, encoder):
                if service is not None:
                    service.stop()
    slowest = max(float(r[4]) for r in rows)
    missed = sum(int(r[5]) for r in rows)
    peak = max(float(r[6].replace(",", "")) for r in rows)
    print(
        f"Model {version} ({dim}-d, {regions} regions); {args.products:,} products in 10 categories and "
        f"{args.identical:,} identical ones in {SAME!r}; deadline {args.deadline:.0f} s per request; health "
        f"checked every {HEALTH_EVERY_S} s.\n"
    )
    print(
        table(
            ["request", "status", "answer", "s", "slowest health s", "health missed", "ranker peak RSS MiB"],
            rows,
        )
    )
    health_met = "MET" if slowest <= 1 and not missed else "MISSED"
    print(
        f"\nTargets: slowest health answer {slowest:.2f} s (≤ 1 s: {health_met}), {missed} health checks "
        f"unanswered; ranker peak RSS {peak:,.0f} MiB (< 1024: {'MET' if peak < 1024 else 'MISSED'})."
    )
    print("Result: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
