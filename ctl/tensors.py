"""numpy arrays <-> ctl.v1 messages (Tensor, SceneEmbedding, ProductEmbedding), with shape checks.

Both services and the clients use these, so an embedding means the same thing everywhere. Shape
errors raise `TensorError` naming the field, the expected and the actual shape.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from ctl.errors import TensorError
from ctl.v1 import embeddings_pb2

F32 = NDArray[np.float32]


class Scene(NamedTuple):
    """A scene's embeddings: global [D], local [R, D], attention [R, D]."""

    global_: F32
    local: F32
    attention: F32


# How far from 1 the norm of an accepted embedding may be (fp16 round trips, other producers' vectors).
UNIT_TOLERANCE = 1e-3


def unit_rows(array: NDArray, name: str, tolerance: float = UNIT_TOLERANCE) -> F32:
    """`array` [..., D] with each row scaled to unit length, once every row's norm is within `tolerance` of 1
    (TensorError otherwise). The ranker's distances, d = 2 − S, and its certificate hold for unit vectors
    only: a row of norm 0.9991 used as given moves its distance by 0.0018, far more than the certificate's
    slack, so what is accepted is made exact (in float64, then float32: norms within ~1e-7 of 1)."""
    a = np.asarray(array, dtype=np.float64)
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    bad = ~(np.abs(norms - 1.0) <= tolerance)  # NaN fails too
    if bad.any():
        shown = ", ".join(f"{n:.10g}" for n in norms[bad][:4])  # enough digits to see why (1.0010001)
        raise TensorError(f"{name}: vectors must be unit length (within {tolerance:g}); norms [{shown}]")
    return (a / norms).astype(np.float32)


def unit_scene(scene: Scene, name: str = "scene_embedding") -> Scene:
    """The scene with each of its vectors made unit length (`unit_rows`)."""
    return Scene(
        unit_rows(scene.global_, f"{name}.global"),
        unit_rows(scene.local, f"{name}.local"),
        unit_rows(scene.attention, f"{name}.attention"),
    )


# Tensor.values goes through its wire form: proto3 packs a repeated float as one block of little-endian
# float32s (field 2, wire type 2), which numpy reads and writes whole. Through the message API every value
# is a Python float: ~200 µs for a scene's 4,224 values, against ~3 µs this way.
_VALUES_TAG = (2 << 3) | 2


def to_tensor(array: NDArray) -> embeddings_pb2.Tensor:
    a = np.ascontiguousarray(array, dtype="<f4")
    tensor = embeddings_pb2.Tensor.FromString(_varint(_VALUES_TAG) + _varint(a.nbytes) + a.tobytes())
    tensor.shape.extend(a.shape)
    return tensor


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _values(tensor: embeddings_pb2.Tensor) -> F32:
    """tensor.values as float32, read from the packed block of the message's serialized form."""
    data = tensor.SerializeToString()
    pos = 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        if tag & 7 != 2:  # only the two packed fields exist; anything else: the message API
            break
        length, pos = _read_varint(data, pos)
        if tag == _VALUES_TAG and length % 4 == 0:
            return np.frombuffer(data, dtype="<f4", count=length // 4, offset=pos).astype(np.float32)
        pos += length
    return np.asarray(tensor.values, dtype=np.float32)


def from_tensor(tensor: embeddings_pb2.Tensor, name: str, shape: tuple[int | None, ...]) -> F32:
    """The array of `tensor`; `shape` may hold None for a free dimension. Rejects NaN/inf."""
    dims = tuple(tensor.shape)
    values = _values(tensor)
    if not dims:
        raise TensorError(f"{name}: the tensor has no shape (expected {_fmt(shape)})")
    if int(np.prod(dims)) != values.size:
        raise TensorError(f"{name}: shape {list(dims)} needs {int(np.prod(dims))} values, got {values.size}")
    if len(dims) != len(shape) or any(e is not None and e != d for e, d in zip(shape, dims)):
        raise TensorError(f"{name}: expected shape {_fmt(shape)}, got {list(dims)}")
    if not np.isfinite(values).all():
        raise TensorError(f"{name}: holds NaN or infinite values")
    return values.reshape(dims)


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def scene_to_proto(scene: Scene, model_version: str) -> embeddings_pb2.SceneEmbedding:
    return embeddings_pb2.SceneEmbedding(
        model_version=model_version,
        **{"global": to_tensor(scene.global_)},
        local=to_tensor(scene.local),
        attention=to_tensor(scene.attention),
    )


def scene_from_proto(msg: embeddings_pb2.SceneEmbedding, regions: int, embedding_dim: int) -> Scene:
    d = embedding_dim
    return Scene(
        from_tensor(getattr(msg, "global"), "scene_embedding.global", (d,)),
        from_tensor(msg.local, "scene_embedding.local", (regions, d)),
        from_tensor(msg.attention, "scene_embedding.attention", (regions, d)),
    )


def product_to_proto(
    style: NDArray, attention_key: NDArray, model_version: str
) -> embeddings_pb2.ProductEmbedding:
    return embeddings_pb2.ProductEmbedding(
        style=to_tensor(style), attention_key=to_tensor(attention_key), model_version=model_version
    )


def product_from_proto(msg: embeddings_pb2.ProductEmbedding, embedding_dim: int) -> tuple[F32, F32]:
    """(style embedding, attention key), each [embedding_dim]."""
    return (
        from_tensor(msg.style, "embedding.style", (embedding_dim,)),
        from_tensor(msg.attention_key, "embedding.attention_key", (embedding_dim,)),
    )
