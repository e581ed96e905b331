"""UpsertProducts on domain types: the records a stream carries, in order, and what became of them.

The servicer reads each request into a ProductRecord, or a RefusedRecord when the request itself is
malformed (its message names the API's field), as RankerApp.upsert asks for the next one; the app answers
Upserted, which the servicer maps to UpsertProductsResponse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ctl.tensors import F32

ECHO_CHARS = 256  # of a refused record's id, echoed in its failure
MAX_FAILURE_MESSAGE_CHARS = 1000


@dataclass(frozen=True)
class ProductRecord:
    """One product to store, with its image to encode or its embedding: (style, attention_key), unit
    vectors of the served model. `size` is the bytes it took in the stream: what it holds of the ranker's
    byte budget from when it is read until its batch is encoded."""

    product_id: str
    category: str
    metadata: dict[str, str]
    size: int
    image: bytes | None = None
    embedding: tuple[F32, F32] | None = None


@dataclass(frozen=True)
class RefusedRecord:
    """A record that cannot be read (an empty id, no content, a malformed embedding): it fails alone, with
    `code` (the gRPC status name) and `message`, at its place in the stream."""

    product_id: str
    code: str
    message: str


@dataclass(frozen=True)
class RecordFailure:
    """A record of the stream that was not stored: its place (0-based), its id (shortened), and why."""

    index: int
    product_id: str
    code: str
    message: str


@dataclass
class Upserted:
    """What an UpsertProducts stream did, counted as it is read: records read, distinct products stored,
    and the records that failed (in the order of the stream once it ends)."""

    model_version: str
    received: int = 0
    upserted: int = 0
    failures: list[RecordFailure] = field(default_factory=list)

    def fail(self, index: int, product_id: str, code: str, message: str) -> None:
        """Lists a failed record: its id shortened (a refused record's id may be megabytes long, and the
        outcome is kept until the stream ends) and the message within 1,000 characters."""
        shown = product_id if len(product_id) <= ECHO_CHARS else product_id[:ECHO_CHARS] + "…"
        self.failures.append(RecordFailure(index, shown, code, message[:MAX_FAILURE_MESSAGE_CHARS]))

    def failure_list(self, most: int = 10) -> str:
        """The first failures, for an error that cannot carry the outcome itself."""
        if not self.failures:
            return ""
        failures = sorted(self.failures, key=lambda f: f.index)
        shown = "; ".join(
            f"#{f.index} {f.product_id[:64]!r}: {f.code} {f.message[:160]}" for f in failures[:most]
        )
        more = f"; and {len(failures) - most} more" if len(failures) > most else ""
        return f": {shown}{more}"


StreamRecord = ProductRecord | RefusedRecord  # a record as the stream carries it, read or refused
