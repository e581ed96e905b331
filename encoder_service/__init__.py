"""The encoder service: image bytes in, style embeddings out, over gRPC (DESIGN.md §2).

Images are decoded and letterboxed exactly as in training, batched across concurrent calls, and encoded
by the exported TorchScript encoders in-process or on a Triton server.
"""

from encoder_service.app import EncoderApp, ProductResult
from encoder_service.backends import EncoderBackend, ModelInfoData, make_backend
from encoder_service.batcher import MicroBatcher
from encoder_service.config import EncoderConfig, add_arguments, from_args
from encoder_service.decode import decode_image
from encoder_service.errors import (
    ERROR_CODES,
    BackendUnavailable,
    ConfigError,
    EncoderError,
    ImageError,
    ImageTooLarge,
    Overloaded,
    TooManyImages,
)
from encoder_service.server import build, run, serve
from encoder_service.service import SERVICE_NAME, EncoderServicer

__all__ = [
    "ERROR_CODES",
    "SERVICE_NAME",
    "BackendUnavailable",
    "ConfigError",
    "EncoderApp",
    "EncoderBackend",
    "EncoderConfig",
    "EncoderError",
    "EncoderServicer",
    "ImageError",
    "ImageTooLarge",
    "MicroBatcher",
    "ModelInfoData",
    "Overloaded",
    "ProductResult",
    "TooManyImages",
    "add_arguments",
    "build",
    "decode_image",
    "from_args",
    "make_backend",
    "run",
    "serve",
]
