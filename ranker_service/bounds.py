"""What one request or reply of the ranker may hold: ids, metadata values, reply bytes. Shared by the servicer
(Recommend, GetProducts, DeleteProducts) and the app (UpsertProducts records), so each bound is written once.
"""

from __future__ import annotations

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
