"""Errors of the encoder service: one base class, a shallow tree, and the table that maps them to gRPC
status codes (applied by `ctl.serving.error_mapper`)."""

from __future__ import annotations

import grpc


class EncoderError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(EncoderError, ValueError):
    """A setting (flag or CTL_ENCODER_* variable) is invalid; the message names it and the bad value."""


class ImageError(EncoderError):
    """An image is empty, corrupt, truncated or in an unsupported format: INVALID_ARGUMENT."""


class ImageTooLarge(ImageError):
    """An image is over the byte or pixel limit (the message gives both numbers): INVALID_ARGUMENT."""


class TooManyImages(EncoderError):
    """One EncodeProducts call holds more images than ModelInfo.max_batch_images: INVALID_ARGUMENT."""


class BackendUnavailable(EncoderError):
    """The model backend (TorchScript files, Triton server) cannot be loaded, reached or used: UNAVAILABLE."""


class ModelChanged(EncoderError):
    """The backend now serves another model than the version this process started with (a Triton restarted
    or reloaded with another repository): FAILED_PRECONDITION until it serves that version again."""


class Overloaded(EncoderError):
    """The queue in front of the model is full; the caller should retry later: RESOURCE_EXHAUSTED."""


ERROR_CODES: dict[type[BaseException], grpc.StatusCode] = {
    ImageTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    ImageError: grpc.StatusCode.INVALID_ARGUMENT,
    TooManyImages: grpc.StatusCode.INVALID_ARGUMENT,
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    ModelChanged: grpc.StatusCode.FAILED_PRECONDITION,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status `exc` gets on its own (per-record errors carry its name); UNKNOWN if not in the table."""
    for kind, code in ERROR_CODES.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.UNKNOWN
