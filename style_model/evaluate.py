"""`ctl evaluate`: FITB and HR@{1,5,10} of a run on a split, against baselines on the same candidates.

Rows: the model (hybrid distance), its global-only and local-only parts, random, raw backbone
features (cosine of pooled vectors), colour histograms through the same heads trained the same way
(does the model learn more than colour?), and, when asked, the seed tutorial's attention variant trained
the same way (what the paper-correct attention is worth). Baseline runs live in RUN/baselines/.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from style_model.bank import ImageBank, compute_features
from style_model.data.examples import build_examples
from style_model.data.stl import load_dataset
from style_model.embed import score_candidates
from style_model.errors import RunError
from style_model.protocol import FITB_NEGATIVES, HR_CANDIDATES, fitb_accuracy, hit_rates, sample_candidates
from style_model.train import TrainConfig, load_run, train

log = logging.getLogger(__name__)


def _baseline_run(run: Path, name: str, data: Path, overrides: dict) -> Path:
    """Train (or reuse) a baseline with the main run's settings and `overrides`."""
    info = json.loads((run / "run.json").read_text())
    resolved = info["resolved"]
    same_way = {k: resolved[k] for k in ("epochs", "batch_size", "lr")}
    same_way["input_size"] = resolved["model"]["input_size"]
    args = {**info["args"], **same_way, **overrides}
    target = run / "baselines" / name
    done = target / "run.json"
    if not (done.exists() and json.loads(done.read_text()).get("status") == "done"):
        log.info("training baseline %s in %s (same settings as the run, with %s)", name, target, overrides)
        train(TrainConfig(**args), data, target)
    return target


def _metrics(fitb: list[np.ndarray], hr: list[np.ndarray]) -> dict[str, float]:
    return {"fitb_accuracy": fitb_accuracy(fitb), **hit_rates(hr)}


def evaluate(
    run: Path | str,
    data: Path | str,
    split: str = "test",
    domain: str | None = None,
    seed_variant: bool = False,
    max_examples: int | None = None,
    seed: int = 0,
) -> dict:
    run, data = Path(run), Path(data)
    model, info = load_run(run)
    dataset = load_dataset(data, domain or info.get("args", {}).get("domain"))
    min_crop = info.get("args", {}).get("min_crop", 0.2)
    examples, report = build_examples(dataset, min_crop=min_crop, seed=info.get("args", {}).get("seed", 0))
    examples = [e for e in examples if e.split == split][:max_examples]
    if not examples:
        raise RunError(f"{data}: no {split} examples (skipped: {dict(report.skipped_by_reason)})")
    fitb = sample_candidates(examples, dataset, FITB_NEGATIVES, seed, f"{split}-fitb").products
    hr = sample_candidates(examples, dataset, HR_CANDIDATES - 1, seed, f"{split}-hr").products

    banks: dict[int, ImageBank] = {}  # decoded once per input size, shared by the model and baselines

    def scores_of(m, run_dir: Path, m_info: dict) -> tuple[dict, dict]:
        size = m.config.input_size
        if size not in banks:
            bank = ImageBank(dataset, size)
            for e in examples:
                bank.add(e.scene, e.crop)
            for p in {p for c in fitb + hr for p in c}:
                bank.add(p)
            bank.load()
            if bank.unreadable:
                sample = next(iter(bank.unreadable.values()))
                raise RunError(f"{len(bank.unreadable)} unreadable images, e.g. {sample}")
            banks[size] = bank
        frozen = not m_info.get("resolved", {}).get("train_backbone", True)
        features = compute_features(banks[size], m, run_dir / "feature-cache") if frozen else None
        return (
            score_candidates(m, banks[size], features, examples, fitb),
            score_candidates(m, banks[size], features, examples, hr),
        )

    rows: dict[str, dict[str, float]] = {}
    f_scores, h_scores = scores_of(model, run, info)
    name = f"model ({model.config.backbone}, hybrid)"
    rows[name] = _metrics(f_scores["hybrid"], h_scores["hybrid"])
    rows["model: global distance only"] = _metrics(f_scores["global"], h_scores["global"])
    rows["model: local distance only"] = _metrics(f_scores["local"], h_scores["local"])
    rows["raw backbone features (cosine)"] = _metrics(f_scores["raw"], h_scores["raw"])
    rng = np.random.default_rng(seed)
    rows["random"] = _metrics([rng.random(len(c)) for c in fitb], [rng.random(len(c)) for c in hr])

    baselines = {
        "colour histograms + heads": (
            "colorhist",
            {"backbone": "colorhist", "train_backbone": False, "weights": "none", "preset": "offline"},
        )
    }
    if seed_variant:
        baselines["seed attention (softmax of +distance)"] = ("seed-attention", {"attention": "seed"})
    for label, (folder, overrides) in baselines.items():
        base_dir = _baseline_run(run, folder, data, overrides)
        base_model, base_info = load_run(base_dir)
        bf, bh = scores_of(base_model, base_dir, base_info)
        rows[label] = _metrics(bf["hybrid"], bh["hybrid"])

    result = {
        "run": str(run),
        "split": split,
        "examples": len(examples),
        "hr_candidates": int(np.mean([len(c) for c in hr])),
        "model": model.config.to_dict(),
        "preset": info.get("resolved", {}).get("preset"),
        **rows[name],
        "rows": rows,
    }
    (run / f"eval-{split}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_table(result: dict) -> str:
    head = f"{'method':<42} {'FITB':>6} {'HR@1':>6} {'HR@5':>6} {'HR@10':>6}"
    lines = [
        f"{result['split']} split: {result['examples']} examples; "
        f"FITB: 1 true + {FITB_NEGATIVES} same-category negatives (chance {1 / (FITB_NEGATIVES + 1):.2f}); "
        f"HR@K among {result['hr_candidates']} candidates",
        head,
        "-" * len(head),
    ]
    for label, m in result["rows"].items():
        lines.append(
            f"{label:<42} {m['fitb_accuracy']:>6.3f} {m['hr@1']:>6.3f} {m['hr@5']:>6.3f} {m['hr@10']:>6.3f}"
        )
    return "\n".join(lines)


__all__ = ["evaluate", "format_table"]
