"""The BatchNorm question (issue 15): how much does serving one blended set of BatchNorm statistics cost?

Training normalises scenes and products in separate batches. Before per-domain statistics
(style_model/domains.py) one running average of both was kept and served. For a trained run this scores
the same weights three ways, on the validation and test splits (FITB, HR@10):

  blended      one running average of both domains, rebuilt as training built it (an exponential average,
               momentum 0.1, over alternating scene and product batches of training images): what was served
  per domain   the run's own per-domain running statistics: what is served now
  precise      per-domain statistics recomputed over training images (a cumulative average): the reference

Weights are identical in all three, so the differences are the statistics alone, not run-to-run noise.
Usage: python -m bench.batchnorm --run RUN --data DIR [--checkpoint best|last] [--batches 200]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from pathlib import Path

import torch

from style_model.config import ModelConfig
from style_model.data.stl import load_dataset
from style_model.domains import DomainBatchNorm
from style_model.embed import image_features, score_candidates
from style_model.model import StyleModel
from style_model.protocol import FITB_NEGATIVES, HR_CANDIDATES, fitb_accuracy, hit_rates
from style_model.usable import CandidateSet, load_usable


def _norms(model: StyleModel) -> list[DomainBatchNorm]:
    return [m for m in model.modules() if isinstance(m, DomainBatchNorm)]


@torch.no_grad()
def _recalibrate(
    model: StyleModel, bank, batches, blended: bool, momentum: float | None, frozen_backbone: bool
) -> None:
    """Run training batches (domain, bank indices) through the model in train mode, updating only the
    BatchNorm running statistics. `blended`: one shared average, as plain BatchNorm kept it. A frozen
    backbone keeps its own (ImageNet) statistics, as in training: only the heads' are rebuilt."""
    model.train()
    if frozen_backbone:
        model.backbone.eval()
    norms = _norms(model.heads if frozen_backbone else model)
    for m in norms:
        m.momentum = momentum
        m.reset_running_stats()
        m.product_mean.zero_(), m.product_var.fill_(1.0), m.product_batches.zero_()
    for domain, idx in batches:
        if blended:  # the shared average lives in the scene buffers; products update it too
            for m in norms:
                m.product_mean.copy_(m.running_mean), m.product_var.copy_(m.running_var)
        regions, map_mean, pooled = image_features(model, bank, None, idx, domain)
        if domain == "scene":
            model.heads.scene(regions, pooled)
        else:
            model.heads.product(map_mean, pooled)
        if blended and domain == "product":
            for m in norms:
                m.running_mean.copy_(m.product_mean), m.running_var.copy_(m.product_var)
    if blended:
        for m in norms:
            m.product_mean.copy_(m.running_mean), m.product_var.copy_(m.running_var)
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best")
    parser.add_argument("--batches", type=int, default=200, help="training batches per recalibration")
    args = parser.parse_args()

    info = json.loads((args.run / "run.json").read_text())
    train_args = info["args"]
    if args.checkpoint == "best":
        state = torch.load(args.run / "best.pt", map_location="cpu", weights_only=False)
        config = ModelConfig.from_dict(state["config"])
    else:
        state = torch.load(args.run / "checkpoint.pt", map_location="cpu", weights_only=False)
        config = ModelConfig.from_dict(state["resolved"]["model"])
    served = StyleModel(config)
    served.load_state_dict(state["model"])
    served.eval()
    dataset = load_dataset(args.data, train_args.get("domain"))

    def pick(examples):
        return {s: [e for e in examples if e.split == s] for s in ("train", "val", "test")}

    sets = {
        f"{s}-{kind}": CandidateSet(s, n, 0, f"{s}-{kind}")
        for s in ("val", "test")
        for kind, n in (("fitb", FITB_NEGATIVES), ("hr", HR_CANDIDATES - 1))
    }
    sets["val-fitb"] = CandidateSet("val", FITB_NEGATIVES, train_args["seed"], "val-fitb")  # as training
    usable = load_usable(dataset, config.input_size, pick, sets, train_args["min_crop"], train_args["seed"])
    bank = usable.bank
    rng = random.Random(0)
    train = usable.examples["train"]
    batch = info["resolved"]["batch_size"]
    batches = []
    for _ in range(args.batches):
        chosen = rng.sample(train, min(batch, len(train)))
        batches.append(("scene", [bank.index[(e.scene, e.crop)] for e in chosen]))
        products = [e.positive for e in chosen] + [e.negative for e in chosen]
        batches.append(("product", [bank.index[(p, None)] for p in products]))

    models = {"per domain (served now)": served}
    blended = copy.deepcopy(served)
    frozen = not info["resolved"]["train_backbone"]
    _recalibrate(blended, bank, batches, blended=True, momentum=0.1, frozen_backbone=frozen)
    models["blended (served before)"] = blended
    precise = copy.deepcopy(served)
    _recalibrate(precise, bank, batches, blended=False, momentum=None, frozen_backbone=frozen)
    models["per domain, precise"] = precise

    print(f"run {args.run} ({args.checkpoint} checkpoint, step {state.get('step')}), data {args.data}")
    print("| statistics | val FITB | val HR@10 | test FITB | test HR@10 |\n| --- | --- | --- | --- | --- |")
    for name, model in models.items():
        cells = []
        for split in ("val", "test"):
            examples = usable.examples[split]
            fitb = score_candidates(model, bank, None, examples, usable.candidates[f"{split}-fitb"])
            hr = score_candidates(model, bank, None, examples, usable.candidates[f"{split}-hr"])
            cells += [fitb_accuracy(fitb["hybrid"]), hit_rates(hr["hybrid"], ks=(10,))["hr@10"]]
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
