"""The encoder service: image bytes in, style embeddings out, over gRPC (DESIGN.md §2).

Images are decoded and letterboxed exactly as in training, batched across concurrent calls, and encoded
by the exported TorchScript encoders in-process or on a Triton server.
"""

import importlib

# Names are loaded on first use (PEP 562): `ctl`'s parser needs only encoder_service.config, and the
# ranker's image (no torch, no Pillow) must be able to build it.
_EXPORTS = {
    "EncoderApp": "app",
    "ProductResult": "app",
    "EncoderBackend": "backends",
    "ModelInfoData": "backends",
    "make_backend": "backends",
    "MicroBatcher": "batcher",
    "EncoderConfig": "config",
    "add_arguments": "config",
    "from_args": "config",
    "decode_image": "decode",
    "ERROR_CODES": "errors",
    "BackendUnavailable": "errors",
    "ConfigError": "errors",
    "EncoderError": "errors",
    "ImageError": "errors",
    "ImageTooLarge": "errors",
    "ModelChanged": "errors",
    "Overloaded": "errors",
    "TooManyImages": "errors",
    "build": "server",
    "run": "server",
    "serve": "server",
    "SERVICE_NAME": "service",
    "EncoderServicer": "service",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


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
    "ModelChanged",
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
