"""What an encoder says about itself and answers per product image: one shape for the encoder, its backends
and the ranker's client (docs/ARCHITECTURE.md, glossary).

`ModelInfo` is the domain form of `ctl.v1.ModelInfo`: the model part (version, input size, regions,
embedding dimension, backend, exported config) is known to a backend once its model is loaded; the limits
part is the encoder's configuration. A limit of 0 means "not said" (an older encoder, or a backend that
does not know the service's limits).
"""

from __future__ import annotations

import json
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import numpy as np

from ctl.v1 import encoder_pb2


@dataclass(frozen=True)
class ModelInfo:
    """The served model and the limits of the encoder that serves it."""

    model_version: str
    input_size: int  # images are letterboxed to input_size × input_size
    grid: int  # scene regions: grid × grid cells of the feature map, row-major
    regions: int
    embedding_dim: int
    backend: str  # "torchscript" or "triton"
    _: KW_ONLY  # the rest by name: a limit passed by position landed in model_config
    model_config: dict[str, Any] = field(default_factory=dict, compare=False)
    max_batch_images: int = 0  # images per EncodeProducts call
    max_image_bytes: int = 0
    max_image_pixels: int = 0
    max_request_bytes: int = 0  # one request message, in bytes


def model_info_to_proto(info: ModelInfo) -> encoder_pb2.ModelInfo:
    return encoder_pb2.ModelInfo(
        model_version=info.model_version,
        input_size=info.input_size,
        grid=info.grid,
        regions=info.regions,
        embedding_dim=info.embedding_dim,
        backend=info.backend,
        max_batch_images=info.max_batch_images,
        max_image_bytes=info.max_image_bytes,
        max_image_pixels=info.max_image_pixels,
        model_config_json=json.dumps(info.model_config, sort_keys=True),
        max_request_bytes=info.max_request_bytes,
    )


def model_info_from_proto(msg: encoder_pb2.ModelInfo) -> ModelInfo:
    """The message as sent; a malformed `model_config_json` (another producer's) reads as {}."""
    try:
        config = json.loads(msg.model_config_json) if msg.model_config_json else {}
    except ValueError:
        config = {}
    return ModelInfo(
        model_version=msg.model_version,
        input_size=msg.input_size,
        grid=msg.grid,
        regions=msg.regions,
        embedding_dim=msg.embedding_dim,
        backend=msg.backend,
        model_config=config if isinstance(config, dict) else {},
        max_batch_images=msg.max_batch_images,
        max_image_bytes=msg.max_image_bytes,
        max_image_pixels=msg.max_image_pixels,
        max_request_bytes=msg.max_request_bytes,
    )


@dataclass(frozen=True)
class ProductResult:
    """One product image's outcome: its style embedding and attention key, or why it alone failed (`code`,
    a gRPC status name such as "INVALID_ARGUMENT", and a message a person can act on)."""

    style: np.ndarray | None = None
    attention_key: np.ndarray | None = None
    code: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return not self.code
