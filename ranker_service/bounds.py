"""What one request or reply of the ranker may hold: ids, metadata, reply bytes, checked by the servicer as it
reads the API's messages (their errors name the fields), so each bound is written once; CALL_ENVELOPE also
sizes the app's encoder calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from google.protobuf.message import Message

from ranker_service.config import RankerConfig
from ranker_service.errors import InvalidRequest

MAX_ID_BYTES = 512  # a product id or a category
MAX_METADATA_KEY_BYTES = 256
CALL_ENVELOPE = 64 * 1024  # a message's bytes besides what it carries (an EncodeProducts call's images)

Reply = TypeVar("Reply", bound=Message)


def text(value: str, name: str, limit: int = MAX_ID_BYTES) -> str:
    """`value`, if it is not empty and at most `limit` bytes long (InvalidRequest naming `name` otherwise)."""
    if not value:
        raise InvalidRequest(f"{name} is empty")
    if len(value.encode()) > limit:
        raise InvalidRequest(f"{name} is longer than {limit} bytes")
    return value


def metadata_value(value: str, name: str, config: RankerConfig) -> str:
    """A metadata value in a filter: at most as long as a stored value may be."""
    if len(value.encode()) > config.max_metadata_value_bytes:
        raise InvalidRequest(f"{name} is longer than {config.max_metadata_value_bytes} bytes")
    return value


def record_metadata(metadata: Mapping[str, str], config: RankerConfig) -> dict[str, str]:
    """A product's metadata, if within its bounds (InvalidRequest otherwise): every Recommend reply of the
    category carries it."""
    if len(metadata) > config.max_metadata_keys:
        raise InvalidRequest(f"metadata: at most {config.max_metadata_keys} keys, got {len(metadata)}")
    total = 0
    for key, value in metadata.items():
        text(key, "metadata key", MAX_METADATA_KEY_BYTES)
        size = len(value.encode())
        if size > config.max_metadata_value_bytes:
            raise InvalidRequest(
                f"metadata[{key[:64]!r}]: the value is {size:,} bytes, at most "
                f"{config.max_metadata_value_bytes:,}"
            )
        total += size + len(key.encode())
    if total > config.max_metadata_bytes:
        raise InvalidRequest(
            f"metadata: {total:,} bytes of keys and values, at most {config.max_metadata_bytes:,}"
        )
    return dict(metadata)


def fitting(reply: Reply, config: RankerConfig, what: str, advice: str) -> Reply:
    """`reply`, if one message may carry it: gRPC would fail the send with RESOURCE_EXHAUSTED, which
    callers retry as a passing error, while only a smaller request helps (INVALID_ARGUMENT)."""
    size, most = reply.ByteSize(), config.max_message_bytes - CALL_ENVELOPE
    if size > most:
        raise InvalidRequest(
            f"{what} make a reply of {size:,} bytes (with their metadata), more than one reply may "
            f"carry ({most:,}): {advice}"
        )
    return reply
