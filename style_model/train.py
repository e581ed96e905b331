"""`ctl train`: triplet training of the style model, resumable, with validation FITB every epoch.

Two modes: frozen backbone (the paper's; backbone outputs cached once, heads train many epochs on the
cache) and end to end (`train_backbone`, with light augmentation). Presets: `paper` (ResNet-50 with
ImageNet weights, frozen, 224 px), `offline` (the small CNN, end to end, 96 px); `auto` picks `paper`
when ImageNet weights can be had and says loudly when it falls back to `offline`.

A run folder holds: run.json (settings and the preset decision), checkpoint.pt (latest: model,
optimizer, lr_scheduler, epoch, args, history), best.pt (best validation FITB), metrics.csv,
curves.png, examples-report.json (what the example builder skipped and why).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ctl.progress import progress_bar
from style_model.backbones import FIXED_BACKBONES
from style_model.bank import FeatureBank, ImageBank, compute_features
from style_model.config import ModelConfig
from style_model.data.examples import Example, build_examples
from style_model.data.stl import Dataset, load_dataset
from style_model.embed import image_features, score_candidates
from style_model.errors import ConfigError, RunError
from style_model.model import StyleModel, hybrid_distance, hybrid_distance_matrix
from style_model.protocol import FITB_NEGATIVES, fitb_accuracy, sample_candidates
from style_model.weights import IMAGENET_URLS, load_backbone_weights, resolve_imagenet

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        backbone="resnet50", input_size=224, train_backbone=False, epochs=30, batch_size=128, lr=1e-3
    ),
    "offline": dict(backbone="small", input_size=96, train_backbone=True, epochs=8, batch_size=64, lr=2e-3),
}


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; None means "the preset's value"."""

    preset: str = "auto"
    backbone: str | None = None
    weights: str | None = None  # a torchvision checkpoint file, "imagenet", "none", or None (the preset's)
    input_size: int | None = None
    train_backbone: bool | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 1e-4
    margin: float = 0.2
    grid: int = 4
    embed_dim: int = 128
    attention: str = "paper"
    augment: bool = True
    min_crop: float = 0.2
    seed: int = 0
    workers: int = 2
    domain: str | None = None
    max_examples: int | None = None  # cap on training examples (quick runs, tests)
    cache_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Resolved:
    """A TrainConfig with the preset applied and the weights decision made."""

    preset: str
    reason: str
    model: ModelConfig
    weights_file: str | None
    train_backbone: bool
    epochs: int
    batch_size: int
    lr: float


def resolve(cfg: TrainConfig) -> Resolved:
    """Apply the preset; `auto` means `paper` if ImageNet weights can be had, else `offline`."""
    if cfg.preset not in ("auto", *PRESETS):
        raise ConfigError(f"preset={cfg.preset!r}: expected auto, {', '.join(PRESETS)}")
    preset, reason, weights_file = cfg.preset, f"preset {cfg.preset!r} asked for", None
    wants_imagenet = cfg.weights not in ("none",)
    if cfg.preset == "auto":
        backbone = cfg.backbone or PRESETS["paper"]["backbone"]
        found, how = resolve_imagenet(backbone, cfg.weights) if wants_imagenet else (None, "--weights none")
        if found is not None:
            preset, reason, weights_file = "paper", f"ImageNet weights found: {how}", str(found)
        else:
            preset, reason = "offline", f"no ImageNet weights ({how}): training the small CNN end to end"
            log.warning("=" * 78)
            log.warning("PRESET auto -> offline: %s", reason)
            log.warning(
                "Give torchvision's ResNet-50 checkpoint with --weights FILE for the paper's setting."
            )
            log.warning("=" * 78)
    p = PRESETS[preset]
    backbone = cfg.backbone or p["backbone"]
    # ImageNet weights: asked for with --weights, or implied by the paper preset
    wanted = cfg.weights if cfg.weights is not None else ("imagenet" if preset == "paper" else "none")
    if weights_file is None and wanted != "none":
        if backbone not in IMAGENET_URLS:
            raise ConfigError(f"--weights {wanted}: backbone {backbone!r} has no ImageNet checkpoint")
        found, how = resolve_imagenet(backbone, wanted)
        if found is None:
            raise ConfigError(f"{backbone} needs ImageNet weights ({how}); try --preset offline")
        weights_file = str(found)
    train_backbone = p["train_backbone"] if cfg.train_backbone is None else cfg.train_backbone
    if backbone in FIXED_BACKBONES:
        train_backbone = False
    model = ModelConfig(
        backbone=backbone,
        input_size=cfg.input_size or p["input_size"],
        grid=cfg.grid,
        embed_dim=cfg.embed_dim,
        attention=cfg.attention,
    )
    return Resolved(
        preset=preset,
        reason=reason,
        model=model,
        weights_file=weights_file,
        train_backbone=train_backbone,
        epochs=cfg.epochs or p["epochs"],
        batch_size=cfg.batch_size or p["batch_size"],
        lr=cfg.lr or p["lr"],
    )


