"""The shape and zeuclidean metrics: hand-worked answers, the spectral bound, and their index modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from batch_index.build.shards import BuildConfig, build_index
from batch_index.corpus.synthetic import SynthConfig, generate
from batch_index.engine.metrics import scores, top_k_exact
from batch_index.engine.shape import (
    fft_length,
    shape_scores,
    spectral_features,
    zeuclidean_scores,
    znormalise,
)
from batch_index.errors import InvalidInputError
from batch_index.search import SearchIndex, SearchParams

SYN = SynthConfig(sampling_rate=50.0, duration_s=10.0, seed=11)  # 500 samples


@pytest.fixture(scope="module")
def ecg() -> np.ndarray:
    return generate(0, 400, SYN)[2]


def _brute_ncc(q: np.ndarray, x: np.ndarray, max_lag: int) -> tuple[float, int]:
    """Direct sums over every lag, no FFT: sum_t q[t] x[t - l] of unit-norm z-normalised signals."""
    a, b = znormalise(q)[0], znormalise(x)[0]
    n = len(a)
    best, arg = -np.inf, 0
    for lag in sorted(range(-max_lag, max_lag + 1), key=lambda v: (abs(v), v)):
        v = float(a[lag:] @ b[:n - lag]) if lag >= 0 else float(a[:n + lag] @ b[-lag:])
        if v > best + 1e-12:
            best, arg = v, lag
    return best, arg


def test_fft_ncc_equals_direct_sums_and_reports_the_lag(ecg: np.ndarray) -> None:
    q = ecg[0]
    got, lags = shape_scores(q, ecg[:30], 60)
    for x, s, lag in zip(ecg[:30], got, lags):
        want, want_lag = _brute_ncc(q, x, 60)
        assert s == pytest.approx(want, abs=1e-9)
        assert lag == want_lag


def test_a_shifted_copy_scores_its_overlap_and_the_lag_aligns_it(ecg: np.ndarray) -> None:
    long = np.concatenate([ecg[1], ecg[2]])
    q, shifted = long[50:550], long[80:580]  # q[t] = shifted[t - 30]
    (s,), (lag,) = shape_scores(q, shifted[None], 75)
    assert lag == 30
    assert 0.8 < s <= 1.0  # 470 of 500 samples shared, each side z-normalised over its own window
    # at lag 0 the raw-sample metrics see another signal
    assert scores(q, shifted[None], "cosine")[0] < s - 0.2


def test_gain_and_baseline_do_not_change_either_metric(ecg: np.ndarray) -> None:
    q = ecg[3].astype(np.float64)
    x = np.stack([q, 3.5 * q - 7.0, 0.01 * q + 100.0])
    np.testing.assert_allclose(shape_scores(q, x, 75)[0], 1.0, atol=1e-9)
    np.testing.assert_allclose(zeuclidean_scores(q, x), 1.0, atol=1e-6)


def test_a_sign_flipped_copy_scores_low(ecg: np.ndarray) -> None:
    q = ecg[4]
    s, _ = shape_scores(q, -q[None], 75)
    assert s[0] < 0.5
    assert zeuclidean_scores(q, -q[None])[0] == pytest.approx(1 / (1 + 2 * np.sqrt(500)))


def test_the_lag_bound_is_respected(ecg: np.ndarray) -> None:
    long = np.concatenate([ecg[5], ecg[6]])
    q, far = long[0:500], long[100:600]  # the match is 100 samples away
    within, lag_in = shape_scores(q, far[None], 120)
    outside, lag_out = shape_scores(q, far[None], 40)
    assert lag_in[0] == 100 and within[0] > 0.6
    assert abs(lag_out[0]) <= 40 and outside[0] < within[0] - 0.1
    assert shape_scores(q, far[None], 0)[0][0] == pytest.approx(float(znormalise(q)[0] @ znormalise(far)[0]))


def test_flat_windows_score_zero_and_do_not_divide_by_zero() -> None:
    rng = np.random.default_rng(0)
    flat = np.full((1, 200), 3.0)
    live = rng.normal(size=(1, 200))
    with np.errstate(all="raise"):
        assert shape_scores(flat[0], live, 20)[0][0] == 0.0
        assert shape_scores(live[0], np.vstack([flat, np.zeros((1, 200))]), 20)[0].tolist() == [0.0, 0.0]
        # a flat window is the zero vector after z-normalisation: sqrt(n) from any live one
        assert zeuclidean_scores(flat[0], live)[0] == pytest.approx(1 / (1 + np.sqrt(200)))
        assert zeuclidean_scores(flat[0], flat)[0] == 1.0


def test_zeuclidean_is_the_ucr_distance() -> None:
    rng = np.random.default_rng(1)
    q, x = rng.normal(size=64), rng.normal(size=(5, 64))
    z = lambda v: (v - v.mean(axis=-1, keepdims=True)) / v.std(axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(zeuclidean_scores(q, x), 1 / (1 + np.linalg.norm(z(x) - z(q), axis=1)), rtol=1e-12)


def test_spectral_features_bound_ncc_at_every_lag(ecg: np.ndarray) -> None:
    nfft = fft_length(500, 75)
    xz = znormalise(ecg, np.float32)
    f = spectral_features(xz, nfft, 64)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)  # Parseval
    bound = f[:20] @ f.T
    for i in range(20):
        s, _ = shape_scores(ecg[i], ecg, 75)
        assert np.all(bound[i] + 1e-5 >= s)
    # features do not see a circular shift at all
    rolled = np.roll(xz[:3], 37, axis=1)
    np.testing.assert_allclose(spectral_features(rolled, 500, 64), spectral_features(xz[:3], 500, 64), atol=1e-5)


def test_bad_lag_is_a_clear_error(ecg: np.ndarray) -> None:
    with pytest.raises(InvalidInputError, match="max lag"):
        shape_scores(ecg[0], ecg[:2], 500)
    with pytest.raises(InvalidInputError, match="shape_max_lag"):
        BuildConfig(shape_max_lag=-1)
    with pytest.raises(InvalidInputError, match="max lag"):
        build_index(["a", "b"], ecg[:2], Path("/nonexistent/never-created"), BuildConfig(metrics=("shape",),
                                                                                        shape_max_lag=900))


@pytest.mark.parametrize("metric", ["shape", "zeuclidean"])
def test_top_k_exact_scores_every_point(ecg: np.ndarray, metric: str) -> None:
    idx, sc = top_k_exact(ecg[:3], ecg, metric, 5, block=64)
    for i in range(3):
        truth = scores(ecg[i], ecg, metric)
        order = np.argsort(-truth, kind="stable")[:5]
        np.testing.assert_array_equal(idx[i], order)
        np.testing.assert_allclose(sc[i], truth[order], rtol=1e-12)


@pytest.fixture(scope="module")
def shape_index(ecg: np.ndarray, tmp_path_factory) -> SearchIndex:
    cfg = BuildConfig(metrics=("cosine", "shape", "zeuclidean"), n_references=300, basis_rank=192, leaf_size=16,
                      branching=4, graph_degree=8, shape_bins=96, shape_rank=48, shape_max_lag=60)
    ids = [f"w{i}" for i in range(len(ecg))]
    return SearchIndex.load(build_index(ids, ecg, tmp_path_factory.mktemp("shape") / "v1", cfg, n_shards=2))


def test_manifest_records_the_shape_spaces(shape_index: SearchIndex) -> None:
    m = shape_index.manifest
    assert m["shape_spaces"] == ["shape", "zeuclidean"] and m["spaces"] == ["cosine"]
    assert m["shape_max_lag"] == 60 and m["shape_nfft"] == fft_length(500, 60) and shape_index.shape_max_lag == 60
    assert sum(name.endswith("graph-shape.npy") for name in m["files"]) == 2


@pytest.mark.parametrize("metric", ["shape", "zeuclidean"])
def test_exact_mode_is_brute_force(shape_index: SearchIndex, ecg: np.ndarray, metric: str) -> None:
    queries = generate(50_000, 6, SYN)[2]
    got = shape_index.search(queries, metric, "exact", k=8)
    for q, matches in zip(queries, got):
        truth = scores(q, ecg, metric, max_lag=60)
        order = np.argsort(-truth, kind="stable")[:8]
        assert [m.id for m in matches] == [f"w{i}" for i in order]
        np.testing.assert_allclose([m.score for m in matches], truth[order], rtol=1e-9)


@pytest.mark.parametrize("metric", ["shape", "zeuclidean"])
def test_exact_mode_on_one_loaded_shard_is_that_shards_brute_force(shape_index: SearchIndex, ecg: np.ndarray,
                                                                   metric: str) -> None:
    """An executor loads only its shards: the second one starts at a global row above 0 (its exact
    ``shape`` sweep once read the first shard's rows in its place, a silent wrong answer)."""
    part = SearchIndex.load(shape_index.path, shards=[1])
    lo, signals = part.shards[0].offset, ecg[[int(i[1:]) for i in part.shards[0].ids]]
    assert lo > 0
    queries = generate(50_000, 4, SYN)[2]
    rows, sc = part.search_arrays(queries, metric, "exact", 6, SearchParams.for_metric(metric))
    for q, got, got_s in zip(queries, rows, sc):
        truth = scores(q, signals, metric, max_lag=60)
        order = np.argsort(-truth, kind="stable")[:6]
        assert list(got) == list(order + lo)
        np.testing.assert_allclose(got_s, truth[order], rtol=1e-9)


def test_exact_shape_sweep_equals_brute_force_across_query_groups(shape_index: SearchIndex, ecg: np.ndarray) -> None:
    """40 queries span two groups of the sweep; the shifted copies' high scores let the bound prune."""
    long = np.hstack([ecg[:20], ecg[1:21]])
    queries = np.vstack([long[:, 25:525], generate(70_000, 20, SYN)[2]])
    got, sc = shape_index.search_arrays(queries, "shape", "exact", 5, SearchParams.for_metric("shape"))
    for q, rows, s in zip(queries, got, sc):
        truth = scores(q, ecg, "shape", max_lag=60)
        order = np.argsort(-truth, kind="stable")[:5]
        # the index keeps signals where the content partition put them: rows compare by id ("w<position>")
        assert shape_index.ids_of(rows) == [f"w{i}" for i in order]
        np.testing.assert_allclose(s, truth[order], rtol=1e-9)


def test_exact_shape_with_k_near_the_corpus_size_returns_every_row(shape_index: SearchIndex, ecg: np.ndarray) -> None:
    got, sc = shape_index.search_arrays(ecg[:2], "shape", "exact", 395, SearchParams.for_metric("shape"))
    for q, rows, s in zip(ecg[:2], got, sc):
        truth = scores(q, ecg, "shape", max_lag=60)
        np.testing.assert_allclose(s, np.sort(truth)[::-1][:395], rtol=1e-9)
        assert len(set(rows.tolist())) == 395


@pytest.mark.parametrize("metric", ["shape", "zeuclidean"])
@pytest.mark.parametrize("mode", ["transform", "hkmeans"])
def test_approximate_modes_find_shifted_copies_and_most_of_exact(shape_index: SearchIndex, ecg: np.ndarray,
                                                                 metric: str, mode: str) -> None:
    params = SearchParams.for_metric(metric, ef=96, rerank=96)
    if metric == "shape":  # a corpus window cut 0.5 s later (and rescaled) finds its source first
        long = np.hstack([ecg[:20], ecg[1:21]])
        q = 2.0 * long[:, 25:525] + 1.0
        top = shape_index.search_arrays(q, metric, mode, 1, params)[0][:, 0]
        assert np.mean(np.array(shape_index.ids_of(top)) == np.array([f"w{i}" for i in range(20)])) >= 0.9
    queries = generate(60_000, 20, SYN)[2]
    truth, _ = shape_index.search_arrays(queries, metric, "exact", 10, params)
    got, sc = shape_index.search_arrays(queries, metric, mode, 10, params)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])
    # measured 0.835 (shape) and 0.945 (zeuclidean) with 96 of 400 re-ranked
    assert recall >= 0.8, f"{mode}/{metric} recall@10 {recall:.3f}"
    assert np.all(np.diff(sc, axis=1) <= 1e-12)
    one = shape_index.search_arrays(queries, metric, mode, 10, params)
    two = shape_index.search_arrays(queries, metric, mode, 10, params, threads=2)
    np.testing.assert_array_equal(one[0], two[0])


