"""The ranker's numpy kernels: exact rerank order, the upper bound behind `certify`, the pooled query."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctl.tensors import Scene
from ranker_service.rerank import bound_queries, certified, pooled_query, rank
from style_model.distances import hybrid_distances, l2_normalize


def random_scene(rng, regions=4, dim=16) -> Scene:
    return Scene(
        l2_normalize(rng.normal(size=dim)).astype(np.float32),
        l2_normalize(rng.normal(size=(regions, dim))).astype(np.float32),
        l2_normalize(rng.normal(size=(regions, dim))).astype(np.float32),
    )


def products(rng, n, dim=16, clusters=0):
    if clusters:
        centres = rng.normal(size=(clusters, dim))
        styles = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))
    else:
        styles = rng.normal(size=(n, dim))
    return (
        l2_normalize(styles).astype(np.float32),
        l2_normalize(rng.normal(size=(n, dim))).astype(np.float32),
    )


def test_rank_orders_by_exact_hybrid_distance():
    rng = np.random.default_rng(0)
    scene = random_scene(rng)
    styles, keys = products(rng, 300)
    ranked = rank(scene, styles, keys, 25)
    full = hybrid_distances(scene.global_, scene.local, scene.attention, styles, keys)
    assert ranked.order.tolist() == np.argsort(full.hybrid, kind="stable")[:25].tolist()
    np.testing.assert_allclose(ranked.distance, np.sort(full.hybrid)[:25], atol=1e-6)
    np.testing.assert_allclose(ranked.distance, (ranked.global_ + ranked.local) / 2, atol=1e-6)
    np.testing.assert_allclose(ranked.attention.sum(1), 1.0, atol=1e-5)


def test_rank_breaks_ties_by_input_order_and_handles_small_and_empty_inputs():
    rng = np.random.default_rng(1)
    scene = random_scene(rng)
    styles, keys = products(rng, 3)
    twice = rank(scene, np.concatenate([styles, styles]), np.concatenate([keys, keys]), 10)
    assert len(twice.order) == 6
    for a, b in zip(twice.order[::2], twice.order[1::2]):
        assert a % 3 == b % 3 and a < b  # each product's twin right after it
    assert len(rank(scene, styles[:0], keys[:0], 5).order) == 0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(2, 300), distinct=st.integers(1, 6), k=st.integers(1, 40))
def test_ties_at_the_cut_off_are_broken_by_input_order(seed, n, distinct, k):
    """Issue 14 #8: a catalog of a few products each listed many times (one image under several ids):
    the top k is the first k of a stable sort, whichever of the tied copies fall at the cut-off."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng)
    styles, keys = products(rng, distinct)
    pick = rng.integers(0, distinct, n)
    d = hybrid_distances(scene.global_, scene.local, scene.attention, styles, keys).hybrid[pick]
    ranked = rank(scene, styles[pick], keys[pick], k)
    assert ranked.order.tolist() == np.argsort(d, kind="stable")[:k].tolist()
    ids = [f"id{(7 * i) % n:04d}" for i in range(n)]  # another order than the input's
    by_id = rank(scene, styles[pick], keys[pick], k, tiebreak=ids)
    assert by_id.order.tolist() == sorted(range(n), key=lambda i: (d[i], ids[i]))[:k]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), clusters=st.sampled_from([0, 3]))
def test_bound_is_above_the_exact_score(seed, clusters):
    """S(p) = 2 - d(p) ≤ max_i (f_s + f_i)·f_p for every product: the certificate's premise."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng)
    styles, keys = products(rng, 200, clusters=clusters)
    d = hybrid_distances(scene.global_, scene.local, scene.attention, styles, keys).hybrid
    upper = (styles @ bound_queries(scene).T).max(1)
    assert np.all(2.0 - d <= upper + 1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), width=st.integers(5, 120), k=st.integers(1, 10))
def test_certified_answers_are_the_exact_top_k(seed, width, k):
    """Score only the union of each bound query's top `width`; whenever `certified` says so, the top k of
    that subset is the top k of the whole catalogue."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng)
    styles, keys = products(rng, 400, clusters=int(rng.integers(0, 4)))
    scores = styles @ bound_queries(scene).T  # [N, R]
    tops = np.argsort(-scores, axis=0)[:width]  # [width, R]
    seen = np.unique(tops)
    bounds = scores[tops[-1], np.arange(scores.shape[1])]
    sub = rank(scene, styles[seen], keys[seen], k)
    full = rank(scene, styles, keys, k)
    if certified(float(sub.distance[-1]), bounds):
        assert seen[sub.order].tolist() == full.order.tolist()


def test_certificate_needs_the_bound():
    rng = np.random.default_rng(5)
    scene = random_scene(rng)
    assert certified(1.0, np.array([0.5, 0.9]))  # every unseen product is at distance ≥ 1.1
    assert not certified(1.2, np.array([0.5, 0.9]))
    assert certified(3.9, np.array([-np.inf, -np.inf]))  # every query returned the whole category
    assert bound_queries(scene).shape == scene.local.shape


def test_pooled_query_weights_regions_by_attention_to_the_mean_key():
    rng = np.random.default_rng(2)
    scene = random_scene(rng)
    uniform = pooled_query(scene, None)
    np.testing.assert_allclose(uniform, scene.global_ + scene.local.mean(0), atol=1e-6)
    # a mean key equal to one region's attention embedding pulls the pool towards that region
    focused = pooled_query(scene, scene.attention[2])
    weights = (focused - scene.global_) @ np.linalg.pinv(scene.local)
    assert int(np.argmax(weights)) == 2


@pytest.mark.parametrize("n", [50, 1000])
def test_pooled_candidates_usually_hold_the_exact_top_10(n):
    """Recall of the pooled query at pool 100 on random data (the default's premise, DESIGN.md §2)."""
    rng = np.random.default_rng(n)
    recalls = []
    for _ in range(10):
        scene = random_scene(rng, dim=32)
        styles, keys = products(rng, n, dim=32, clusters=5)
        q = pooled_query(scene, keys.mean(0))
        pool = np.argsort(-(styles @ q))[:100]
        exact = set(rank(scene, styles, keys, 10).order.tolist())
        recalls.append(len(exact & set(pool.tolist())) / 10)
    assert np.mean(recalls) >= 0.9