def augment(x: Tensor) -> Tensor:
    """Light augmentation on [B, 3, S, S] in [0, 1]: small shifts and scales, brightness/contrast.
    No flips: mirrored diagonal patterns are different patterns."""
    b = x.shape[0]
    scale = torch.empty(b).uniform_(0.9, 1.1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = torch.empty(b, 2).uniform_(-0.06, 0.06)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = torch.empty(b, 1, 1, 1).uniform_(0.85, 1.15)
    contrast = torch.empty(b, 1, 1, 1).uniform_(0.85, 1.15)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean * brightness).clamp_(0, 1)


@dataclasses.dataclass
class Prepared:
    """Everything an epoch needs: examples per split as bank indices, and the bank itself."""

    dataset: Dataset
    bank: ImageBank
    features: FeatureBank | None
    train: list[Example]
    val: list[Example]
    val_candidates: list[list[str]]


def prepare(cfg: TrainConfig, resolved: Resolved, model: StyleModel, data: Path, out: Path) -> Prepared:
    dataset = load_dataset(data, cfg.domain)
    examples, report = build_examples(dataset, min_crop=cfg.min_crop, seed=cfg.seed)
    train = [e for e in examples if e.split == "train"]
    val = [e for e in examples if e.split == "val"]
    if cfg.max_examples:
        train = random.Random(cfg.seed).sample(train, min(cfg.max_examples, len(train)))
        val = val[: max(50, cfg.max_examples // 8)]
    if not train or not val:
        report.write(out / "examples-report.json")
        raise RunError(
            f"{data}: {len(train)} training and {len(val)} validation examples; need both "
            f"(skipped: {dict(report.skipped_by_reason)}; see {out / 'examples-report.json'})"
        )
    val_candidates = sample_candidates(val, dataset, FITB_NEGATIVES, cfg.seed, "val-fitb").products
    bank = ImageBank(dataset, resolved.model.input_size)
    for e in train:
        bank.add(e.scene, e.crop), bank.add(e.positive), bank.add(e.negative)
    for e, cands in zip(val, val_candidates):
        bank.add(e.scene, e.crop)
        for c in cands:
            bank.add(c)
    bank.load(cfg.workers)
    if bank.unreadable:  # an unreadable image drops the examples that need it; the report lists both
        bad = set(bank.unreadable)
        report.missing_images += sorted(bad)
        for e in [e for e in train + val if {e.scene, e.positive, e.negative} & bad]:
            report.skipped.append((f"{e.scene}/{e.positive}", "unreadable image"))
        keep = [(e, c) for e, c in zip(val, val_candidates) if not ({e.scene, *c} & bad)]
        train = [e for e in train if not ({e.scene, e.positive, e.negative} & bad)]
        val, val_candidates = [k[0] for k in keep], [k[1] for k in keep]
    report.write(out / "examples-report.json")
    log.info(
        "examples: %d train, %d val (from %d pairs; skipped %s)",
        len(train),
        len(val),
        report.pairs,
        dict(report.skipped_by_reason) or "none",
    )
    features = None
    if not resolved.train_backbone:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "feature-cache"
        features = compute_features(bank, model, cache)
    return Prepared(dataset, bank, features, train, val, val_candidates)


def triplet_loss(
    model: StyleModel, prep: Prepared, batch: list[Example], margin: float, aug=None
) -> tuple[Tensor, float]:
    """Triplet loss max(0, d(s, p+) - d(s, p-) + margin) over the example's own negative and, for more
    signal per backbone pass, every other same-category product of the batch that is not in the scene."""
    attention = model.config.attention
    scenes = [prep.bank.index[(e.scene, e.crop)] for e in batch]
    products = [prep.bank.index[(e.positive, None)] for e in batch] + [
        prep.bank.index[(e.negative, None)] for e in batch
    ]
    regions, _, pooled = image_features(model, prep.bank, prep.features, scenes, "scene", aug)
    f_s, f_i, h_i = model.heads.scene(regions, pooled)
    _, map_mean, pooled_p = image_features(model, prep.bank, prep.features, products, "product", aug)
    f_p, c_p = model.heads.product(map_mean, pooled_p)
    b = len(batch)
    d_pos, _, _ = hybrid_distance(f_s, f_i, h_i, f_p[:b], c_p[:b], attention)
    d_all = hybrid_distance_matrix(f_s, f_i, h_i, f_p, c_p, attention)  # [B, 2B]
    sigs = [e.positive for e in batch] + [e.negative for e in batch]
    cats = [e.category for e in batch] * 2
    mask = torch.tensor(
        [
            [
                cats[j] == e.category
                and sigs[j] != e.positive
                and sigs[j] not in prep.dataset.products_in_scene[e.scene]
                for j in range(2 * b)
            ]
            for e in batch
        ]
    )
    hinge = F.relu(d_pos[:, None] - d_all + margin)
    loss = hinge[mask].mean()
    own = F.relu(d_pos - d_all[torch.arange(b), torch.arange(b) + b] + margin)
    return loss, float((own == 0).float().mean())


def make_batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffled batches of mixed categories (batches of one category each were tried: no better)."""
    order = list(examples)
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)] or [order]


def train_one_epoch(
    model, prep, optimizer, scheduler, epoch: int, resolved: Resolved, cfg: TrainConfig
) -> dict:
    model.train()
    if not resolved.train_backbone:
        model.backbone.eval()
    batches = make_batches(prep.train, resolved.batch_size, random.Random(cfg.seed * 1000 + epoch))
    aug = augment if resolved.train_backbone and cfg.augment else None
    total, satisfied = 0.0, 0.0
    with progress_bar(len(batches), f"epoch {epoch + 1}/{resolved.epochs}", "batch") as bar:
        for batch in batches:
            loss, sat = triplet_loss(model, prep, batch, cfg.margin, aug)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            total += value
            satisfied += sat
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    return {"train_loss": total / len(batches), "train_triplets_ok": satisfied / len(batches)}


def validate(model, prep: Prepared) -> float:
    """Validation FITB with the model's own (hybrid) distance."""
    scores = score_candidates(model, prep.bank, prep.features, prep.val, prep.val_candidates)
    return fitb_accuracy(scores["hybrid"])


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("triplet loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [h["val_fitb"] for h in history], "s-", color="tab:orange", label="val FITB")
    ax2.axhline(0.25, color="grey", linestyle=":", linewidth=1)
    ax2.set_ylabel("validation FITB (chance 0.25)", color="tab:orange")
    ax2.set_ylim(0, 1)
    fig.suptitle("ctl train")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def build_model(resolved: Resolved) -> StyleModel:
    model = StyleModel(resolved.model).to(memory_format=torch.channels_last)
    if resolved.weights_file:
        load_backbone_weights(model.backbone, Path(resolved.weights_file))
    if not resolved.train_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return model


def train(cfg: TrainConfig, data: Path | str, out: Path | str, fresh: bool = False) -> dict:
    """Train (or resume) a run; returns the summary written to run.json."""
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    checkpoint_path = out / "checkpoint.pt"
    checkpoint = None
    if checkpoint_path.exists() and not fresh:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if checkpoint["args"] != cfg.to_dict():
            changed = sorted(k for k, v in cfg.to_dict().items() if checkpoint["args"].get(k) != v)
            raise RunError(
                f"{out} holds a run with other settings ({', '.join(changed)}); use --fresh or another --out"
            )
        log.info("resuming %s after epoch %d", out, checkpoint["epoch"] + 1)
    if checkpoint is None:
        resolved = resolve(cfg)
    else:  # the decision is part of the run: never re-decide on resume
        resolved = Resolved(
            **{**checkpoint["resolved"], "model": ModelConfig.from_dict(checkpoint["resolved"]["model"])}
        )
    log.info("preset %s (%s); %s", resolved.preset, resolved.reason, resolved.model)
    finished = out / "run.json"
    if checkpoint is not None and checkpoint["epoch"] + 1 >= resolved.epochs and finished.exists():
        summary = json.loads(finished.read_text())
        if summary.get("status") == "done":
            log.info("%s is already trained (%d epochs): nothing to do", out, resolved.epochs)
            return summary
    model = build_model(resolved)
    prep = prepare(cfg, resolved, model, data, out)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=resolved.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(prep.train) // resolved.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=resolved.lr, total_steps=resolved.epochs * steps_per_epoch, pct_start=0.15
    )
    history: list[dict] = []
    start_epoch, best = 0, -1.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["lr_scheduler"])
        history, start_epoch = checkpoint["history"], checkpoint["epoch"] + 1
        best = max((h["val_fitb"] for h in history), default=-1.0)
    resolved_dict = {**dataclasses.asdict(resolved), "model": resolved.model.to_dict()}
    summary = {
        "args": cfg.to_dict(),
        "resolved": resolved_dict,
        "data": str(data.resolve()),
        "examples": {"train": len(prep.train), "val": len(prep.val)},
    }
    (out / "run.json").write_text(json.dumps({**summary, "status": "training"}, indent=1) + "\n")
    for epoch in range(start_epoch, resolved.epochs):
        t0 = time.time()
        stats = train_one_epoch(model, prep, optimizer, scheduler, epoch, resolved, cfg)
        val_fitb = validate(model, prep)
        row = {"epoch": epoch + 1, **stats, "val_fitb": val_fitb, "seconds": round(time.time() - t0, 1)}
        history.append(row)
        log.info(
            "epoch %d/%d  loss %.4f  val FITB %.4f  (%.0f s)",
            epoch + 1,
            resolved.epochs,
            stats["train_loss"],
            val_fitb,
            row["seconds"],
        )
        if val_fitb > best:
            best = val_fitb
            _atomic_save(
                {
                    "model": model.state_dict(),
                    "config": resolved.model.to_dict(),
                    "epoch": epoch,
                    "val_fitb": val_fitb,
                },
                out / "best.pt",
            )
        _atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "args": cfg.to_dict(),
                "resolved": resolved_dict,
                "history": history,
            },
            checkpoint_path,
        )
        with open(out / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
        _plot(history, out / "curves.png")
    summary.update(
        status="done",
        best_val_fitb=best,
        epochs_run=len(history),
        train_seconds=round(sum(h["seconds"] for h in history), 1),
    )
    (out / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
    if math.isnan(best):
        raise RunError("validation FITB is NaN: no validation examples could be scored")
    return summary


def load_run(run: Path | str) -> tuple[StyleModel, dict]:
    """The best model of a finished (or interrupted) run, in eval mode, and its run.json."""
    run = Path(run)
    if not (run / "best.pt").exists():
        raise RunError(f"{run}: no best.pt (train first: ctl train --out {run})")
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    model = StyleModel(ModelConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    model.eval()
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    return model, info


__all__ = ["PRESETS", "TrainConfig", "load_run", "resolve", "train"]
