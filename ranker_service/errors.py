"""Errors of the ranker service: one base class, a shallow tree, and the table that maps them to gRPC
status codes (applied by `ctl.serving.error_mapper`)."""

from __future__ import annotations

import grpc

from ctl.errors import TensorError


class RankerError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidRequest(RankerError, ValueError):
    """The request is malformed (missing scene, bad limit, wrong embedding shape): INVALID_ARGUMENT."""


class VersionMismatch(RankerError):
    """Embeddings or a store were made by another model version than the serving one: FAILED_PRECONDITION."""


class UnsupportedModel(RankerError):
    """The encoder's model cannot be served by this ranker (e.g. another attention): the ranker exits."""


class UnknownCategory(RankerError):
    """No product of the requested category is in the catalog: NOT_FOUND."""


class StoreError(RankerError):
    """The vector store failed or cannot be reached: UNAVAILABLE."""


class StoreClosed(StoreError):
    """An operation was attempted on a store after `close()`."""


class StoreLocked(StoreError):
    """The embedded store's directory is already opened by another process."""


class EncoderUnavailable(RankerError):
    """The encoder service cannot be reached or did not answer in time: UNAVAILABLE."""


class NotReady(RankerError):
    """The ranker is starting (waiting for the encoder or the store): UNAVAILABLE, with what it waits for."""


class StreamTooLong(RankerError):
    """An UpsertProducts stream carried more products than max_stream_records: RESOURCE_EXHAUSTED."""


class ConfigError(RankerError, ValueError):
    """A setting (flag or CTL_RANKER_* variable) is malformed or out of range; the message names it."""


class DeadlineExceeded(RankerError):
    """The caller's deadline passed while the ranker worked on the call: DEADLINE_EXCEEDED."""


class TooManyStreams(RankerError):
    """max_upsert_streams UpsertProducts streams are open already: RESOURCE_EXHAUSTED (retry later)."""


ERROR_CODES: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    TensorError: grpc.StatusCode.INVALID_ARGUMENT,
    VersionMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    UnknownCategory: grpc.StatusCode.NOT_FOUND,
    EncoderUnavailable: grpc.StatusCode.UNAVAILABLE,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    StoreError: grpc.StatusCode.UNAVAILABLE,
    StreamTooLong: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooManyStreams: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