def test_old_indexes_without_shape_spaces_still_load(ecg: np.ndarray, tmp_path: Path) -> None:
    idx = SearchIndex.load(build_index([f"w{i}" for i in range(100)], ecg[:100], tmp_path / "old",
                                       BuildConfig(n_references=32, basis_rank=16)))
    assert "shape_spaces" not in idx.manifest and idx.shape_max_lag == 0
    assert idx.search(ecg[:1], "cosine", "hkmeans", k=1)[0][0].id == "w0"
    with pytest.raises(InvalidInputError, match="not in this index"):
        idx.search(ecg[:1], "shape", "exact", k=1)


def test_send_one_plot_overlays_shape_matches_at_their_best_lag(shape_index: SearchIndex, ecg: np.ndarray,
                                                                 tmp_path: Path) -> None:
    from streaming.cli import plot_matches

    long = np.concatenate([ecg[7], ecg[8]])
    q = long[40:540]
    matches = [(m.id, m.score, m.rank) for m in shape_index.search(q, "shape", "exact", k=3)[0]]
    assert matches[0][0] == "w7"
    out = tmp_path / "plot.png"
    plot_matches(out, "q", q, matches, shape_index.path, metric="shape")
    assert out.stat().st_size > 10_000
    assert shape_scores(q, ecg[7:8], shape_index.shape_max_lag)[1][0] == -40  # q[t] = w7[t + 40]: shift w7 left
