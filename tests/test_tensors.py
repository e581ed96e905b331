"""ctl.tensors reads and writes Tensor.values through the wire form: it must equal the message API exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from ctl.errors import TensorError
from ctl.tensors import from_tensor, to_tensor
from ctl.v1 import embeddings_pb2

FLOATS = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=40), elements=FLOATS))
def test_round_trip_equals_the_message_api(array: np.ndarray) -> None:
    by_api = embeddings_pb2.Tensor(shape=list(array.shape), values=array.ravel().tolist())
    fast = to_tensor(array)
    assert fast == by_api and fast.SerializeToString() == by_api.SerializeToString()
    parsed = embeddings_pb2.Tensor.FromString(by_api.SerializeToString())  # as a server receives it
    got = from_tensor(parsed, "t", tuple(None for _ in array.shape))
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, array)


def test_values_written_unpacked_are_read_too() -> None:
    # A peer may send the repeated float unpacked (field 2, wire type 5, one tag per value): legal protobuf.
    values = np.array([1.5, -2.0, 3.25], dtype="<f4")
    wire = bytes([0x0A, 0x01, 0x03])  # shape: packed [3]
    wire += b"".join(bytes([0x15]) + v.tobytes() for v in values)
    tensor = embeddings_pb2.Tensor.FromString(wire)
    np.testing.assert_array_equal(from_tensor(tensor, "t", (3,)), values)


def test_bad_tensors_are_named() -> None:
    with pytest.raises(TensorError, match=r"t: shape \[2, 2\] needs 4 values, got 3"):
        from_tensor(to_tensor(np.zeros(3)).__class__(shape=[2, 2], values=[0, 0, 0]), "t", (2, 2))
    with pytest.raises(TensorError, match="NaN or infinite"):
        from_tensor(to_tensor(np.array([1.0, np.inf])), "t", (2,))
    with pytest.raises(TensorError, match=r"expected shape \[3\]"):
        from_tensor(to_tensor(np.zeros(4)), "t", (3,))
