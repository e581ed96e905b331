"""`ctl export`: TorchScript scene/product encoders and their Triton model configs.

The encoders take uint8 RGB images [B, S, S, 3] (HWC; decoding, crop and letterbox happen in the
encoder service) and normalise inside the graph, so Triton and the in-process backend run the same
file. Names, tensors and the repository layout are the contract of `ctl.encoder_contract`.
The model version is a hash of the weights and config; it is written into both files (TorchScript
extra file `model_version`), the configs' `parameters`, and `model_info.json`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from ctl import encoder_contract as contract
from style_model.bank import weights_fingerprint
from style_model.config import ModelConfig
from style_model.distances import SERVED_ATTENTION
from style_model.errors import RunError
from style_model.model import StyleModel, to_unit
from style_model.train import load_run

log = logging.getLogger(__name__)
EXTRA_FILES = ("model_version", "model_config")


class SceneEncoder(nn.Module):
    def __init__(self, model: StyleModel):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model.encode_scene(to_unit(images))


class ProductEncoder(nn.Module):
    def __init__(self, model: StyleModel):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.encode_product(to_unit(images))


def model_version(model: StyleModel) -> str:
    """Content hash of weights and config: the same trained model always gets the same version."""
    content = f"{model.config.fingerprint()}:{weights_fingerprint(model)}"
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def _trace(module: nn.Module, size: int) -> torch.jit.ScriptModule:
    example = torch.randint(0, 256, (2, *contract.input_dims(size)), dtype=torch.uint8)
    with torch.inference_mode(False), torch.no_grad():
        return torch.jit.trace(module.eval(), example, check_trace=False)


def model_configs(config: ModelConfig, version: str) -> dict[str, str]:
    """The config.pbtxt text of both encoders for a model config and version."""
    text = json.dumps(config.to_dict(), sort_keys=True)
    return {name: contract.config_pbtxt(spec, version, text) for name, spec in _specs(config).items()}


def _specs(config: ModelConfig) -> dict[str, contract.EncoderSpec]:
    return contract.encoders(config.input_size, config.regions, config.embed_dim)


def export(run: Path | str, out: Path | str) -> dict:
    """Write the repository of `ctl.encoder_contract`: per encoder its config.pbtxt and 1/model.pt, and
    OUT/model_info.json."""
    model, info = load_run(run)
    cfg = model.config
    if cfg.attention != SERVED_ATTENTION:
        raise RunError(
            f"{run} was trained with attention={cfg.attention!r} (an evaluation baseline), but serving ranks "
            f"with attention={SERVED_ATTENTION!r}: its answers would not be the model's. "
            f"Train with --attention {SERVED_ATTENTION} to serve it"
        )
    model = model.to(memory_format=torch.contiguous_format).eval()
    out = Path(out)
    version = model_version(model)
    extra = {"model_version": version, "model_config": json.dumps(cfg.to_dict(), sort_keys=True)}
    configs = model_configs(cfg, version)
    modules = {contract.SCENE_ENCODER: SceneEncoder(model), contract.PRODUCT_ENCODER: ProductEncoder(model)}
    for name, module in modules.items():
        path = contract.model_file(out, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        traced = _trace(module, cfg.input_size)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files=extra)
        path.write_bytes(buffer.getvalue())
        contract.config_file(out, name).write_text(configs[name])
        log.info("exported %s (%d bytes)", path, len(buffer.getvalue()))
    summary = {
        "model_version": version,
        "config": cfg.to_dict(),
        "preset": info.get("resolved", {}).get("preset"),
        "run": str(Path(run).resolve()),
        "torch_version": torch.__version__,
        "models": contract.model_info_models(_specs(cfg)),
    }
    (out / contract.MODEL_INFO_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return {"out": str(out), "model_version": version}


def load_encoder(path: Path | str) -> tuple[torch.jit.ScriptModule, dict]:
    """Load an exported encoder and its metadata (model version and config)."""
    extra = dict.fromkeys(EXTRA_FILES, "")
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    text = {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()}
    return module.eval(), {"model_version": text["model_version"], "config": json.loads(text["model_config"])}
