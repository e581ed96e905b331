"""`ctl export`: TorchScript scene/product encoders and their Triton model configs.

The encoders take uint8 RGB images [B, S, S, 3] (HWC; decoding, crop and letterbox happen in the
encoder service) and normalise inside the graph, so Triton and the in-process backend run the same
file. Tensor names follow Triton's libtorch convention (DESIGN.md §2):
  scene_encoder:   INPUT__0 UINT8 [S, S, 3] -> OUTPUT__0 FP32 [D] global, OUTPUT__1 [R, D] local,
                   OUTPUT__2 [R, D] attention
  product_encoder: INPUT__0 UINT8 [S, S, 3] -> OUTPUT__0 FP32 [D] style, OUTPUT__1 [D] attention key
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

from style_model.bank import weights_fingerprint
from style_model.config import ModelConfig
from style_model.distances import SERVED_ATTENTION
from style_model.errors import RunError
from style_model.model import StyleModel, to_unit
from style_model.train import load_run

log = logging.getLogger(__name__)
MAX_BATCH_SIZE = 32
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
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    with torch.inference_mode(False), torch.no_grad():
        return torch.jit.trace(module.eval(), example, check_trace=False)


def config_pbtxt(
    name: str, size: int, outputs: list[tuple[str, list[int]]], version: str, model_config: str = ""
) -> str:
    """Triton model config: pytorch_libtorch, dynamic batching, GPU instances (DESIGN.md §2). Parameters:
    the model version and the model's config (JSON), which the encoder reads through Triton."""
    out_blocks = ",\n".join(
        f'  {{\n    name: "{n}"\n    data_type: TYPE_FP32\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'
        for n, dims in outputs
    )
    return f"""name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: {MAX_BATCH_SIZE}
input [
  {{
    name: "INPUT__0"
    data_type: TYPE_UINT8
    dims: [ {size}, {size}, 3 ]
  }}
]
output [
{out_blocks}
]
dynamic_batching {{
  preferred_batch_size: [ 8, 16, 32 ]
  max_queue_delay_microseconds: 2000
}}
instance_group [
  {{
    count: 1
    kind: KIND_GPU
  }}
]
parameters {{
  key: "model_version"
  value: {{ string_value: "{version}" }}
}}
parameters {{
  key: "model_config"
  value: {{ string_value: {json.dumps(model_config)} }}
}}
"""


def output_dims(config: ModelConfig) -> dict[str, list[tuple[str, list[int]]]]:
    """Each encoder's outputs (Triton names, dims without the batch dimension): the tensor contract."""
    d, r = config.embed_dim, config.regions
    return {
        "scene_encoder": [("OUTPUT__0", [d]), ("OUTPUT__1", [r, d]), ("OUTPUT__2", [r, d])],
        "product_encoder": [("OUTPUT__0", [d]), ("OUTPUT__1", [d])],
    }


def model_configs(config: ModelConfig, version: str) -> dict[str, str]:
    """The config.pbtxt text of both encoders for a model config and version."""
    text = json.dumps(config.to_dict(), sort_keys=True)
    return {
        name: config_pbtxt(name, config.input_size, outputs, version, text)
        for name, outputs in output_dims(config).items()
    }


def export(run: Path | str, out: Path | str) -> dict:
    """Write OUT/{scene_encoder,product_encoder}/{config.pbtxt,1/model.pt} and OUT/model_info.json."""
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
    size = cfg.input_size
    extra = {"model_version": version, "model_config": json.dumps(cfg.to_dict(), sort_keys=True)}
    dims = output_dims(cfg)
    configs = model_configs(cfg, version)
    modules = {"scene_encoder": SceneEncoder(model), "product_encoder": ProductEncoder(model)}
    for name, module in modules.items():
        folder = out / name / "1"
        folder.mkdir(parents=True, exist_ok=True)
        traced = _trace(module, size)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files=extra)
        (folder / "model.pt").write_bytes(buffer.getvalue())
        (out / name / "config.pbtxt").write_text(configs[name])
        log.info("exported %s (%d bytes)", folder / "model.pt", len(buffer.getvalue()))
    summary = {
        "model_version": version,
        "config": cfg.to_dict(),
        "preset": info.get("resolved", {}).get("preset"),
        "run": str(Path(run).resolve()),
        "torch_version": torch.__version__,
        "models": {
            name: {
                "input": {"INPUT__0": ["UINT8", [size, size, 3]]},
                "outputs": {n: ["FP32", d] for n, d in outputs},
            }
            for name, outputs in dims.items()
        },
    }
    (out / "model_info.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {"out": str(out), "model_version": version}


def load_encoder(path: Path | str) -> tuple[torch.jit.ScriptModule, dict]:
    """Load an exported encoder and its metadata (model version and config)."""
    extra = dict.fromkeys(EXTRA_FILES, "")
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    text = {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()}
    return module.eval(), {"model_version": text["model_version"], "config": json.loads(text["model_config"])}
