"""hkmeans on one shard in one compiled call (``engine.one_shard``) answers as the stage-by-stage path does,
to the bit: row ids and float64 scores, every raw-sample metric, one query or a batch, on ECG-like,
real-record and adversarial data (duplicates and zeros: ties where sets are cut)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batch_index.build.shards import BuildConfig, build_index
from batch_index.corpus.synthetic import SynthConfig, generate
from batch_index.corpus.wfdb import IngestConfig, windows_from_record
from batch_index.engine.metrics import DEFAULT_METRICS, scores
from batch_index.engine.transform import SPACE_OF_METRIC, space_queries
from batch_index.search import SearchIndex, SearchParams

CFG = BuildConfig(n_references=128, reference_sample=512, basis_rank=48, leaf_size=16, branching=6, graph_degree=10,
                  l1_blocks=25, seed=0)
SYN = SynthConfig(sampling_rate=50.0, duration_s=10.0, seed=5)  # 500 samples
#: the shipped defaults, a walk narrower than the re-rank, and a re-rank barely above k
PARAMS = ("defaults", SearchParams(ef=24, rerank=40), SearchParams(ef=64, rerank=12))


def _corpus(kind: str, wfdb_dir: Path | None = None) -> np.ndarray:
    rng = np.random.default_rng(11)
    if kind == "ecg":
        return generate(0, 900, SYN)[2]
    if kind == "real":
        assert wfdb_dir is not None
        x = windows_from_record(wfdb_dir / "100", IngestConfig(stride_s=2.0))[2]
        return np.ascontiguousarray(x[:700, ::5])  # 500 samples of each window: quick, still real
    base = generate(0, 120, SYN)[2]
    if kind == "duplicates":  # a few distinct rows, repeated: exact ties at every rank
        return np.ascontiguousarray(base[rng.integers(0, len(base), 700)])
    x = generate(0, 700, SYN)[2]  # "with-zeros": lead-off windows, cosine 0 to everything
    x[rng.random(len(x)) < 0.2] = 0.0
    return x


@pytest.fixture(scope="module", params=["ecg", "real", "duplicates", "with-zeros"])
def case(request, tmp_path_factory) -> tuple[str, SearchIndex, np.ndarray, np.ndarray]:
    kind = request.param
    x = _corpus(kind, request.getfixturevalue("wfdb_dir") if kind == "real" else None)
    path = build_index([f"s{i}" for i in range(len(x))], x, tmp_path_factory.mktemp(kind) / "v", CFG)
    rng = np.random.default_rng(2)
    picks = x[rng.integers(0, len(x), 6)]
    scale = float(np.abs(x).max()) or 1.0
    q = np.vstack([picks, picks + (0.02 * scale * rng.standard_normal(picks.shape)).astype(np.float32),
                   generate(10_000, 6, SYN)[2][:, :x.shape[1]], np.zeros((1, x.shape[1]), np.float32)])
    return kind, SearchIndex.load(path), x, np.ascontiguousarray(q, dtype=np.float32)


def _by_stages(index: SearchIndex, q: np.ndarray, metric: str, k: int, params: SearchParams,
               answer=SearchIndex._answer_by_stages):  # type: ignore[no-untyped-def]
    """The generic path's answer (``answer``: bound here, before any test wraps it)."""
    zq, nq = index.transform.apply(q)
    aq = space_queries(zq, nq, SPACE_OF_METRIC[metric])
    return answer(index, q, aq, metric, "hkmeans", min(k, index.size), params)


