"""Model backends behind one async interface, and `make_backend` to pick one from the config.

The backends import torch (torchscript) or tritonclient (triton) only when chosen, so a Triton-only
deployment needs no torch and the in-process one needs no tritonclient.
"""

from __future__ import annotations

from encoder_service.backends.base import EncoderBackend
from encoder_service.config import EncoderConfig
from encoder_service.errors import BackendUnavailable, ConfigError


def make_backend(config: EncoderConfig) -> EncoderBackend:
    """The backend `config.backend` names, not started (call `await backend.start()`)."""
    if config.backend == "torchscript":
        try:
            from encoder_service.backends.torchscript import TorchScriptBackend
        except ImportError as exc:
            raise BackendUnavailable(f"backend torchscript needs torch: {exc}") from exc

        return TorchScriptBackend(config.model_repo, torch_threads=config.torch_threads)
    if config.backend == "triton":
        from encoder_service.backends.triton import TritonBackend

        return TritonBackend(config.triton_url, config.triton_timeout_s, model_repo=config.model_repo)
    raise ConfigError(f"backend={config.backend!r}: expected torchscript or triton")
