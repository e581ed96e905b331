"""The paper's setting end to end, as a user runs it on Shop The Look: real STL pairs (a few hundred, from
../shared/data/stl), images fetched from a real HTTP server on loopback that lacks a fifth of them and
answers two with an HTML page, then `ctl examples`, `ctl train --preset paper --weights FILE` (a
checkpoint in torchvision's ResNet-50 layout, random values: nothing is downloaded), `ctl evaluate`,
`ctl export`, the encoder and the ranker as real processes, `ctl ingest` and `ctl recommend`.

The images are drawn here (the real ones are not stored): a product is a striped tile, a scene pastes
its products' tiles into their boxes. Each step's wall time and the image bytes are printed at the end
(`pytest -s`); docs/REAL_DATA.md quotes them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ctl_app.cli import main
from style_model.data.examples import split_of
from tests.cli import run_ctl
from tests.servers import Process, wait_serving

CATEGORIES = (
    "Apparel & Accessories|Shoes",
    "Apparel & Accessories|Clothing|Pants",
    "Apparel & Accessories|Clothing|Shirts & Tops",
    "Apparel & Accessories|Handbags, Wallets & Cases",
)
SCENES = {"train": 120, "val": 15, "test": 15}  # scenes per split (split_of: a hash of the scene)
POPULAR = 5  # a chosen scene holds a product paired with at least this many scenes: products recur
MISSING = 0.2  # share of the needed images the server answers 404 for
HTML_PAGES = 2  # products answered with an HTML page and status 200
HANG_GUARD = 300  # seconds; only a hang guard for the subprocesses


def pick_pairs(stl: Path) -> tuple[list[dict], dict[str, str]]:
    """The pairs of SCENES[split] scenes per split, in signature order, among the scenes with at least two
    products of CATEGORIES, one of them paired with POPULAR scenes or more (as on real STL, popular
    products recur, so the popularity and product-disjoint rows of `ctl evaluate` both have examples).
    Returns the pairs (as read) and the categories of their products."""
    categories = json.loads((stl / "fashion-cat.json").read_text())
    by_scene: dict[str, list[dict]] = defaultdict(list)
    with open(stl / "fashion.json") as f:
        for line in f:
            pair = json.loads(line)
            if categories.get(pair["product"]) in CATEGORIES:
                by_scene[pair["scene"]].append(pair)
    scenes_of = Counter(p["product"] for pairs in by_scene.values() for p in pairs)
    taken: Counter = Counter()
    pairs: list[dict] = []
    for scene in sorted(by_scene):
        rows, split = by_scene[scene], split_of(scene)
        if (
            len(rows) >= 2
            and any(scenes_of[p["product"]] >= POPULAR for p in rows)
            and taken[split] < SCENES[split]
        ):
            taken[split] += 1
            pairs += rows
    assert taken == Counter(SCENES), taken
    return pairs, {p["product"]: categories[p["product"]] for p in pairs}


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def product_image(signature: str, side: int = 96) -> Image.Image:
    """A striped tile whose colours, angle and period follow from the signature."""
    rng = random.Random(signature)
    fg, bg = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
    image = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(image)
    period, slope = rng.choice((8, 12, 16)), rng.choice((-1, 0, 1))
    for x in range(-side, 2 * side, period):
        draw.line([(x, 0), (x + slope * side, side)], fill=fg, width=period // 2)
    return image


def scene_image(pairs: list[dict], products: dict[str, Image.Image], size=(120, 160)) -> Image.Image:
    """A portrait scene with each of its products' tiles pasted into its box."""
    rng = random.Random(pairs[0]["scene"])
    image = Image.new("RGB", size, tuple(rng.randrange(160, 256) for _ in range(3)))
    w, h = size
    for p in pairs:
        left, top, right, bottom = p["bbox"]
        box = (
            int(left * w),
            int(top * h),
            max(int(right * w), int(left * w) + 1),
            max(int(bottom * h), int(top * h) + 1),
        )
        image.paste(products[p["product"]].resize((box[2] - box[0], box[3] - box[1])), box[:2])
    return image


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: ImageServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        signature = self.path.removeprefix("/").removesuffix(".jpg")
        status, body, kind = self.server.answer(signature)
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ImageServer(ThreadingHTTPServer):
    """Serves `images` (signature -> JPEG) on loopback: 404 for `missing`, an HTML page for `html`."""

    daemon_threads = True

    def __init__(self, images: dict[str, bytes], missing: set[str], html: set[str]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.images, self.missing, self.html = images, missing, html
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def template(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{{s}}.jpg"

    def answer(self, signature: str) -> tuple[int, bytes, str]:
        with self.lock:
            self.requests[signature] += 1
        if signature in self.missing or signature not in self.images:
            return 404, b"<html><body>Not Found</body></html>", "text/html"
        if signature in self.html:
            return 200, b"<!DOCTYPE html><html><body>Please log in to see this pin</body></html>", "text/html"
        return 200, self.images[signature], "image/jpeg"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch) -> None:
    """httpx honours *_PROXY variables: a loopback test must not go through one."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def stl_folder(stl_dir, tmp_path) -> tuple[Path, list[dict], dict[str, str]]:
    data = tmp_path / "stl"
    data.mkdir()
    pairs, categories = pick_pairs(stl_dir)
    (data / "fashion.json").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (data / "fashion-cat.json").write_text(json.dumps(categories))
    return data, pairs, categories


class Clock:
    """Wall time of each step, printed at the end of the test."""

    def __init__(self):
        self.steps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, step: str) -> None:
        now = time.monotonic()
        self.steps[step] = now - self._last
        self._last = now


def test_real_data_path_from_metadata_to_a_served_recommendation(stl_folder, tmp_path, capsys):
    import torch

    from style_model.backbones import resnet50
    from style_model.data.examples import images_needed
    from style_model.data.stl import load_dataset

    data, pairs, categories = stl_folder
    clock = Clock()
    needed = images_needed(load_dataset(data))
    scene_pairs: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        scene_pairs[p["scene"]].append(p)
    tiles = {sig: product_image(sig) for sig in categories}
    images = {sig: _jpeg(tiles[sig]) for sig in needed if sig in tiles}
    images |= {sig: _jpeg(scene_image(scene_pairs[sig], tiles)) for sig in needed if sig in scene_pairs}
    assert set(images) == set(needed)
    # the server lacks a fifth of the needed images, chosen by hash, and shows a login page for two products
    by_hash = sorted(needed, key=lambda s: hashlib.sha256(s.encode()).digest())
    missing = set(by_hash[: int(MISSING * len(needed))])
    html = set([s for s in by_hash if s in categories and s not in missing][:HTML_PAGES])
    absent = missing | html  # what fetch-images cannot keep
    weights = tmp_path / "resnet50-0676ba61.pth"  # torchvision's file name; random values here
    torch.save(resnet50().state_dict(), weights)
    clock.lap("fixture: pairs, images, weights")

    # 1. fetch: 404s and HTML pages are counted, the rest lands in DIR/images
    server = ImageServer(images, missing, html)
    try:
        fetch = ["fetch-images", "--data", str(data), "--url-template", server.template]
        assert main([*fetch, "--rate", "0", "--timeout", "5"]) == 1  # 1: some failed
    finally:
        server.stop()
    clock.lap("fetch-images")
    assert server.requests == Counter(needed)  # once each: a 404 or an HTML page is not retried
    outcomes = Counter(
        json.loads(line)["outcome"] for line in (data / "fetch-report.jsonl").read_text().splitlines()
    )
    assert outcomes == {
        "downloaded": len(needed) - len(absent),
        "not_found": len(missing),
        "not_an_image": len(html),
    }
    printed = re.sub(r" +", " ", capsys.readouterr().out)
    assert f"not_found {len(missing)}\n" in printed and f"not_an_image {len(html)}\n" in printed
    present = {p.stem for p in (data / "images").glob("*.jpg")}
    assert present == set(needed) - absent
    image_bytes = sum(len(images[s]) for s in present)

    # 2. examples: the pairs whose scene or product is missing are skipped and counted
    assert main(["examples", "--data", str(data), "--report", str(tmp_path / "examples.json")]) == 0
    clock.lap("examples")
    printed = capsys.readouterr().out
    assert f"images needed: {len(needed)}" in printed
    report = json.loads((tmp_path / "examples.json").read_text())
    assert report["skipped_by_reason"]["missing image"] > 0 and report["unreadable_images"] == []
    assert set(report["missing_images"]) <= absent
    assert all(report["examples_by_split"][s] > 0 for s in SCENES)

    # 3. train the paper preset (frozen ResNet-50 from the weights file) on what is there
    run, repo = tmp_path / "run", tmp_path / "repo"
    train = [
        "train", "--data", str(data), "--out", str(run), "--preset", "paper", "--weights", str(weights),
        "--input-size", "64", "--grid", "2", "--embed-dim", "32", "--batch-size", "16", "--steps", "40",
        "--restarts", "0",  # random weights stay at chance: a restart would only double the time
    ]  # fmt: skip
    assert main(train) == 0
    clock.lap("train")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "done"
    info = json.loads((run / "run.json").read_text())
    assert info["resolved"]["preset"] == "paper" and info["resolved"]["weights_file"] == str(weights)
    assert info["resolved"]["model"]["backbone"] == "resnet50" and info["resolved"]["train_backbone"] is False

    # 4. evaluate on the test split: candidates are drawn among the products that have an image
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--split", "test"]) == 0
    clock.lap("evaluate")
    printed = capsys.readouterr().out
    assert "data gaps:" in printed and "training popularity" in printed and "product-disjoint" in printed
    result = json.loads((run / "eval-test.json").read_text())
    gaps = result["data_gaps"]
    assert gaps["missing_images"] == len(report["missing_images"]) > 0 and gaps["unreadable_images"] == 0
    assert gaps["skipped_by_reason"]["missing image"] == report["skipped_by_reason"]["missing image"]
    assert result["examples"] == report["examples_by_split"]["test"]
    assert 0 < result["product_disjoint_examples"] < result["examples"]  # some test products are popular
    assert {"training popularity", "random", "colour histograms + heads"} <= set(result["rows"])
    assert set(result["rows_product_disjoint"]) == set(result["rows"])

    # 5. export
    assert main(["export", "--run", str(run), "--out", str(repo)]) == 0
    clock.lap("export")
    exported = json.loads(capsys.readouterr().out)
    model_info = json.loads((repo / "model_info.json").read_text())
    assert model_info["preset"] == "paper" and model_info["config"]["backbone"] == "resnet50"

    # 6. serve: the encoder (in-process TorchScript) and the ranker (embedded Qdrant) as processes
    encoder = Process("serve-encoder", "--model-repo", str(repo), "--port", "0", "--metrics-port", "-1")
    ranker = None
    try:
        ranker = Process(
            "serve-ranker", "--encoder", encoder.address, "--port", "0", "--metrics-port", "-1",
            "--store-path", str(tmp_path / "store" / "{model_version}"),
        )  # fmt: skip
        wait_serving(ranker.address)
        clock.lap("serve (both SERVING)")

        # 7. ingest every categorised product: those whose image never arrived fail alone, NOT_FOUND
        catalog = tmp_path / "catalog.jsonl"
        rows = [
            {"product_id": sig, "category": cat, "image": f"images/{sig}.jpg", "metadata": {"source": "stl"}}
            for sig, cat in sorted(categories.items())
        ]
        catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
        job = run_ctl(
            "ingest", str(catalog), "--images", str(data), "--ranker", ranker.address, timeout=HANG_GUARD
        )
        clock.lap("ingest")
        assert job.returncode == 1, job.stdout + job.stderr  # 1: some records failed
        # not fetched: absent, or never needed (its only pair has too small a crop)
        lacking = {sig for sig in categories if sig not in present}
        assert lacking & absent and lacking <= absent | (set(categories) - set(needed))
        failed = [
            json.loads(line) for line in (tmp_path / "catalog.jsonl.errors.jsonl").read_text().splitlines()
        ]
        assert {f["product_id"] for f in failed} == lacking and {f["code"] for f in failed} == {"NOT_FOUND"}
        ingested = {sig: cat for sig, cat in categories.items() if sig in present}
        assert re.search(rf"ingested now\s+{len(ingested)}\n", job.stdout), job.stdout

        # 8. recommend for a held-out scene (test split, fetched) and the category of one of its products
        scene = next(
            p
            for p in pairs
            if split_of(p["scene"]) == "test" and p["scene"] in present and p["product"] in present
        )
        category = categories[scene["product"]]
        answer = run_ctl(
            "recommend", "--scene", str(data / "images" / f"{scene['scene']}.jpg"), "--category", category,
            "--limit", "5", "--ranker", ranker.address, timeout=HANG_GUARD,
        )  # fmt: skip
        clock.lap("recommend")
        assert answer.returncode == 0, answer.stdout + answer.stderr
        of_category = {sig for sig, cat in ingested.items() if cat == category}
        assert f"{category}: 5 of {len(of_category)} products" in answer.stdout
        ranked = re.findall(r"^\s+\d+\s+(\S+)\s+-?\d+\.\d+$", answer.stdout, re.MULTILINE)
        assert len(ranked) == 5 and set(ranked) <= of_category, answer.stdout
        assert f"model {exported['model_version']}" in answer.stdout
    finally:
        if ranker is not None:
            ranker.stop()
        encoder.stop()
    clock.lap("stop")
    print("\nsteps (s):", json.dumps({k: round(v, 1) for k, v in clock.steps.items()}))
    cache = next((run / "feature-cache").glob("features-*.npz"))
    with np.load(cache) as z:
        cached = len(z["keys"])
    sizes = {
        "pairs": len(pairs),
        "images_needed": len(needed),
        "fetched": len(present),
        "examples": report["examples_by_split"],
        "skipped": report["skipped_by_reason"],
        "negatives_redrawn": report["negatives_redrawn"],
        "product_disjoint_test_examples": result["product_disjoint_examples"],
        "ingested": len(ingested),
        "ingest_failed": len(failed),
        "image_bytes": image_bytes,
        "weights": disk(weights),
        "run": disk(run),
        "feature_cache": disk(cache),
        "feature_cache_entries": cached,
        "checkpoints": disk(run / "checkpoint.pt") + disk(run / "best.pt"),
        "repo": disk(repo),
        "store": disk(tmp_path / "store"),
    }
    print("counts and sizes (bytes on disk):", json.dumps(sizes))


def disk(path: Path) -> int:
    """Bytes a file or folder takes on disk (allocated blocks: a store's sparse files count what they use)."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_blocks * 512 for f in files)