@pytest.mark.parametrize("params", PARAMS, ids=["defaults", "narrow-walk", "small-rerank"])
@pytest.mark.parametrize("metric", DEFAULT_METRICS)
def test_one_compiled_call_answers_as_the_stages_do(case, metric: str, params, monkeypatch) -> None:
    kind, index, x, q = case
    params = SearchParams.for_metric(metric) if params == "defaults" else params
    left: list[int] = []  # queries the kernel handed back to the stages
    by_stages = SearchIndex._answer_by_stages

    def counting(self, qq, *args, **kwargs):  # type: ignore[no-untyped-def]
        left.append(len(qq))
        return by_stages(self, qq, *args, **kwargs)

    monkeypatch.setattr(SearchIndex, "_answer_by_stages", counting)
    for k in (1, 10, 60):
        left.clear()
        # a batch against the stages' batch: where every score ties (the zero query under dot) the stages'
        # argpartition keeps rows that depend on the batch's width (dot widens for any of its queries)
        batch, want = index.search_arrays(q, metric, "hkmeans", k, params), _by_stages(index, q, metric, k, params)
        np.testing.assert_array_equal(batch[0], want[0], err_msg=f"{kind} {metric} k={k} batch")
        np.testing.assert_array_equal(batch[1], want[1], err_msg=f"{kind} {metric} k={k} batch")
        for i in range(len(q)):
            one = index.search_arrays(q[i:i + 1], metric, "hkmeans", k, params)
            want = _by_stages(index, q[i:i + 1], metric, k, params)
            np.testing.assert_array_equal(one[0], want[0], err_msg=f"{kind} {metric} k={k} query {i}")
            np.testing.assert_array_equal(one[1], want[1], err_msg=f"{kind} {metric} k={k} query {i}")
            real = want[0][0] >= 0
            np.testing.assert_allclose(one[1][0][real], scores(q[i], x[one[0][0][real]], metric), rtol=1e-12)
        # the point of it: most queries take the one call (not those whose walk keeps fewer than k, nor the
        # dot queries it widens, see SearchIndex._widened)
        if kind in ("ecg", "real") and metric != "dot" and k <= params.ef:
            assert sum(left) <= 0.2 * 2 * len(q), (k, left)


def test_ties_at_a_cut_go_to_the_stages(tmp_path: Path, monkeypatch) -> None:
    """Exact duplicates tie in the walk and in the re-rank: those queries must take the generic path."""
    x = _corpus("duplicates", None)
    index = SearchIndex.load(build_index([f"s{i}" for i in range(len(x))], x, tmp_path / "v", CFG))
    q = np.ascontiguousarray(x[:12])
    left: list[int] = []
    by_stages = SearchIndex._answer_by_stages
    monkeypatch.setattr(SearchIndex, "_answer_by_stages",
                        lambda self, qq, *a, **kw: left.append(len(qq)) or by_stages(self, qq, *a, **kw))
    index.search_arrays(q, "euclidean", "hkmeans", 10, SearchParams(ef=64, rerank=12))
    assert sum(left) > 0


def test_a_loaded_shard_of_many_answers_with_global_rows(tmp_path: Path) -> None:
    """An executor's share (one shard of two loaded) takes the one call too; its rows stay global."""
    x = generate(0, 800, SYN)[2]
    path = build_index([f"s{i}" for i in range(len(x))], x, tmp_path / "v", CFG, n_shards=2)
    share = SearchIndex.load(path, shards=[1])
    assert share.shards[0].offset > 0
    q = generate(20_000, 16, SYN)[2]
    for metric in DEFAULT_METRICS:
        params = SearchParams.for_metric(metric)
        got = share.search_arrays(q, metric, "hkmeans", 10, params)
        want = _by_stages(share, q, metric, 10, params)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert (got[0] >= share.shards[0].offset).all()
        two = share.search_arrays(q, metric, "hkmeans", 10, params, threads=2)
        np.testing.assert_array_equal(two[0], got[0])
        np.testing.assert_array_equal(two[1], got[1])


_BLAS_CAP_SCRIPT = """
from threadpoolctl import threadpool_info, threadpool_limits
from batch_index.search import _one_blas_thread

def blas():
    return sorted(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")

with threadpool_limits(limits=2, user_api="blas"):
    before = blas()
    assert set(before) == {2}, before
    with _one_blas_thread():
        assert set(blas()) == {1}, blas()
    assert blas() == before, blas()
    outer = _one_blas_thread()
    outer.__enter__()
    with _one_blas_thread():  # a second search entering while the first is inside, leaving first
        pass
    assert set(blas()) == {1}, ("the inner search's exit uncapped the outer one", blas())
    outer.__exit__(None, None, None)
    assert blas() == before, blas()
print("ok")
"""


def test_the_blas_cap_holds_one_thread_inside_and_restores_after() -> None:
    """One BLAS thread inside, the limits before restored after, also when a second search enters while
    the first is inside. In a process of its own: BLAS settings are per process, and searches that
    other tests leave running in the background (a streaming job's batches) move them (CI saw it)."""
    run = subprocess.run([sys.executable, "-c", _BLAS_CAP_SCRIPT], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
