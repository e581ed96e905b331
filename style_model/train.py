"""`ctl train`: triplet training of the style model, resumable, budgeted in optimizer steps.

The budget is a number of optimizer steps (the one-cycle learning rate follows it), with a floor so that
small datasets train as long as large ones need to (`plan_budget`); validation FITB is measured ten times
per run, the best model is kept, training stops early when validation stops improving in the second half,
and a run still on the triplet loss's collapsed plateau at half the budget restarts with another seed.

Two modes: frozen backbone (the paper's; backbone outputs cached once, heads train many steps on the
cache) and end to end (`train_backbone`, with light augmentation). Presets: `paper` (ResNet-50 with
ImageNet weights, frozen, 224 px), `offline` (the small CNN, end to end, 96 px); `auto` picks `paper`
when ImageNet weights can be had and says loudly when it falls back to `offline`.

A run folder holds: run.json (settings, the preset decision, the budget and why), checkpoint.pt (latest:
model, optimizer, lr_scheduler, step, args, history), best.pt (best validation FITB), metrics.csv,
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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ctl.progress import progress_bar
from style_model.bank import FeatureBank, ImageBank, compute_features
from style_model.config import FIXED_BACKBONES, PRESETS, ModelConfig, TrainConfig
from style_model.data.examples import Example
from style_model.data.stl import Dataset, load_dataset
from style_model.embed import image_features, score_candidates
from style_model.errors import ConfigError, RunError
from style_model.model import StyleModel, hybrid_distance, hybrid_distance_matrix
from style_model.protocol import FITB_NEGATIVES, fitb_accuracy
from style_model.usable import CandidateSet, load_usable
from style_model.weights import IMAGENET_URLS, load_backbone_weights, resolve_imagenet

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Resolved:
    """A TrainConfig with the preset applied and the weights decision made."""

    preset: str
    reason: str
    model: ModelConfig
    weights_file: str | None
    train_backbone: bool
    batch_size: int
    lr: float


def resolve(cfg: TrainConfig) -> Resolved:
    """Apply the preset to the fields left unset (None); `auto` means `paper` if ImageNet weights can be
    had, else `offline`. `cfg`'s values were checked when it was built (TrainConfig)."""
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
    counts: dict  # skips, missing and unreadable images, redrawn negatives (usable.Usable.counts)


