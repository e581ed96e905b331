"""The images a run needs, decoded once: pixels for end-to-end training, cached features when frozen.

An image is a (signature, crop) pair: a product photo (no crop) or a scene crop. Pixels live in RAM as
uint8 [N, S, S, 3]. With a frozen backbone the backbone runs once per image, batched, and its outputs
(regions, mean stage-4 feature, pooled vector) are cached on disk keyed by the image's content, the
crop, the preprocessing and the backbone weights, so re-runs and the heads' many epochs never run it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ctl.progress import progress_bar
from style_model.data.images import load_many
from style_model.data.stl import Dataset

log = logging.getLogger(__name__)
Crop = tuple[float, float, float, float] | None


@dataclass
class ImageBank:
    dataset: Dataset
    size: int
    keys: list[tuple[str, Crop]] = field(default_factory=list)
    index: dict[tuple[str, Crop], int] = field(default_factory=dict)
    pixels: np.ndarray | None = None
    unreadable: dict[str, str] = field(default_factory=dict)  # signature -> reason

    def add(self, signature: str, crop: Crop = None) -> int:
        key = (signature, crop)
        if key not in self.index:
            self.index[key] = len(self.keys)
            self.keys.append(key)
        return self.index[key]

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, workers: int = 2) -> None:
        """Decode every image registered since the last call; unreadable ones are recorded in `unreadable`."""
        done = 0 if self.pixels is None else len(self.pixels)
        jobs = [(self.dataset.image_path(sig), crop) for sig, crop in self.keys[done:]]
        with progress_bar(len(jobs), "decode images", "img") as bar:
            pixels, failures = load_many(jobs, self.size, workers=workers, progress=bar.update)
        self.pixels = pixels if self.pixels is None else np.concatenate([self.pixels, pixels])
        for i, reason in failures:
            self.unreadable[self.keys[done + i][0]] = reason
        if failures:
            log.warning("%d unreadable images (listed in the run's examples report)", len(failures))

    def batch(self, indices: np.ndarray | list[int]) -> Tensor:
        """uint8 pixels -> float [B, 3, S, S] in [0, 1]."""
        assert self.pixels is not None, "load() first"
        x = torch.from_numpy(self.pixels[np.asarray(indices)]).permute(0, 3, 1, 2).float().div_(255.0)
        return x.contiguous(memory_format=torch.channels_last)  # NHWC is faster for CPU convolutions

    def domain(self, i: int) -> str:
        """Scene crops are scenes; images without a crop are product photos."""
        return "product" if self.keys[i][1] is None else "scene"

    def content_key(self, i: int, salt: str) -> str:
        sig, crop = self.keys[i]
        h = hashlib.sha256(salt.encode())
        h.update(self.dataset.image_path(sig).read_bytes())
        h.update(json.dumps([crop, self.size]).encode())
        return h.hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's parameters and buffers: says 'these weights' in feature-cache keys and in
    the exported model version."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


@dataclass
class FeatureBank:
    """Frozen-backbone features for every image of an ImageBank: regions, map mean, pooled (float16)."""

    regions: np.ndarray  # [N, R, C4]
    map_mean: np.ndarray  # [N, C4]
    pooled: np.ndarray  # [N, C5]

    def batch(self, indices) -> tuple[Tensor, Tensor, Tensor]:
        idx = np.asarray(indices)
        return (
            torch.from_numpy(self.regions[idx]).float(),
            torch.from_numpy(self.map_mean[idx]).float(),
            torch.from_numpy(self.pooled[idx]).float(),
        )


def compute_features(bank: ImageBank, model, cache_dir: Path | None, batch_size: int = 64) -> FeatureBank:
    """Run the (frozen) backbone of `model` once per image not yet in the cache; returns all features."""
    salt = f"{model.config.backbone}:{model.config.grid}:{weights_fingerprint(model.backbone)}"
    keys = [bank.content_key(i, salt) for i in range(len(bank))]
    cached: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    store = None
    if cache_dir is not None:
        store = Path(cache_dir) / f"features-{hashlib.sha256(salt.encode()).hexdigest()[:16]}.npz"
        if store.exists():
            with np.load(store) as z:
                for k, r, m, p in zip(z["keys"], z["regions"], z["map_mean"], z["pooled"]):
                    cached[str(k)] = (r, m, p)
    todo = [i for i, k in enumerate(keys) if k not in cached]
    log.info("features: %d cached, %d to compute (%s)", len(keys) - len(todo), len(todo), store or "no cache")
    model.eval()
    with torch.inference_mode(), progress_bar(len(todo), "backbone features", "img") as bar:
        for domain in ("product", "scene"):  # one domain per pass: each has its own BatchNorm statistics
            mine = [i for i in todo if bank.domain(i) == domain]
            for start in range(0, len(mine), batch_size):
                chunk = mine[start : start + batch_size]
                regions, map_mean, pooled = model.features(bank.batch(chunk), domain)
                for j, i in enumerate(chunk):
                    cached[keys[i]] = (
                        regions[j].numpy().astype(np.float16),
                        map_mean[j].numpy().astype(np.float16),
                        pooled[j].numpy().astype(np.float16),
                    )
                bar.update(len(chunk))
    if store is not None and todo:
        store.parent.mkdir(parents=True, exist_ok=True)
        names = sorted(cached)
        tmp = store.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            keys=np.array(names),
            regions=np.stack([cached[k][0] for k in names]),
            map_mean=np.stack([cached[k][1] for k in names]),
            pooled=np.stack([cached[k][2] for k in names]),
        )
        tmp.replace(store)
    return FeatureBank(
        np.stack([cached[k][0] for k in keys]),
        np.stack([cached[k][1] for k in keys]),
        np.stack([cached[k][2] for k in keys]),
    )
