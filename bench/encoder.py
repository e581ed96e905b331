"""The encoders: images/s and latency at batch 1, 8 and 32, in-process and through Triton (CPU here), and
the encoder service's micro-batching under concurrency 1, 8 and 32 against the raw batched model.

    python -m bench.encoder --model-repo runs/demo/triton_repo [--triton]

Inputs are real images of the demo dataset (decoded once: the raw-model rows measure the forward pass
only; the service rows include decoding, as a client sees it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.common import Timer, machine, percentiles, serve_encoder, table
from ctl.encoder_contract import ENCODERS, INPUT, INPUT_DTYPE, MODEL_INFO_FILE, SCENE_ENCODER, model_file
from ctl.v1 import encoder_pb2, encoder_pb2_grpc

BATCHES = (1, 8, 32)


def _row(name: str, where: str, batch: int, reps: int, call) -> list[object]:
    """One table row: `call` (one forward pass of `batch` images) warmed once, then timed `reps` times."""
    call()
    times = []
    for _ in range(reps):
        with Timer() as t:
            call()
        times.append(t.seconds)
    p = percentiles(times)
    return [name, where, batch, f"{batch / np.median(times):.1f}", f"{p['p50']:.1f}", f"{p['p99']:.1f}"]


def raw(model_repo: Path, pixels: np.ndarray, reps: int) -> list[list[object]]:
    """The TorchScript modules themselves, as the in-process backend runs them."""
    import torch

    from style_model.export import load_encoder

    rows = []
    for name in ENCODERS:
        module, _ = load_encoder(model_file(model_repo, name))
        for batch in BATCHES:
            x = torch.from_numpy(pixels[:batch].copy())
            with torch.inference_mode():
                rows.append(_row(name, "in-process", batch, reps, lambda x=x, module=module: module(x)))
    return rows


def triton(model_repo: Path, pixels: np.ndarray, reps: int, work: Path) -> list[list[object]]:
    """The same files on the real Triton server (tools/triton_cpu: the Python-backend twin on CPU)."""
    import tritonclient.grpc as tc

    from tools import triton_cpu

    home = triton_cpu.setup(install=False)
    twin = triton_cpu.write_twin(model_repo, work / "twin")
    server = triton_cpu.start(home, twin, log_path=work / "triton.log").wait_ready(180)
    rows = []
    try:
        client = tc.InferenceServerClient(server.grpc_url)
        for name in ENCODERS:
            for batch in BATCHES:
                x = tc.InferInput(INPUT, list(pixels[:batch].shape), INPUT_DTYPE)
                x.set_data_from_numpy(np.ascontiguousarray(pixels[:batch]))
                rows.append(
                    _row(name, "Triton (CPU)", batch, reps, lambda x=x, name=name: client.infer(name, [x]))
                )
        client.close()
    finally:
        server.stop()
    return rows


async def service(address: str, images: list[bytes], concurrency: int, total: int) -> dict:
    """`total` EncodeScene calls of one image each, `concurrency` in flight."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        await stub.EncodeScene(encoder_pb2.EncodeSceneRequest(image=images[0]), timeout=60)
        todo = iter(range(total))

        async def worker() -> None:
            for i in todo:
                start = time.perf_counter()
                await stub.EncodeScene(
                    encoder_pb2.EncodeSceneRequest(image=images[i % len(images)]), timeout=60
                )
                latencies.append(time.perf_counter() - start)

        with Timer() as t:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {**percentiles(latencies), "images_s": total / t.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-repo", type=Path, default=Path("runs/demo/triton_repo"))
    parser.add_argument("--images", type=Path, default=Path("runs/demo/data/images"))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=256, help="service calls per concurrency level")
    parser.add_argument("--triton", action="store_true", help="also through Triton (needs make triton-cpu)")
    args = parser.parse_args()
    from style_model.data.images import load_image

    size = json.loads((args.model_repo / MODEL_INFO_FILE).read_text())["config"]["input_size"]
    files = sorted(args.images.glob("*.jpg"))[:64]
    if len(files) < 32:
        sys.exit(f"{args.images}: fewer than 32 images (run `make demo`, or give --images)")
    pixels = np.stack([load_image(f, size) for f in files])
    encoded = [f.read_bytes() for f in files]
    print(
        f"# bench/encoder.py — {time.strftime('%Y-%m-%d')}\n\nMachine: {machine()}; model "
        f"{args.model_repo} ({size} px). Command: `python -m bench.encoder {' '.join(sys.argv[1:])}`\n"
    )
    rows = raw(args.model_repo, pixels, args.reps)
    best = max(float(r[3]) for r in rows if r[0] == SCENE_ENCODER)
    with tempfile.TemporaryDirectory() as tmp:
        if args.triton:
            rows += triton(args.model_repo, pixels, args.reps, Path(tmp))
        print(table(["model", "where", "batch", "images/s", "p50 ms", "p99 ms"], rows))
        proc, address = serve_encoder(args.model_repo, Path(tmp))
        try:
            service_rows = []
            for concurrency in (1, 8, 32):
                r = asyncio.run(service(address, encoded, concurrency, args.requests))
                service_rows.append(
                    [
                        concurrency,
                        f"{r['images_s']:.1f}",
                        f"{100 * r['images_s'] / best:.0f}%",
                        f"{r['p50']:.1f}",
                        f"{r['p99']:.1f}",
                    ]
                )
        finally:
            proc.terminate()
            proc.wait(30)
    print(
        "\nThe encoder service (`ctl serve-encoder`, in-process backend), EncodeScene of one image per call "
        f"(decode included); share of the raw model's best batched rate ({best:.1f} images/s):\n\n"
        + table(["concurrency", "images/s", "of raw batched", "p50 ms", "p99 ms"], service_rows)
    )


if __name__ == "__main__":
    main()
