"""Examples, candidates and decoded images in which every image is usable: present and decodable.

A real image folder always has gaps (dead URLs, truncated downloads). Pairs whose scene or product has
no usable image are skipped, negatives and evaluation candidates are drawn only among products that have
one, and an image that turns out not to decode is treated as missing and everything that drew it is drawn
again, until every image in the bank decodes. Every skip and redraw is counted in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from style_model.bank import ImageBank
from style_model.data.examples import BuildReport, Example, build_examples
from style_model.data.stl import Dataset
from style_model.protocol import sample_candidates


@dataclass(frozen=True)
class CandidateSet:
    """Candidates to draw for a group of examples: `negatives` per example, seeded by (seed, tag)."""

    group: str
    negatives: int
    seed: int
    tag: str


@dataclass
class Usable:
    examples: dict[str, list[Example]]  # by group ("train", "val", "test", ...)
    candidates: dict[str, list[list[str]]]  # by candidate-set name; the true product first
    bank: ImageBank
    report: BuildReport

    wanted: dict[str, int]  # candidates asked for per list, by candidate-set name (true product included)

    def counts(self) -> dict:
        """What was left out and drawn again, for run reports."""
        short = {
            name: sum(1 for c in lists if len(c) < self.wanted[name])
            for name, lists in self.candidates.items()
        }
        return {
            "examples": {g: len(e) for g, e in self.examples.items()},
            "skipped_by_reason": dict(self.report.skipped_by_reason),
            "missing_images": len(self.report.missing_images),
            "unreadable_images": len(self.report.unreadable_images),
            "negatives_redrawn": self.report.negatives_redrawn,
            "candidate_lists_short": short,  # fewer usable same-category products than asked for
        }


def load_usable(
    dataset: Dataset,
    size: int,
    pick: Callable[[list[Example]], dict[str, list[Example]]],
    candidate_sets: dict[str, CandidateSet],
    min_crop: float = 0.2,
    seed: int = 0,
    workers: int = 2,
) -> Usable:
    """Build examples, pick the groups wanted, draw candidates and decode every image they need, again
    without the images that failed to decode until none fails (each round only decodes what is new)."""
    bank = ImageBank(dataset, size)
    unreadable: set[str] = set()
    present: dict[str, bool] = {}

    def usable(sig: str) -> bool:
        if sig not in present:
            present[sig] = dataset.image_path(sig).is_file()
        return present[sig] and sig not in unreadable

    while True:
        examples, report = build_examples(dataset, min_crop=min_crop, seed=seed, unreadable=unreadable)
        groups = pick(examples)
        candidates = {
            name: sample_candidates(groups[c.group], dataset, c.negatives, c.seed, c.tag, usable).products
            for name, c in candidate_sets.items()
        }
        for group in groups.values():
            for e in group:
                bank.add(e.scene, e.crop), bank.add(e.positive), bank.add(e.negative)
        for lists in candidates.values():
            for c in lists:
                for p in c:
                    bank.add(p)
        bank.load(workers)
        new = set(bank.unreadable) - unreadable
        if not new:
            wanted = {name: c.negatives + 1 for name, c in candidate_sets.items()}
            return Usable(groups, candidates, bank, report, wanted)
        unreadable |= new
