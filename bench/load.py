"""Load: many clients calling Recommend for a fixed time against a catalog of precomputed embeddings.

    python -m bench.load --products 100000 --clients 32 --seconds 60 --model-repo runs/bench-small/repo

The catalog is written straight into an embedded store (synthetic clustered embeddings, 10 categories),
then `ctl serve-encoder` and `ctl serve-ranker` run as subprocesses and `--clients` asyncio clients send
Recommend (scene embedding in, default pooled mode, limit 10) back to back for `--seconds`. Prints latency
p50/p95/p99, calls/s, errors by status, and the ranker's resident memory sampled every second (first,
last, peak), so that growth under load shows. Exit status 1 when any call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from bench.common import (
    machine,
    percentiles,
    rss_mib,
    serve_encoder,
    serve_ranker,
    synthetic_catalog,
    synthetic_scenes,
    table,
)
from bench.recommend import fill, model_of
from ctl.encoder_contract import MODEL_INFO_FILE
from ctl.tensors import scene_to_proto
from ctl.v1 import ranker_pb2, ranker_pb2_grpc
from ranker_service.store.edge import open_edge_store


async def run_clients(address: str, requests: list, clients: int, seconds: float, ranker_pid: int) -> dict:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    memory: list[float] = []
    stop_at = time.monotonic() + seconds

    async with grpc.aio.insecure_channel(address) as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        await stub.Recommend(requests[0], timeout=30)  # warm

        async def client(k: int) -> None:
            i = k
            while time.monotonic() < stop_at:
                start = time.perf_counter()
                try:
                    await stub.Recommend(requests[i % len(requests)], timeout=30)
                    latencies.append(time.perf_counter() - start)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                i += clients

        async def sample() -> None:
            while time.monotonic() < stop_at:
                memory.append(rss_mib(ranker_pid)[0])
                await asyncio.sleep(1.0)

        began = time.monotonic()
        await asyncio.gather(sample(), *(client(k) for k in range(clients)))
        took = time.monotonic() - began
    return {
        **percentiles(latencies),
        "calls": len(latencies),
        "qps": len(latencies) / took,
        "errors": dict(errors),
        "memory": memory,
    }


async def build_store(path: Path, products: int, version: str, dim: int) -> float:
    store = await open_edge_store(path, version, dim)
    try:
        return await fill(store, synthetic_catalog(products, dim), version)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-repo", type=Path, default=Path("runs/demo/triton_repo"))
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--work", type=Path, help="where the store goes (default: a temporary folder)")
    args = parser.parse_args()
    if not (args.model_repo / MODEL_INFO_FILE).exists():
        sys.exit(f"{args.model_repo}: no exported model (run `make demo`, or give --model-repo)")
    version, dim, regions = model_of(args.model_repo)
    print(
        f"# bench/load.py — {time.strftime('%Y-%m-%d')}\n\nMachine: {machine()}. Command: "
        f"`python -m bench.load {' '.join(sys.argv[1:])}`\n"
    )
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        rate = asyncio.run(build_store(work / "store" / version, args.products, version, dim))
        cat = synthetic_catalog(10, dim)  # only the category names
        rng = np.random.default_rng(7)
        requests = [
            ranker_pb2.RecommendRequest(
                scene_embedding=scene_to_proto(scene, version),
                categories=[cat.names[int(rng.integers(0, 10))]],
                limit=10,
            )
            for scene in synthetic_scenes(200, dim, regions)
        ]
        enc, encoder = serve_encoder(args.model_repo, work)
        ranker, address = serve_ranker(encoder, str(work / "store" / "{model_version}"), work)
        try:
            r = asyncio.run(run_clients(address, requests, args.clients, args.seconds, ranker.pid))
        finally:
            for p in (ranker, enc):
                p.terminate()
                p.wait(30)
    memory = r["memory"] or [0.0]
    errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none"
    print(
        f"{args.products:,} products (stored at {rate:,.0f}/s), {args.clients} clients for "
        f"{args.seconds:.0f} s:\n\n"
        + table(
            ["calls", "calls/s", "p50 ms", "p95 ms", "p99 ms", "errors", "ranker MiB first / last / peak"],
            [
                [
                    f"{r['calls']:,}",
                    f"{r['qps']:.0f}",
                    f"{r['p50']:.1f}",
                    f"{r['p95']:.1f}",
                    f"{r['p99']:.1f}",
                    errors,
                    f"{memory[0]:,.0f} / {memory[-1]:,.0f} / {max(memory):,.0f}",
                ]
            ],
        )
    )
    sys.exit(1 if r["errors"] else 0)


if __name__ == "__main__":
    main()
