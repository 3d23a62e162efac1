"""The compiled graph walk over 8-bit codes, and the in-place re-scoring, on plain arrays (no Spark)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from batch_index.engine.graph import build_graph
from batch_index.engine.metrics import DEFAULT_METRICS, scores
from batch_index.engine.rescore import approx_scores, exact_scores
from batch_index.engine.tree import build_tree
from batch_index.engine.walk import ScalarCodes, VisitStamps, walk, walk_many


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(12, 200))
    return (rng.normal(size=(800, 12)) @ basis + 0.3 * rng.normal(size=(800, 200))).astype(np.float32)


@pytest.fixture(scope="module")
def graph(data: np.ndarray) -> np.ndarray:
    return build_graph(data, degree=8)


@pytest.fixture(scope="module")
def codes(data: np.ndarray) -> ScalarCodes:
    return ScalarCodes.encode(data, block=300)  # several blocks


def test_codes_round_to_within_half_a_step(data: np.ndarray, codes: ScalarCodes) -> None:
    err = np.abs(codes.decode(np.arange(len(data))) - data)
    assert codes.codes.dtype == np.int8
    assert (err <= 0.5 * codes.step * (1 + 1e-4) + 1e-6).all()
    decoded = codes.decode(np.arange(len(data)))
    np.testing.assert_allclose(codes.sq_norms, (decoded.astype(np.float64) ** 2).sum(axis=1), rtol=1e-4)


def test_codes_of_a_constant_coordinate_decode_to_it() -> None:
    x = np.zeros((10, 3), dtype=np.float32)
    x[:, 1] = 7.5
    x[:, 2] = np.arange(10)
    c = ScalarCodes.encode(x)
    np.testing.assert_allclose(c.decode(np.arange(10))[:, :2], x[:, :2], atol=1e-6)


def test_walk_distances_are_squared_distances_to_decoded_points(data: np.ndarray, graph: np.ndarray,
                                                                 codes: ScalarCodes) -> None:
    q = data[17] + 0.1
    ids, dist = walk(codes, graph, q, [0], 32, VisitStamps(len(data)))
    expect = ((codes.decode(ids).astype(np.float64) - q) ** 2).sum(axis=1)
    np.testing.assert_allclose(dist, expect, rtol=1e-3, atol=1e-2)
    assert len(ids) == 32 == len(np.unique(ids))


def test_walk_finds_the_true_nearest(data: np.ndarray, graph: np.ndarray, codes: ScalarCodes) -> None:
    rng = np.random.default_rng(1)
    visits = VisitStamps(len(data))
    hits = 0
    for _ in range(30):
        q = data[rng.integers(len(data))] + 0.05 * rng.normal(size=data.shape[1]).astype(np.float32)
        ids, _ = walk(codes, graph, q, np.array([0]), 32, visits)
        truth = int(np.argmin(((data - q) ** 2).sum(axis=1)))
        hits += truth in ids.tolist()
    assert hits >= 29


def test_walk_keeps_the_ef_nearest_of_what_it_scored(data: np.ndarray, graph: np.ndarray,
                                                     codes: ScalarCodes) -> None:
    visits = VisitStamps(len(data))
    q = data[100]
    _, dist = walk(codes, graph, q, np.arange(0, 800, 7), 20, visits)
    scored = np.flatnonzero(visits.stamps == visits.stamps.max())
    d_all = ((codes.decode(scored).astype(np.float64) - q) ** 2).sum(axis=1)
    assert dist.max() <= np.sort(d_all)[19] * (1 + 1e-4) + 1e-3  # nothing scored and nearer was dropped


def test_reused_visit_marks_give_fresh_results(data: np.ndarray, graph: np.ndarray, codes: ScalarCodes) -> None:
    visits = VisitStamps(len(data))
    for i in (7, 7, 11):
        fresh = walk(codes, graph, data[i], [0, 0, 5], 16, VisitStamps(len(data)))
        again = walk(codes, graph, data[i], [0, 0, 5], 16, visits)
        assert sorted(fresh[0].tolist()) == sorted(again[0].tolist())
    visits._mark = np.iinfo(np.int32).max - 1  # the mark wraps: stamps are cleared, walks stay correct
    for _ in range(3):
        again = walk(codes, graph, data[7], [0], 16, visits)
        assert sorted(again[0].tolist()) == sorted(walk(codes, graph, data[7], [0], 16, VisitStamps(800))[0].tolist())


def test_walk_with_huge_ef_visits_the_component(data: np.ndarray, graph: np.ndarray, codes: ScalarCodes) -> None:
    ids, _ = walk(codes, graph, data[3], np.array([0]), 10_000, VisitStamps(len(data)))
    assert sorted(ids.tolist()) == list(range(len(data)))  # reverse edges keep the graph connected here


def test_walks_in_threads_agree_with_one_thread(data: np.ndarray, graph: np.ndarray, codes: ScalarCodes) -> None:
    """The kernel releases the GIL; each thread has its own marks (as SearchIndex keeps them)."""
    expect = [sorted(walk(codes, graph, data[i], [0], 24, VisitStamps(800))[0].tolist()) for i in range(40)]
    got: dict[int, list[int]] = {}

    def run(part: range) -> None:
        visits = VisitStamps(len(data))
        for i in part:
            got[i] = sorted(walk(codes, graph, data[i], [0], 24, visits)[0].tolist())

    threads = [threading.Thread(target=run, args=(range(t, 40, 4),)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(40)] == expect


@pytest.mark.parametrize("metric", DEFAULT_METRICS)  # the compiled kernels serve the raw-sample metrics
def test_in_place_scores_match_exact_scores_on_a_memory_map(tmp_path: Path, data: np.ndarray, metric: str) -> None:
    path = tmp_path / "signals.npy"
    np.save(path, data)
    mm = np.load(path, mmap_mode="r")
    rows = np.array([[3, 5, 6, 100, 799], [-1, 7, -1, 8, 9]], dtype=np.int64)  # -1: no row, scored -inf
    q = np.stack([data[42] * 0.9 + 0.01, data[7] + 0.5])
    got = approx_scores(q, mm, rows, (data.astype(np.float32) ** 2).sum(axis=1), metric)
    exact = exact_scores(q, mm, rows, metric)
    for i in range(2):
        real = rows[i] >= 0
        want = scores(q[i], data[rows[i][real]], metric)
        np.testing.assert_allclose(exact[i][real], want, rtol=1e-12)  # float64, as exact mode
        assert (exact[i][~real] == -np.inf).all() and (got[i][~real] == -np.inf).all()
        if metric == "euclidean":  # approx_scores gives -|q - x|^2, the order of 1 / (1 + |q - x|)
            want = -((data[rows[i][real]].astype(np.float64) - q[i]) ** 2).sum(axis=1)
        if metric == "manhattan":
            want = -np.abs(data[rows[i][real]].astype(np.float64) - q[i]).sum(axis=1)
        np.testing.assert_allclose(got[i][real], want, rtol=1e-4, atol=1e-2)


def test_walk_many_equals_one_walk_per_query_from_the_tree_seeds(data: np.ndarray, graph: np.ndarray,
                                                                 codes: ScalarCodes) -> None:
    tree = build_tree(data, branching=4, leaf_size=16)
    queries = data[:30] + 0.05
    ids, dist = walk_many(codes, graph, queries, tree.descent(data, n_probe=2), 24, VisitStamps(len(data)))
    assert ids.shape == dist.shape == (30, 24)
    for i, q in enumerate(queries):
        one, d = walk(codes, graph, q, tree.search(data, q, n_probe=2), 24, VisitStamps(len(data)))
        assert sorted(ids[i][ids[i] >= 0].tolist()) == sorted(one.tolist())
        np.testing.assert_allclose(np.sort(dist[i][ids[i] >= 0]), np.sort(d), rtol=1e-5)
    tiny = walk_many(codes, graph, queries[:2], tree.descent(data, n_probe=1), 5000, VisitStamps(len(data)))[0]
    assert ((tiny >= 0).sum(axis=1) == len(data)).all() and (tiny == -1).any()  # ef past the shard: -1 padded
