"""The numpy distances (ranker) against the torch ones (training), and their invariants."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from style_model import distances as npd
from style_model import model as tmd


def _unit(rng, *shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("attention", ["paper", "seed"])
@pytest.mark.parametrize("seed", range(5))
def test_numpy_matches_torch(attention, seed):
    rng = np.random.default_rng(seed)
    r, d, n = 16, 128, 37
    f_s, f_i, h_i = _unit(rng, d), _unit(rng, r, d), _unit(rng, r, d)
    f_p, c_p = _unit(rng, n, d), _unit(rng, n, d)
    got = npd.hybrid_distances(f_s, f_i, h_i, f_p, c_p, attention)
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    hyb, glo, loc = tmd.hybrid_distance(
        t(np.repeat(f_s[None], n, 0)),
        t(np.repeat(f_i[None], n, 0)),
        t(np.repeat(h_i[None], n, 0)),
        t(f_p),
        t(c_p),
        attention,
    )
    np.testing.assert_allclose(got.hybrid, hyb.numpy(), atol=1e-5)
    np.testing.assert_allclose(got.global_, glo.numpy(), atol=1e-5)
    np.testing.assert_allclose(got.local, loc.numpy(), atol=1e-5)
    weights = tmd.attention_weights(t(np.repeat(h_i[None], n, 0)), t(c_p), attention)
    np.testing.assert_allclose(got.attention, weights.numpy(), atol=1e-5)
    # the matrix form used in training agrees with the row-wise one
    matrix = tmd.hybrid_distance_matrix(t(f_s[None]), t(f_i[None]), t(h_i[None]), t(f_p), t(c_p), attention)
    np.testing.assert_allclose(matrix.numpy()[0], got.hybrid, atol=1e-5)


def test_float32_inputs_agree_with_float64():
    rng = np.random.default_rng(7)
    args = (_unit(rng, 64), _unit(rng, 9, 64), _unit(rng, 9, 64), _unit(rng, 50, 64), _unit(rng, 50, 64))
    d64 = npd.hybrid_distances(*args)
    d32 = npd.hybrid_distances(*(a.astype(np.float32) for a in args))
    np.testing.assert_allclose(d32.hybrid, d64.hybrid, atol=1e-5)


def test_inputs_are_not_modified():
    rng = np.random.default_rng(1)
    args = [_unit(rng, 8), _unit(rng, 4, 8), _unit(rng, 4, 8), _unit(rng, 5, 8), _unit(rng, 5, 8)]
    copies = [a.copy() for a in args]
    npd.hybrid_distances(*args)
    for a, c in zip(args, copies):
        np.testing.assert_array_equal(a, c)


def test_shape_errors_name_the_argument():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="scene_local"):
        npd.hybrid_distances(
            _unit(rng, 8), _unit(rng, 4, 8), _unit(rng, 3, 8), _unit(rng, 5, 8), _unit(rng, 5, 8)
        )
    with pytest.raises(ValueError, match="attention keys"):
        npd.hybrid_distances(
            _unit(rng, 8), _unit(rng, 4, 8), _unit(rng, 4, 8), _unit(rng, 5, 8), _unit(rng, 4, 8)
        )
    with pytest.raises(ValueError, match="attention="):
        npd.attention_weights(_unit(rng, 4, 8), _unit(rng, 5, 8), "positive")


def test_l2_normalize_guards_zero_vectors():
    out = npd.l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


# --- properties --------------------------------------------------------------------------------

_vec = st.integers(2, 12).flatmap(
    lambda d: st.tuples(st.just(d), st.integers(1, 9), st.integers(1, 6), st.integers(0, 2**31 - 1))
)


def _case(params):
    d, r, n, seed = params
    rng = np.random.default_rng(seed)
    return _unit(rng, d), _unit(rng, r, d), _unit(rng, r, d), _unit(rng, n, d), _unit(rng, n, d)


@settings(max_examples=200, deadline=None)
@given(_vec)
def test_attention_sums_to_one(params):
    _, _, h_i, _, c_p = _case(params)
    w = npd.attention_weights(h_i, c_p)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-9)
    assert (w >= 0).all()


@settings(max_examples=200, deadline=None)
@given(_vec)
def test_nearest_region_gets_the_largest_weight(params):
    _, _, h_i, _, c_p = _case(params)
    w = npd.attention_weights(h_i, c_p, "paper")
    sq = ((h_i[None, :, :] - c_p[:, None, :]) ** 2).sum(-1)
    nearest = sq.argmin(axis=1)
    assert np.allclose(w[np.arange(len(c_p)), nearest], w.max(axis=1))
    seed = npd.attention_weights(h_i, c_p, "seed")  # the seed's bug: the FARTHEST region wins
    assert np.allclose(seed[np.arange(len(c_p)), sq.argmax(axis=1)], seed.max(axis=1))


@settings(max_examples=200, deadline=None)
@given(_vec)
def test_distances_lie_in_0_4_and_hybrid_is_2_minus_s(params):
    f_s, f_i, h_i, f_p, c_p = _case(params)
    got = npd.hybrid_distances(f_s, f_i, h_i, f_p, c_p)
    for d in (got.hybrid, got.global_, got.local):
        assert (d >= 0).all() and (d <= 4 + 1e-9).all()
    s = f_p @ f_s + (got.attention * (f_p @ f_i.T)).sum(axis=1)  # S(p) = f_s.f_p + sum_i a_i f_i.f_p
    np.testing.assert_allclose(got.hybrid, 2.0 - s, atol=1e-9)
    upper = ((f_s[None, :] + f_i) @ f_p.T).max(axis=0)  # U(p) = max_i (f_s + f_i).f_p
    assert (s <= upper + 1e-9).all()


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, (3, 5), elements=st.floats(-1e3, 1e3)))
def test_squared_distances_are_non_negative(x):
    assert (npd.squared_distances(x, x) >= 0).all()
