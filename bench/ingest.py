"""Ingestion: products/s of `ctl ingest` from image files end to end (encoder and ranker as real servers,
embedded store), from precomputed embeddings (UpsertProducts), and the share of the raw encoder's batched
throughput that the image pipeline keeps.

    python -m bench.ingest --model-repo runs/demo/triton_repo --products 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.common import Timer, machine, serve_encoder, serve_ranker, synthetic_catalog, table
from ctl.encoder_contract import MODEL_INFO_FILE, PRODUCT_ENCODER, model_file
from ctl.tensors import product_to_proto
from ctl.v1 import ranker_pb2, ranker_pb2_grpc


def raw_rate(model_repo: Path, files: list[Path], size: int) -> tuple[int, float, float]:
    """The product encoder's best batch (8 or 32) in this process, and its images/s: forward only, and
    decode + forward in one thread."""
    import torch

    from style_model.data.images import load_image
    from style_model.export import load_encoder

    module, _ = load_encoder(model_file(model_repo, PRODUCT_ENCODER))
    sample = files[:256]
    with Timer() as decode:
        pixels = np.stack([load_image(f, size) for f in sample])
    seconds = {}
    with torch.inference_mode():
        for batch in (8, 32):
            module(torch.from_numpy(pixels[:batch]))
            with Timer() as forward:
                for start in range(0, len(pixels), batch):
                    module(torch.from_numpy(pixels[start : start + batch]))
            seconds[batch] = forward.seconds
    best = min(seconds, key=seconds.__getitem__)
    return best, len(sample) / seconds[best], len(sample) / (seconds[best] + decode.seconds)


async def embeddings_rate(address: str, n: int, version: str, dim: int) -> float:
    cat = synthetic_catalog(n, dim, seed=11)
    requests = [
        ranker_pb2.UpsertProductsRequest(
            product=ranker_pb2.Product(
                product_id=f"e{i}",
                category=cat.names[cat.categories[i]],
                embedding=product_to_proto(cat.styles[i], cat.keys[i], version),
            )
        )
        for i in range(n)
    ]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        with Timer() as t:
            streams = [requests[i : i + 1000] for i in range(0, n, 1000)]
            for i in range(0, len(streams), 4):  # 4 streams in flight, as ctl ingest does
                replies = await asyncio.gather(
                    *(stub.UpsertProducts(iter(s), timeout=300) for s in streams[i : i + 4])
                )
                assert all(not r.failures for r in replies), replies[0].failures[:3]
    return n / t.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-repo", type=Path, default=Path("runs/demo/triton_repo"))
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    parser.add_argument("--products", type=int, default=2000)
    parser.add_argument("--embeddings", type=int, default=20000)
    args = parser.parse_args()
    info = json.loads((args.model_repo / MODEL_INFO_FILE).read_text())
    version, size, dim = info["model_version"], info["config"]["input_size"], info["config"]["embed_dim"]
    categories = json.loads((args.data / "fashion-cat.json").read_text())
    rows = [
        (sig, cat, args.data / "images" / f"{sig}.jpg")
        for sig, cat in sorted(categories.items())
        if (args.data / "images" / f"{sig}.jpg").exists()
    ][: args.products]
    print(
        f"# bench/ingest.py — {time.strftime('%Y-%m-%d')}\n\nMachine: {machine()}. Command: "
        f"`python -m bench.ingest {' '.join(sys.argv[1:])}`\n"
    )
    batch, forward, decoded = raw_rate(args.model_repo, [f for _, _, f in rows], size)
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "catalog.jsonl"
        catalog.write_text(
            "".join(
                json.dumps({"product_id": s, "category": c, "image": str(f.resolve())}) + "\n"
                for s, c, f in rows
            )
        )
        enc, encoder = serve_encoder(args.model_repo, Path(tmp), "--max-batch", str(batch))
        ranker, address = serve_ranker(encoder, f"{tmp}/store/{{model_version}}", Path(tmp))
        try:
            with Timer() as wall:
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "ctl_app.cli",
                        "ingest",
                        str(catalog),
                        "--ranker",
                        address,
                        "--images",  # the image paths are absolute, under it
                        str(args.data),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
            if done.returncode != 0:
                sys.exit(done.stdout + done.stderr)
            took = float(re.search(r"took ([\d.]+) s", done.stdout).group(1))
            from_embeddings = asyncio.run(embeddings_rate(address, args.embeddings, version, dim))
        finally:
            for p in (ranker, enc):
                p.terminate()
                p.wait(30)
    n = len(rows)
    print(
        table(
            ["what", "products/s", "share of the raw encoder"],
            [
                [f"raw product encoder, batch {batch}, forward only", f"{forward:.1f}", "100%"],
                [
                    f"raw product encoder, batch {batch}, decode + forward (one thread)",
                    f"{decoded:.1f}",
                    f"{100 * decoded / forward:.0f}%",
                ],
                [
                    f"`ctl ingest` from image files, {n} products, encoder --max-batch {batch} (job's clock)",
                    f"{n / took:.1f}",
                    f"{100 * n / took / forward:.0f}%",
                ],
                [
                    "`ctl ingest`, process wall clock (start-up included)",
                    f"{n / wall.seconds:.1f}",
                    f"{100 * n / wall.seconds / forward:.0f}%",
                ],
                [
                    f"UpsertProducts with precomputed embeddings ({args.embeddings:,})",
                    f"{from_embeddings:,.0f}",
                    "-",
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()
