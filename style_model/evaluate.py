"""`ctl evaluate`: FITB and HR@{1,5,10} of a run on a split, against baselines on the same candidates.

Rows: the model (hybrid distance), its global-only and local-only parts, random, training popularity
(how often a product is a training positive: the leakage baseline), raw backbone features (cosine of
pooled vectors), colour histograms through the same heads trained the same way
(does the model learn more than colour?), and, when asked, the seed tutorial's attention variant trained
the same way (what the paper-correct attention is worth). Baseline runs live in RUN/baselines/.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from style_model.bank import ImageBank, compute_features
from style_model.data.examples import Example
from style_model.data.stl import load_dataset
from style_model.embed import score_candidates
from style_model.errors import RunError
from style_model.protocol import FITB_NEGATIVES, HR_CANDIDATES, HR_KS, fitb_accuracy, hit_rates
from style_model.train import TrainConfig, load_run, train
from style_model.usable import CandidateSet, load_usable

log = logging.getLogger(__name__)


def _baseline_run(run: Path, name: str, data: Path, overrides: dict) -> Path:
    """Train (or reuse) a baseline with the main run's settings and `overrides`: the same number of
    optimizer steps, batch size, learning rate and input size."""
    info = json.loads((run / "run.json").read_text())
    resolved = info["resolved"]
    same_way = {k: resolved[k] for k in ("batch_size", "lr")}
    same_way["input_size"] = resolved["model"]["input_size"]
    if "budget" in info:
        same_way.update(steps=info["budget"]["steps"], epochs=None)
    else:  # a run from before step budgets trained the preset's (or its own) number of epochs
        same_way.update(steps=None, epochs=resolved.get("epochs"))
    args = {**info["args"], **same_way, **overrides}
    target = run / "baselines" / name
    done = target / "run.json"
    if not (done.exists() and json.loads(done.read_text()).get("status") == "done"):
        log.info("training baseline %s in %s (same settings as the run, with %s)", name, target, overrides)
        train(TrainConfig(**args), data, target)
    return target


def _metrics(fitb: list[np.ndarray], hr: list[np.ndarray]) -> dict[str, float | None]:
    """FITB and HR@K; None (JSON null, never NaN) when there is no example to score."""
    if not fitb:
        return {"fitb_accuracy": None, **{f"hr@{k}": None for k in HR_KS}}
    return {"fitb_accuracy": fitb_accuracy(fitb), **hit_rates(hr)}


def popularity(examples: list[Example]) -> Counter:
    """How often each product is the true product of a training example: what a scorer that knows only
    training popularity ranks by (on Shop The Look, many test positives are popular training products)."""
    return Counter(e.positive for e in examples if e.split == "train")


def evaluate(
    run: Path | str,
    data: Path | str,
    split: str = "test",
    domain: str | None = None,
    seed_variant: bool = False,
    max_examples: int | None = None,
    seed: int = 0,
    baselines: bool = True,
) -> dict:
    """Every row on the same candidates, over all examples of `split` and over its product-disjoint part
    (true products never seen in training: what is left once memorised popularity cannot help)."""
    run, data = Path(run), Path(data)
    model, info = load_run(run)
    args = info.get("args", {})
    dataset = load_dataset(data, domain or args.get("domain"))
    every: list[Example] = []

    def pick(examples: list[Example]) -> dict[str, list[Example]]:
        every[:] = examples
        return {split: [e for e in examples if e.split == split][:max_examples]}

    usable = load_usable(
        dataset,
        model.config.input_size,
        pick,
        {
            "fitb": CandidateSet(split, FITB_NEGATIVES, seed, f"{split}-fitb"),
            "hr": CandidateSet(split, HR_CANDIDATES - 1, seed, f"{split}-hr"),
        },
        min_crop=args.get("min_crop", 0.2),
        seed=args.get("seed", 0),
    )
    examples, fitb, hr = usable.examples[split], usable.candidates["fitb"], usable.candidates["hr"]
    if not examples:
        raise RunError(f"{data}: no {split} examples (skipped: {dict(usable.report.skipped_by_reason)})")
    banks: dict[int, ImageBank] = {model.config.input_size: usable.bank}  # shared by model and baselines

    def scores_of(m, run_dir: Path, m_info: dict) -> tuple[dict, dict]:
        size = m.config.input_size
        if size not in banks:
            bank = ImageBank(dataset, size)
            for key in usable.bank.keys:
                bank.add(*key)
            bank.load()
            banks[size] = bank
        frozen = not m_info.get("resolved", {}).get("train_backbone", True)
        features = compute_features(banks[size], m, run_dir / "feature-cache") if frozen else None
        return (
            score_candidates(m, banks[size], features, examples, fitb),
            score_candidates(m, banks[size], features, examples, hr),
        )

    scores: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    f_scores, h_scores = scores_of(model, run, info)
    name = f"model ({model.config.backbone}, hybrid)"
    scores[name] = f_scores["hybrid"], h_scores["hybrid"]
    scores["model: global distance only"] = f_scores["global"], h_scores["global"]
    scores["model: local distance only"] = f_scores["local"], h_scores["local"]
    scores["raw backbone features (cosine)"] = f_scores["raw"], h_scores["raw"]
    rng = np.random.default_rng(seed)
    scores["random"] = [rng.random(len(c)) for c in fitb], [rng.random(len(c)) for c in hr]
    seen = popularity(every)
    # more training positives = closer; random jitter below one count breaks ties fairly
    scores["training popularity"] = tuple(
        [-np.array([seen[p] for p in c], dtype=float) + 0.5 * rng.random(len(c)) for c in lists]
        for lists in (fitb, hr)
    )

    trained = {
        "colour histograms + heads": (
            "colorhist",
            {"backbone": "colorhist", "train_backbone": False, "weights": "none", "preset": "offline"},
        )
    }
    if seed_variant:
        trained["seed attention (softmax of +distance)"] = ("seed-attention", {"attention": "seed"})
    for label, (folder, overrides) in trained.items() if baselines else ():
        base_dir = _baseline_run(run, folder, data, overrides)
        base_model, base_info = load_run(base_dir)
        bf, bh = scores_of(base_model, base_dir, base_info)
        scores[label] = bf["hybrid"], bh["hybrid"]

    disjoint = [i for i, e in enumerate(examples) if seen[e.positive] == 0]
    rows = {label: _metrics(f, h) for label, (f, h) in scores.items()}
    rows_disjoint = {
        label: _metrics([f[i] for i in disjoint], [h[i] for i in disjoint])
        for label, (f, h) in scores.items()
    }
    result = {
        "run": str(run),
        "split": split,
        "examples": len(examples),
        "product_disjoint_examples": len(disjoint),
        "hr_candidates": int(np.mean([len(c) for c in hr])),
        "fitb_chance": float(np.mean([1.0 / len(c) for c in fitb])),
        "model": model.config.to_dict(),
        "preset": info.get("resolved", {}).get("preset"),
        "data_gaps": usable.counts(),
        **rows[name],
        "rows": rows,
        "rows_product_disjoint": rows_disjoint,
    }
    (run / f"eval-{split}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_table(result: dict) -> str:
    head = f"{'method':<42} {'FITB':>6} {'HR@1':>6} {'HR@5':>6} {'HR@10':>6}"
    gaps = result.get("data_gaps", {})
    lines = [
        f"{result['split']} split: {result['examples']} examples; "
        f"FITB: 1 true + up to {FITB_NEGATIVES} same-category negatives (chance "
        f"{result.get('fitb_chance', 1 / (FITB_NEGATIVES + 1)):.2f}); HR@K among {result['hr_candidates']} "
        "candidates on average",
    ]
    if gaps.get("missing_images") or gaps.get("unreadable_images") or gaps.get("skipped_by_reason"):
        lines.append(
            f"data gaps: {gaps['missing_images']} images missing, {gaps['unreadable_images']} unreadable; "
            f"skipped pairs {gaps['skipped_by_reason']}; {gaps['negatives_redrawn']} negatives drawn again"
        )
    for title, rows in (
        ("all examples", result["rows"]),
        (
            f"product-disjoint: the {result.get('product_disjoint_examples', 0)} examples whose true product "
            "is never a training positive",
            result.get("rows_product_disjoint", {}),
        ),
    ):
        lines += ["", title, head, "-" * len(head)]
        for label, m in rows.items():
            cells = [m[k] for k in ("fitb_accuracy", "hr@1", "hr@5", "hr@10")]
            lines.append(f"{label:<42} " + " ".join("     -" if v is None else f"{v:>6.3f}" for v in cells))
    return "\n".join(lines)


__all__ = ["evaluate", "format_table"]
