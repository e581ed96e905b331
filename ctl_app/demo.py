"""`ctl demo`: the whole system on generated data, on one machine, nothing else to start.

synthetic dataset -> train (resumes or reuses) -> evaluate -> export -> encoder + ranker on loopback with
the embedded Qdrant -> the demo catalog through `ctl ingest`'s job -> Recommend for held-out scenes ->
an HTML report. Every step reuses what an earlier demo left (dataset, trained run, ingested catalog).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from ctl.defaults import ENCODER_PORT, RANKER_PORT
from ctl.lifecycle import wait_for_signal
from ctl.v1 import ranker_pb2, ranker_pb2_grpc
from ctl_app.ingest.cli import run_against
from ctl_app.ingest.job import IngestConfig, format_summary
from ctl_app.local import local_services
from ctl_app.recommend import request, section
from ctl_app.report import write_report

log = logging.getLogger("ctl_app.demo")


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    scenes: int = 6000
    epochs: int | None = None
    max_examples: int | None = None
    seed_variant: bool = False
    weights: str | None = None  # torchvision's ResNet-50 checkpoint: the paper preset
    show_scenes: int = 4  # held-out scenes in the report
    limit: int = 5
    keep_running: bool = False
    encoder_port: int = 0  # with keep_running, 0 means the usual ports
    ranker_port: int = 0


def run_demo(config: DemoConfig) -> int:
    from ctl.progress import progress_bar
    from style_model.data.synth import SynthConfig, generate
    from style_model.evaluate import evaluate, format_table
    from style_model.export import export
    from style_model.train import TrainConfig, train

    root = config.out
    data, run, repo = root / "data", root / "run", root / "triton_repo"
    # generate() writes fashion.json, then fashion-cat.json: a dataset cut short has no category file
    if (data / "fashion.json").exists() and (data / "fashion-cat.json").exists():
        log.info("reusing the synthetic dataset in %s", data)
    else:
        log.info("step 1/6: synthetic dataset (%d scenes) -> %s", config.scenes, data)
        with progress_bar(config.scenes, "synth scenes", "scene") as bar:
            generate(data, SynthConfig(scenes=config.scenes), progress=bar.update)
    log.info("step 2/6: train -> %s (resumes or reuses an earlier run)", run)
    train_config = TrainConfig(epochs=config.epochs, max_examples=config.max_examples, weights=config.weights)
    summary = train(train_config, data, run)
    preset = f"{summary['resolved']['preset']} ({summary['resolved']['reason']})"
    log.info("preset: %s", preset)
    log.info("step 3/6: evaluate on the test split")
    result = evaluate(run, data, split="test", seed_variant=config.seed_variant)
    log.info("step 4/6: export -> %s", repo)
    exported = export(run, repo)
    print(format_table(result))
    print(f"\npreset: {preset}")
    print(f"run: {run}  (curves: {run / 'curves.png'}, evaluation: {run / 'eval-test.json'})")
    print(f"exported encoders: {repo}  (model version {exported['model_version']})")
    catalog = write_catalog(data, root / "catalog.jsonl")
    return asyncio.run(_serve(config, repo, catalog, data, preset))


def write_catalog(data: Path, path: Path) -> Path:
    """The demo catalog: every categorised product of the dataset that has an image, as JSON lines
    (products whose image file is missing are left out, and counted in a warning)."""
    from style_model.data.stl import load_dataset

    dataset = load_dataset(data)
    lines, missing = [], []
    for category, products in sorted(dataset.products_by_category.items()):
        for sig in products:
            image = dataset.image_path(sig)
            if not image.exists():
                missing.append(sig)
                continue
            row = {"product_id": sig, "category": category, "image": str(image.relative_to(path.parent))}
            lines.append(json.dumps({**row, "metadata": {"source": "synthetic"}}))
    if missing:
        log.warning(
            "demo catalog: %d products have no image file in %s (e.g. %s): left out of %s",
            len(missing),
            data,
            ", ".join(missing[:3]),
            path,
        )
    path.write_text("".join(line + "\n" for line in lines))
    return path


def held_out_scenes(data: Path, n: int) -> list[tuple[str, bytes, str, str]]:
    """Up to `n` test-split examples: (scene signature, cropped scene as JPEG, hidden product, category)."""
    from PIL import Image

    from style_model.data.examples import build_examples
    from style_model.data.images import crop_box
    from style_model.data.stl import load_dataset

    dataset = load_dataset(data)
    examples, _ = build_examples(dataset)
    chosen, seen = [], set()
    for e in examples:
        if e.split == "test" and e.scene not in seen:
            seen.add(e.scene)
            with Image.open(dataset.image_path(e.scene)) as im:
                part = im.convert("RGB").crop(crop_box(im.size, e.crop))
            buffer = io.BytesIO()
            part.save(buffer, "JPEG", quality=92)
            chosen.append((e.scene, buffer.getvalue(), e.positive, e.category))
            if len(chosen) == n:
                break
    return chosen


async def _serve(config: DemoConfig, repo: Path, catalog: Path, data: Path, preset: str) -> int:
    root = config.out
    encoder_port = config.encoder_port or (ENCODER_PORT if config.keep_running else 0)
    ranker_port = config.ranker_port or (RANKER_PORT if config.keep_running else 0)
    log.info(
        "step 5/6: encoder and ranker on loopback, embedded Qdrant in %s; ingest %s", root / "store", catalog
    )
    async with local_services(
        repo, str(root / "store" / "{model_version}"), encoder_port=encoder_port, ranker_port=ranker_port
    ) as services:
        summary = await run_against(IngestConfig(catalog=catalog), services.ranker_address)
        print(format_summary(IngestConfig(catalog=catalog), summary))
        if not summary.ok:
            log.error("the demo catalog did not ingest cleanly: see %s", catalog.name + ".errors.jsonl")
            return 1
        log.info("step 6/6: recommendations for %d held-out scenes", config.show_scenes)
        report = await _report(config, services.ranker_address, catalog, data, preset)
        print(f"\nreport: {report.resolve()}")
        if config.keep_running:
            await _wait_for_signal(services, catalog)
    return 0


async def _report(config: DemoConfig, ranker: str, catalog: Path, data: Path, preset: str) -> Path:
    from ctl_app.recommend import catalog_images

    images = catalog_images(catalog)
    scenes = await asyncio.to_thread(held_out_scenes, data, config.show_scenes)
    sections = []
    async with grpc.aio.insecure_channel(ranker) as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        stats = await stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest(), timeout=10)
        categories_all = sorted(stats.products_by_category)
        for scene_sig, scene, hidden, category in scenes:
            categories = [category, *(c for c in categories_all if c != category)]
            reply = await stub.Recommend(request(scene, categories, config.limit, explain=True), timeout=60)
            ranked = [p.product_id for p in reply.results[0].products]
            found = (
                f"ranked {ranked.index(hidden) + 1}" if hidden in ranked else f"not in the top {config.limit}"
            )
            notes = [
                f"held-out scene {scene_sig}, cropped so that its {category.rsplit('|', 1)[-1]} is hidden",
                f"the hidden product {hidden}: {found} of {stats.products_by_category[category]} "
                f"in {category}",
            ]
            sections.append(
                section(
                    f"Scene {scene_sig}",
                    scene,
                    reply,
                    images,
                    notes,
                    note_of={hidden: "the product hidden from the scene"}.get,
                )
            )
    footer = (
        f"ctl demo — model {stats.model_version}, preset {preset}; {stats.total_products} products "
        f"in {len(categories_all)} categories."
    )
    return write_report(config.out / "report.html", "Complete the look — demo", sections, footer)


async def _wait_for_signal(services, catalog: Path) -> None:
    scene = "SCENE.jpg"
    print(
        f"""
The services keep running (Ctrl-C stops them):
  encoder  {services.encoder_address}    ranker  {services.ranker_address}   store {services.store_path}
Try:
  grpcurl -plaintext {services.ranker_address} ctl.v1.RankerService/GetCatalogStats
  ctl recommend --ranker {services.ranker_address} --scene {scene} \\
      --category 'Apparel & Accessories|Shoes' --explain --html out.html --catalog {catalog}
""",
        flush=True,
    )
    await wait_for_signal()
    log.info("stopping the encoder and the ranker")