def prepare(cfg: TrainConfig, resolved: Resolved, model: StyleModel, data: Path, out: Path) -> Prepared:
    dataset = load_dataset(data, cfg.domain)

    def pick(examples: list[Example]) -> dict[str, list[Example]]:
        train = [e for e in examples if e.split == "train"]
        val = [e for e in examples if e.split == "val"]
        if cfg.max_examples:
            train = random.Random(cfg.seed).sample(train, min(cfg.max_examples, len(train)))
            val = val[: max(50, cfg.max_examples // 8)]
        return {"train": train, "val": val}

    usable = load_usable(
        dataset,
        resolved.model.input_size,
        pick,
        {"val-fitb": CandidateSet("val", FITB_NEGATIVES, cfg.seed, "val-fitb")},
        min_crop=cfg.min_crop,
        seed=cfg.seed,
        workers=cfg.workers,
    )
    train, val = usable.examples["train"], usable.examples["val"]
    report = usable.report
    report.write(out / "examples-report.json")
    if not train or not val:
        raise RunError(
            f"{data}: {len(train)} training and {len(val)} validation examples; need both "
            f"(skipped: {dict(report.skipped_by_reason)}; see {out / 'examples-report.json'})"
        )
    counts = usable.counts()
    log.info(
        "examples: %d train, %d val (from %d pairs; skipped %s; %d images missing, %d unreadable; "
        "%d negatives drawn again)",
        len(train),
        len(val),
        report.pairs,
        counts["skipped_by_reason"] or "none",
        counts["missing_images"],
        counts["unreadable_images"],
        counts["negatives_redrawn"],
    )
    features = None
    if not resolved.train_backbone:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "feature-cache"
        features = compute_features(usable.bank, model, cache)
        usable.bank.pixels = None  # the heads train on the features: 224 px pixels would only hold RAM
    return Prepared(dataset, usable.bank, features, train, val, usable.candidates["val-fitb"], counts)


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


def validate(model, prep: Prepared) -> tuple[float, float]:
    """Validation FITB with the model's own (hybrid) distance, and the spread of the distances (mean over
    examples of their standard deviation: near zero when every product looks alike to the model).
    Non-finite distances stop the run: a diverged model must never be kept as the best one."""
    scores = score_candidates(model, prep.bank, prep.features, prep.val, prep.val_candidates)
    bad = sum(1 for d in scores["hybrid"] if not np.isfinite(d).all())
    if bad:
        raise RunError(
            f"{bad} of {len(prep.val)} validation examples have non-finite (NaN/inf) distances: the model "
            "diverged; lower --lr or check the images"
        )
    return fitb_accuracy(scores["hybrid"]), float(np.mean([d.std() for d in scores["hybrid"]]))


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long a run trains, in optimizer steps, and why; validation and early stopping by steps."""

    steps: int
    steps_per_epoch: int
    eval_every: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_budget(cfg: TrainConfig, resolved: Resolved, train_examples: int) -> Budget:
    """Steps from --steps, else --epochs, else the preset's epochs with a floor of the preset's
    `min_steps`: a small dataset gets as many steps as a large one needs to leave the triplet loss's
    collapsed plateau (a few hundred steps on our data), not a fixed number of epochs."""
    spe = max(1, train_examples // resolved.batch_size)
    p = PRESETS[resolved.preset]
    if cfg.steps:
        steps, why = cfg.steps, f"--steps {cfg.steps}"
    elif cfg.epochs:
        steps, why = cfg.epochs * spe, f"--epochs {cfg.epochs} of {spe} steps"
    else:
        by_epochs = p["epochs"] * spe
        steps = max(p["min_steps"], by_epochs)
        why = (
            f"the preset's {p['epochs']} epochs of {spe} steps"
            if steps == by_epochs
            else f"the preset's minimum of {p['min_steps']} steps ({p['epochs']} epochs of {spe} steps "
            f"would be only {by_epochs}: a small dataset needs as many steps, not epochs, as a large one)"
        )
    eval_every = cfg.eval_every or (spe if cfg.epochs and not cfg.steps else math.ceil(steps / 10))
    return Budget(steps, spe, min(eval_every, steps), why)


def collapsed(margin: float, val_fitb: float, chance: float, spread: float) -> bool:
    """The triplet loss's collapsed plateau: the embeddings bunch up until every distance is about the same
    (their spread well under the margin, so the loss sits near the margin) and the model ranks at chance."""
    return spread < 0.5 * margin and val_fitb < chance + 0.05


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(steps, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("triplet loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(steps, [h["val_fitb"] for h in history], "s-", color="tab:orange", label="val FITB")
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


class _Attempt:
    """Model, optimizer and one-cycle schedule of one attempt (a restart after a collapse is another)."""

    def __init__(self, resolved: Resolved, cfg: TrainConfig, budget: Budget, number: int, first: StyleModel):
        self.number = number
        if number == 0:
            self.model = first
        else:
            torch.manual_seed(cfg.seed + 7919 * number)
            self.model = build_model(resolved)
            if not resolved.train_backbone:  # the feature cache holds the first backbone's features
                self.model.backbone.load_state_dict(first.backbone.state_dict())
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=resolved.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=resolved.lr, total_steps=budget.steps, pct_start=0.15
        )

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "attempt": self.number,
        }

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["lr_scheduler"])


# 1: budgets in epochs; 2: step budgets; 3: the data, examples and budget recorded (checked on resume)
CHECKPOINT_FORMAT = 3


def _load_checkpoint(path: Path, cfg: TrainConfig, out: Path) -> dict | None:
    if not path.exists():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{out} holds a run of an older ctl (checkpoint format); use --fresh or another --out")
    if checkpoint["args"] != cfg.to_dict():
        changed = sorted(k for k, v in cfg.to_dict().items() if checkpoint["args"].get(k) != v)
        raise RunError(
            f"{out} holds a run with other settings ({', '.join(changed)}); use --fresh or another --out"
        )
    return checkpoint


def train(cfg: TrainConfig, data: Path | str, out: Path | str, fresh: bool = False) -> dict:
    """Train (or resume) a run; returns the summary written to run.json."""
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    checkpoint = None if fresh else _load_checkpoint(checkpoint_path, cfg, out)
    if checkpoint is None:
        resolved = resolve(cfg)
    else:  # the decision is part of the run: never re-decide on resume
        resolved = Resolved(
            **{**checkpoint["resolved"], "model": ModelConfig.from_dict(checkpoint["resolved"]["model"])}
        )
        log.info("resuming %s at step %d", out, checkpoint["step"])
    log.info("preset %s (%s); %s", resolved.preset, resolved.reason, resolved.model)
    finished = out / "run.json"
    if checkpoint is not None and checkpoint.get("stopped") and finished.exists():
        summary = json.loads(finished.read_text())
        if summary.get("status") == "done":
            log.info("%s is already trained (%s): nothing to do", out, checkpoint["stopped"])
            return summary
    torch.manual_seed(cfg.seed)
    first = build_model(resolved)
    prep = prepare(cfg, resolved, first, data, out)
    budget = plan_budget(cfg, resolved, len(prep.train))
    log.info(
        "budget: %d optimizer steps of %d examples (%s), about %.1f epochs; validation every %d steps; "
        "early stop after %d validations without gain once half the budget is done%s",
        budget.steps,
        resolved.batch_size,
        budget.reason,
        budget.steps / budget.steps_per_epoch,
        budget.eval_every,
        cfg.patience,
        f"; at most {cfg.max_minutes:g} min" if cfg.max_minutes is not None else "",
    )
    examples = {"train": len(prep.train), "val": len(prep.val)}
    if checkpoint is not None:
        was = (checkpoint["data"], checkpoint["examples"], checkpoint["budget"])
        now = (str(data.resolve()), examples, budget.to_dict())
        if was != now:
            raise RunError(
                f"{out} was trained on {was[0]} ({was[1]['train']} training examples, {was[2]['steps']} "
                f"steps) and the data is now {now[0]} ({now[1]['train']} examples, {now[2]['steps']} steps): "
                "a resumed run must see the same examples; use --fresh or another --out"
            )
    attempt = _Attempt(resolved, cfg, budget, checkpoint["attempt"] if checkpoint else 0, first)
    history: list[dict] = []
    step, total, best, since_best, elapsed, stopped = 0, 0, -1.0, 0, 0.0, ""
    if checkpoint is not None:
        attempt.load(checkpoint)
        history, step, elapsed = checkpoint["history"], checkpoint["step"], checkpoint["seconds"]
        best, since_best, total = checkpoint["best"], checkpoint["since_best"], checkpoint["total_steps"]
        stopped = checkpoint["stopped"]  # killed after its last checkpoint: nothing left to train
        torch.set_rng_state(checkpoint["rng"])
    resolved_dict = {**dataclasses.asdict(resolved), "model": resolved.model.to_dict()}
    summary: dict[str, Any] = {
        "args": cfg.to_dict(),
        "resolved": resolved_dict,
        "budget": budget.to_dict(),
        "data": str(data.resolve()),
        "examples": examples,
        "data_gaps": prep.counts,
    }
    finished.write_text(json.dumps({**summary, "status": "training"}, indent=1) + "\n")
    chance = float(np.mean([1.0 / len(c) for c in prep.val_candidates]))
    aug = augment if resolved.train_backbone and cfg.augment else None
    window: list[float] = []
    satisfied: list[float] = []
    t0 = time.time() - elapsed
    with progress_bar(budget.steps, "train", "step") as bar:
        bar.update(step)
        while not stopped:  # a run killed after its last checkpoint resumes stopped: it only finishes
            epoch, position = divmod(step, budget.steps_per_epoch)
            rng = random.Random(cfg.seed * 1000 + epoch + 100_003 * attempt.number)
            for batch in make_batches(prep.train, resolved.batch_size, rng)[position:]:
                attempt.model.train()
                if not resolved.train_backbone:
                    attempt.model.backbone.eval()
                loss, sat = triplet_loss(attempt.model, prep, batch, cfg.margin, aug)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise RunError(
                        f"step {step + 1}: the triplet loss is {value}: the model diverged; lower --lr "
                        f"(now {resolved.lr:g}) or check the images; the best model so far is in "
                        f"{out / 'best.pt'}"
                    )
                attempt.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                attempt.optimizer.step()
                attempt.scheduler.step()
                step += 1
                total += 1
                window.append(value)
                satisfied.append(sat)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
                over_time = cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes
                if step % budget.eval_every and step < budget.steps and not over_time:
                    continue
                val_fitb, spread = validate(attempt.model, prep)
                row = {
                    "step": step,
                    "epoch": round(step / budget.steps_per_epoch, 2),
                    "attempt": attempt.number,
                    "lr": attempt.scheduler.get_last_lr()[0],
                    "train_loss": sum(window) / len(window),
                    "train_triplets_ok": sum(satisfied) / len(satisfied),
                    "val_fitb": val_fitb,
                    "val_spread": spread,
                    "seconds": round(time.time() - t0, 1),
                }
                window, satisfied = [], []
                history.append(row)
                log.info(
                    "step %d/%d (epoch %.1f)  loss %.4f  val FITB %.4f  (%.0f s)",
                    step,
                    budget.steps,
                    row["epoch"],
                    row["train_loss"],
                    val_fitb,
                    row["seconds"],
                )
                if val_fitb > best:
                    best, since_best = val_fitb, 0
                    _atomic_save(
                        {
                            "model": attempt.model.state_dict(),
                            "config": resolved.model.to_dict(),
                            "step": step,
                            "attempt": attempt.number,
                            "val_fitb": val_fitb,
                        },
                        out / "best.pt",
                    )
                else:
                    since_best += 1
                flat = collapsed(cfg.margin, val_fitb, chance, spread)
                if flat:
                    log.warning(
                        "step %d: on the triplet loss's collapsed plateau (loss %.4f ~ margin %g, distance "
                        "spread %.3f, val FITB %.3f ~ chance %.2f); runs usually leave it after a few "
                        "hundred steps",
                        step,
                        row["train_loss"],
                        cfg.margin,
                        spread,
                        val_fitb,
                        chance,
                    )
                if step >= budget.steps:
                    stopped = "budget"
                elif over_time:
                    stopped = f"time budget of {cfg.max_minutes:g} min"
                elif step >= budget.steps // 2 and since_best >= cfg.patience:
                    stopped = f"early stop: no gain in {since_best} validations (best {best:.4f})"
                if flat and step >= budget.steps // 2 and attempt.number < cfg.restarts and not over_time:
                    log.warning(
                        "still collapsed at half the budget: restarting with another seed (attempt %d of %d)",
                        attempt.number + 2,
                        cfg.restarts + 1,
                    )
                    attempt = _Attempt(resolved, cfg, budget, attempt.number + 1, first)
                    step, stopped, since_best = 0, "", 0  # best.pt stays the best of every attempt
                    bar.reset()
                _atomic_save(
                    {
                        **attempt.state(),
                        "format": CHECKPOINT_FORMAT,
                        "step": step,
                        "total_steps": total,
                        "args": cfg.to_dict(),
                        "resolved": resolved_dict,
                        "data": str(data.resolve()),
                        "examples": examples,
                        "budget": budget.to_dict(),
                        "history": history,
                        "best": best,
                        "since_best": since_best,
                        "seconds": time.time() - t0,
                        "rng": torch.get_rng_state(),
                        "stopped": stopped,
                    },
                    checkpoint_path,
                )
                with open(out / "metrics.csv", "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(history[0]))
                    writer.writeheader()
                    writer.writerows(history)
                _plot(history, out / "curves.png")
                if stopped or step == 0:
                    break
    at_chance = best < chance + 0.05
    summary.update(
        status="done",
        stopped=stopped,
        best_val_fitb=best,
        chance=chance,
        at_chance=at_chance,
        steps_run=total,
        attempts=attempt.number + 1,
        train_seconds=round(time.time() - t0, 1),
    )
    finished.write_text(json.dumps(summary, indent=1) + "\n")
    log.info("stopped: %s; best validation FITB %.4f", stopped, best)
    if at_chance:
        log.error(
            "the model ranks at chance (best validation FITB %.3f, chance %.2f) after %d attempt(s): it is "
            "saved, but do not serve it. Try more steps (--steps), another --lr or --seed, or check that "
            "the data holds a learnable signal.",
            best,
            chance,
            attempt.number + 1,
        )
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
