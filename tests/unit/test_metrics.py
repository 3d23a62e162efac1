"""Metrics against hand-worked values and a plain numpy brute force."""

from __future__ import annotations

import numpy as np
import pytest

from batch_index.engine.metrics import DEFAULT_METRICS, parse_metrics, scores, top_k, top_k_exact
from batch_index.errors import UnknownMetricError

Q = np.array([1.0, 0.0])
X = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [0.0, 0.0]])


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("cosine", [1.0, 0.0, 0.6, 0.0]),  # zero vector: defined as 0, not NaN
        ("euclidean", [1.0, 1 / (1 + np.sqrt(2)), 1 / (1 + np.sqrt(20)), 0.5]),
        ("manhattan", [1.0, 1 / 3, 1 / 7, 0.5]),
        ("dot", [1.0, 0.0, 3.0, 0.0]),
    ],
)
def test_hand_worked_values(metric: str, expected: list[float]) -> None:
    np.testing.assert_allclose(scores(Q, X, metric), expected, rtol=1e-12)


def _numpy_truth(q: np.ndarray, x: np.ndarray, metric: str) -> np.ndarray:
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    if metric == "cosine":
        return x64 @ q64 / (np.linalg.norm(x64, axis=1) * np.linalg.norm(q64))
    if metric == "euclidean":
        return 1 / (1 + np.sqrt(((x64 - q64) ** 2).sum(axis=1)))
    if metric == "manhattan":
        return 1 / (1 + np.abs(x64 - q64).sum(axis=1))
    return x64 @ q64


@pytest.mark.parametrize("metric", DEFAULT_METRICS)  # shape metrics: tests/unit/test_shape.py
def test_top_k_exact_equals_plain_numpy(metric: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 40)).astype(np.float32)
    q = rng.normal(size=(7, 40)).astype(np.float32)
    idx, sc = top_k_exact(q, x, metric, 10, block=128)  # several blocks
    for i in range(len(q)):
        truth = _numpy_truth(q[i], x, metric)
        order = np.argsort(-truth, kind="stable")[:10]
        np.testing.assert_array_equal(idx[i], order)
        np.testing.assert_allclose(sc[i], truth[order], rtol=1e-9)


def test_ties_broken_by_lower_index() -> None:
    x = np.array([[1.0, 0.0]] * 5 + [[2.0, 0.0]])
    idx, _ = top_k_exact(np.array([2.0, 0.0]), x, "euclidean", 3)
    assert idx[0].tolist() == [5, 0, 1]
    assert top_k(np.array([0.5, 0.9, 0.5, 0.9]), 3).tolist() == [1, 3, 0]


def test_k_larger_than_corpus_returns_everything() -> None:
    idx, _ = top_k_exact(Q, X, "dot", 10)
    assert sorted(idx[0].tolist()) == [0, 1, 2, 3]


def test_unknown_metric_names_the_valid_ones() -> None:
    with pytest.raises(UnknownMetricError, match="cosine, euclidean, manhattan, dot"):
        scores(Q, X, "hamming")
    with pytest.raises(UnknownMetricError, match="hamming"):
        parse_metrics("cosine,hamming")


def test_parse_metrics_canonical_order_and_dedup() -> None:
    assert parse_metrics("dot, cosine,dot") == ("cosine", "dot")
