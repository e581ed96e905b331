"""The encoders' tensor contract (DESIGN.md §2), written once: model names, tensor names, dtypes and
shapes, the model repository's layout and the Triton config that declares them.

`ctl export` writes by it, both encoder backends (in-process TorchScript and Triton) read by it, and the
CPU Triton of tools/ serves by it. Triton's libtorch naming: the input is `INPUT__0`, the outputs
`OUTPUT__0..`, in the order the TorchScript module returns them; the batch dimension comes first and is
not listed in `dims`. Only the standard library here: the Triton backend runs without torch and numpy
stays out of the way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SCENE_ENCODER = "scene_encoder"
PRODUCT_ENCODER = "product_encoder"
ENCODERS = (SCENE_ENCODER, PRODUCT_ENCODER)

INPUT = "INPUT__0"
INPUT_DTYPE = "UINT8"  # RGB pixels, HWC, letterboxed by the encoder service
OUTPUT_DTYPE = "FP32"
SCENE_OUTPUTS = ("OUTPUT__0", "OUTPUT__1", "OUTPUT__2")  # global [D], local [R, D], attention [R, D]
PRODUCT_OUTPUTS = ("OUTPUT__0", "OUTPUT__1")  # style [D], attention key [D]

# The repository: REPO/<model>/config.pbtxt and REPO/<model>/1/model.pt, plus REPO/model_info.json.
VERSION_DIR = "1"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.pbtxt"
MODEL_INFO_FILE = "model_info.json"

# The Triton config: its platform, batching, instances and the parameters the encoder reads.
PLATFORM = "pytorch_libtorch"
MAX_BATCH_SIZE = 32
PREFERRED_BATCH_SIZES = (8, 16, 32)
MAX_QUEUE_DELAY_US = 2000
VERSION_PARAMETER = "model_version"
CONFIG_PARAMETER = "model_config"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an encoder: its name, Triton dtype ("UINT8", "FP32") and dims without the batch."""

    name: str
    dtype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder: its model name, its input and its outputs in the order the module returns them."""

    name: str
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]


def triton_type(dtype: str) -> str:
    """Triton's config enum name of a dtype: "UINT8" -> "TYPE_UINT8"."""
    return f"TYPE_{dtype}"


def input_dims(input_size: int) -> tuple[int, int, int]:
    """[S, S, 3]: one letterboxed RGB image."""
    return (input_size, input_size, 3)


def scene_output_dims(regions: int, embedding_dim: int) -> tuple[tuple[int, ...], ...]:
    """global [D], local [R, D], attention [R, D]."""
    return ((embedding_dim,), (regions, embedding_dim), (regions, embedding_dim))


def product_output_dims(embedding_dim: int) -> tuple[tuple[int, ...], ...]:
    """style [D], attention key [D]."""
    return ((embedding_dim,), (embedding_dim,))


def encoders(input_size: int, regions: int, embedding_dim: int) -> dict[str, EncoderSpec]:
    """Both encoders of a model, by name."""
    image = TensorSpec(INPUT, INPUT_DTYPE, input_dims(input_size))
    outputs = {
        SCENE_ENCODER: zip(SCENE_OUTPUTS, scene_output_dims(regions, embedding_dim)),
        PRODUCT_ENCODER: zip(PRODUCT_OUTPUTS, product_output_dims(embedding_dim)),
    }
    return {
        name: EncoderSpec(name, image, tuple(TensorSpec(n, OUTPUT_DTYPE, dims) for n, dims in pairs))
        for name, pairs in outputs.items()
    }


def model_dir(repo: Path | str, model: str) -> Path:
    return Path(repo) / model


def model_file(repo: Path | str, model: str) -> Path:
    """REPO/<model>/1/model.pt: the TorchScript file both backends run."""
    return model_dir(repo, model) / VERSION_DIR / MODEL_FILE


def config_file(repo: Path | str, model: str) -> Path:
    return model_dir(repo, model) / CONFIG_FILE


def model_info_models(specs: dict[str, EncoderSpec]) -> dict[str, dict]:
    """The "models" part of model_info.json: per encoder, {"input": {name: [dtype, dims]}, "outputs": ...}."""
    return {
        name: {
            "input": {spec.input.name: [spec.input.dtype, list(spec.input.dims)]},
            "outputs": {t.name: [t.dtype, list(t.dims)] for t in spec.outputs},
        }
        for name, spec in specs.items()
    }


def _tensor_block(tensor: TensorSpec) -> str:
    dims = ", ".join(map(str, tensor.dims))
    return (
        f'  {{\n    name: "{tensor.name}"\n    data_type: {triton_type(tensor.dtype)}\n'
        f"    dims: [ {dims} ]\n  }}"
    )


def config_pbtxt(spec: EncoderSpec, model_version: str, model_config: str = "") -> str:
    """Triton's config.pbtxt of an encoder: pytorch_libtorch, dynamic batching, GPU instances, and as
    parameters the model version and the model's config (JSON), which the encoder reads through Triton."""
    preferred = ", ".join(map(str, PREFERRED_BATCH_SIZES))
    outputs = ",\n".join(_tensor_block(t) for t in spec.outputs)
    return f"""name: "{spec.name}"
platform: "{PLATFORM}"
max_batch_size: {MAX_BATCH_SIZE}
input [
{_tensor_block(spec.input)}
]
output [
{outputs}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}
}}
instance_group [
  {{
    count: 1
    kind: KIND_GPU
  }}
]
parameters {{
  key: "{VERSION_PARAMETER}"
  value: {{ string_value: "{model_version}" }}
}}
parameters {{
  key: "{CONFIG_PARAMETER}"
  value: {{ string_value: {json.dumps(model_config)} }}
}}
"""
