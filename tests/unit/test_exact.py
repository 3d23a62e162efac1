"""Pruned exact search returns brute force's rows: random and adversarial data, every metric, any k."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch_index.build.shards import BuildConfig, build_index
from batch_index.corpus.synthetic import SynthConfig, generate
from batch_index.engine.block_sums import block_sums
from batch_index.engine.exact import QueryTerms, ShardBounds, brute_force_top_k, pruned_top_k
from batch_index.engine.metrics import DEFAULT_METRICS
from batch_index.engine.transform import ReferenceTransform
from batch_index.search import SearchIndex, SearchParams

KINDS = ("gaussian", "duplicates", "small-integers", "constant", "with-zeros", "one-hot")


def _corpus(rng: np.random.Generator, kind: str, n: int, d: int, scale: float) -> np.ndarray:
    if kind == "gaussian":
        x = rng.standard_normal((n, d))
    elif kind == "duplicates":  # a few distinct rows, repeated: ties at every rank
        x = rng.standard_normal((max(1, n // 7), d))[rng.integers(0, max(1, n // 7), n)]
    elif kind == "small-integers":  # many equal distances
        x = rng.integers(-2, 3, (n, d)).astype(np.float64)
    elif kind == "constant":  # flat signals at a few levels
        x = np.repeat(rng.integers(-3, 4, (n, 1)).astype(np.float64), d, axis=1)
    elif kind == "with-zeros":  # lead-off windows: cosine 0
        x = rng.standard_normal((n, d))
        x[rng.random(n) < 0.3] = 0.0
    else:
        x = np.zeros((n, d))
        x[np.arange(n), rng.integers(0, d, n)] = rng.choice([1.0, 2.0], n)
    return (x * scale).astype(np.float32)


def _queries(rng: np.random.Generator, x: np.ndarray, scale: float) -> np.ndarray:
    """Corpus members (distance 0, exact ties with their duplicates), near copies, fresh rows, a zero query."""
    n, d = x.shape
    picks = x[rng.integers(0, n, 3)]
    near = picks + (0.01 * scale * rng.standard_normal(picks.shape)).astype(np.float32)
    return np.vstack([picks, near, (scale * rng.standard_normal((2, d))).astype(np.float32),
                      np.zeros((1, d), np.float32)])


def _check(x: np.ndarray, q: np.ndarray, rank: int, l1_blocks: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    refs = x[np.sort(rng.choice(len(x), size=min(len(x), max(rank, 1) + 3), replace=False))]
    try:
        transform = ReferenceTransform.fit(refs, rank=rank)
    except Exception:  # all-zero references: no transform, no index (build_index refuses them too)
        transform = ReferenceTransform.fit(rng.standard_normal((rank + 1, x.shape[1])).astype(np.float32), rank)
    z, norms = transform.apply(x)
    sb = ShardBounds.of(z, norms, block_sums(x, l1_blocks) if l1_blocks else None)
    zq, nq = transform.apply(q)
    terms = QueryTerms.of(q, zq, nq, l1_blocks)
    for metric in DEFAULT_METRICS:  # the raw-sample metrics: shape and zeuclidean have exact modes of their own
        rows, sc, scored = pruned_top_k(terms, sb, x, metric, k)
        assert rows.shape == (len(q), min(k, len(x)))
        for i in range(len(q)):
            want_rows, want_sc = brute_force_top_k(q[i], x, metric, k)
            np.testing.assert_array_equal(rows[i], want_rows, err_msg=f"{metric}, query {i}")
            np.testing.assert_array_equal(sc[i], want_sc, err_msg=f"{metric}, query {i}")
        assert (scored <= len(x)).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), n=st.integers(1, 400), d=st.integers(1, 72), rank=st.integers(1, 48),
       blocks=st.integers(0, 30), k=st.one_of(st.integers(1, 50), st.integers(250, 450)),
       exponent=st.integers(-15, 15), seed=st.integers(0, 2**31))
def test_pruned_exact_is_brute_force(kind: str, n: int, d: int, rank: int, blocks: int, k: int, exponent: int,
                                     seed: int) -> None:
    rng = np.random.default_rng(seed)
    scale = 10.0 ** exponent
    x = _corpus(rng, kind, n, d, scale)
    _check(x, _queries(rng, x, scale), min(rank, d), min(blocks, d), k, seed)


SYN = SynthConfig(sampling_rate=50.0, duration_s=10.0, seed=11)


@pytest.fixture(scope="module")
def ecg_index(tmp_path_factory) -> tuple[SearchIndex, np.ndarray, np.ndarray]:
    ids, _, x = generate(0, 3000, SYN)
    path = build_index(ids, x, tmp_path_factory.mktemp("exact") / "v", BuildConfig(
        n_references=256, reference_sample=1024, basis_rank=128, leaf_size=24, branching=8, graph_degree=12),
        n_shards=2)
    return SearchIndex.load(path), x, generate(50_000, 12, SYN)[2]


@pytest.mark.parametrize("metric", DEFAULT_METRICS)
def test_exact_mode_is_brute_force_and_prunes_on_ecg(ecg_index, metric: str) -> None:
    index, x, q = ecg_index
    got = index.search_arrays(q, metric, "exact", 10, SearchParams())
    # the index keeps its shards' signals where their content partition put them: compare by id
    ids = generate(0, len(x), SYN)[0]
    for i in range(len(q)):
        rows, sc = brute_force_top_k(q[i], x, metric, 10)
        assert index.ids_of(got[0][i]) == [ids[r] for r in rows]
        np.testing.assert_array_equal(got[1][i], sc)
    two = index.search_arrays(q, metric, "exact", 10, SearchParams(), threads=2)
    np.testing.assert_array_equal(two[0], got[0])
    zq, nq = index.transform.apply(q)
    terms = QueryTerms.of(q, zq, nq, index.l1_blocks)
    shard = index.shards[0]
    scored = pruned_top_k(terms, shard.bounds, shard.signals, metric, 10)[2]
    # the point of it: most signals are never read (dot's bound is the loosest: norms dominate it)
    assert np.median(scored) < 0.5 * len(shard.ids), scored


def test_exact_mode_handles_k_above_the_index_size(ecg_index) -> None:
    index, x, q = ecg_index
    got = index.search_arrays(q[:2], "cosine", "exact", len(x) + 5, SearchParams())
    assert got[0].shape == (2, len(x))
    assert sorted(got[0][0].tolist()) == list(range(len(x)))
