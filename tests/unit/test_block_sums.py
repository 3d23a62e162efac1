"""Block sums: the L1 lower bound that orders manhattan candidates, its files, and what it buys."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from batch_index.build.shards import BuildConfig, build_index
from batch_index.corpus.synthetic import SynthConfig, generate
from batch_index.engine.block_sums import DEFAULT_L1_BLOCKS, block_starts, block_sums
from batch_index.engine.metrics import scores
from batch_index.engine.rescore import approx_scores
from batch_index.errors import InvalidInputError
from batch_index.search import SearchIndex, SearchParams

SMALL = BuildConfig(n_references=256, reference_sample=512, basis_rank=128, leaf_size=24, branching=8,
                    graph_degree=12)
SYN = SynthConfig(sampling_rate=125.0, duration_s=10.0, seed=3)  # 1,250 samples; 250 blocks of 40 ms


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], np.ndarray]:
    ids, _, x = generate(0, 3000, SYN)
    return ids, x


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return generate(50_000, 40, SYN)[2]


@pytest.fixture(scope="module")
def index_dir(corpus, tmp_path_factory) -> Path:
    ids, x = corpus
    return build_index(ids, x, tmp_path_factory.mktemp("l1") / "v1", SMALL, n_shards=2)


@pytest.mark.parametrize(("dim", "n_blocks", "expected"), [
    (10, 5, [0, 2, 4, 6, 8]), (7, 3, [0, 2, 4]), (3, 10, [0, 1, 2]), (2500, 100, list(range(0, 2500, 25)))])
def test_blocks_cover_every_sample_once(dim: int, n_blocks: int, expected: list[int]) -> None:
    assert block_starts(dim, n_blocks).tolist() == expected
    x = np.arange(dim, dtype=np.float32)[None, :]
    assert block_sums(x, n_blocks).sum() == pytest.approx(x.sum())


def l1_lower_bound(query_sums: np.ndarray, point_sums: np.ndarray) -> np.ndarray:
    """The bound as the search computes it: the compiled L1 of block sums that orders manhattan's candidates."""
    rows = np.arange(len(point_sums), dtype=np.int64)[None, :]
    no_norms = np.zeros(len(point_sums), np.float32)
    return -approx_scores(query_sums[None, :], np.ascontiguousarray(point_sums), rows, no_norms, "manhattan")[0]


def test_bound_never_exceeds_l1_and_is_tight_when_signs_agree_within_blocks(corpus, queries) -> None:
    _, x = corpus
    for q in queries[:5]:
        bound = l1_lower_bound(block_sums(q, 100)[0], block_sums(x, 100))
        true = np.abs(x.astype(np.float64) - q).sum(axis=1)
        assert np.all(bound <= true * (1 + 1e-5))
        assert np.corrcoef(bound, true)[0, 1] > 0.9  # ECG is smooth at its rate: the bound follows L1
    # a difference of one sign per block: the bound is the distance itself
    q = np.zeros((1, 12), np.float32)
    p = np.array([[1, 2, 3, -1, -1, -4, 0, 5, 5, -2, -2, -2]], np.float32)
    assert l1_lower_bound(block_sums(q, 4)[0], block_sums(p, 4))[0] == pytest.approx(np.abs(p).sum())


def test_bad_block_counts_refused() -> None:
    with pytest.raises(InvalidInputError, match="n_blocks"):
        block_starts(10, 0)
    with pytest.raises(InvalidInputError, match="l1_blocks"):
        BuildConfig(l1_blocks=-1)


def test_index_keeps_block_sums_only_when_it_serves_manhattan(corpus, index_dir: Path, tmp_path: Path) -> None:
    ids, x = corpus
    m = json.loads((index_dir / "manifest.json").read_text())
    assert m["l1_blocks"] == DEFAULT_L1_BLOCKS
    for shard in m["shards"]:
        rel = f"shards/{shard['shard']:05d}/l1-blocks.npy"
        assert rel in m["files"]  # checksummed like every other file
        part = np.load(index_dir / rel)
        # shards hold whichever signals their partition gave them, in the order of their ids file
        shard_ids = pq.read_table(index_dir / f"shards/{shard['shard']:05d}/ids.parquet").column("id").to_pylist()
        position = {sid: n for n, sid in enumerate(ids)}
        rows = x[[position[sid] for sid in shard_ids]]
        np.testing.assert_allclose(part, block_sums(rows, DEFAULT_L1_BLOCKS), rtol=1e-5)
    for name, cfg in (("no-manhattan", replace(SMALL, metrics=("cosine",))), ("off", replace(SMALL, l1_blocks=0))):
        out = build_index(ids[:600], x[:600], tmp_path / name, cfg)
        assert json.loads((out / "manifest.json").read_text())["l1_blocks"] == 0
        assert not list(out.glob("shards/*/l1-blocks.npy"))


def _recall(index: SearchIndex, q: np.ndarray, mode: str, params: SearchParams) -> float:
    truth, _ = index.search_arrays(q, "manhattan", "exact", 10, params)
    got, _ = index.search_arrays(q, "manhattan", mode, 10, params)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)]))


@pytest.mark.parametrize("mode", ["hkmeans", "transform"])
def test_block_order_finds_more_manhattan_neighbours_for_the_same_exact_work(index_dir: Path, queries,
                                                                               mode: str) -> None:
    """The same pool of candidates, the same 32 re-scored exactly: ordered by block sums, not L2."""
    with_blocks = SearchIndex.load(index_dir)
    l2_order = SearchIndex.load(index_dir)
    l2_order.manifest = {**l2_order.manifest, "l1_blocks": 0}  # as an index built before block sums
    params = SearchParams(n_probe=1, ef=256, rerank=32)
    a, b = _recall(with_blocks, queries, mode, params), _recall(l2_order, queries, mode, params)
    assert a >= 0.75 and a >= b + 0.15, f"{mode}: recall@10 {a:.3f} with block sums, {b:.3f} in L2 order"


def test_manhattan_scores_stay_exact(index_dir: Path, corpus, queries) -> None:
    ids, x = corpus
    index = SearchIndex.load(index_dir)
    row = {i: n for n, i in enumerate(ids)}
    for q, matches in zip(queries[:5], index.search(queries[:5], "manhattan", "hkmeans", k=10)):
        truth = scores(q, x[[row[m.id] for m in matches]], "manhattan")
        np.testing.assert_allclose([m.score for m in matches], truth, rtol=1e-9)


def test_index_built_before_block_sums_still_answers(corpus, tmp_path: Path, queries) -> None:
    """Indexes of the same format version written before this file existed have no ``l1_blocks`` key."""
    ids, x = corpus
    out = build_index(ids[:800], x[:800], tmp_path / "old", replace(SMALL, l1_blocks=0))
    m = json.loads((out / "manifest.json").read_text())
    del m["l1_blocks"]
    (out / "manifest.json").write_text(json.dumps(m))
    index = SearchIndex.load(out)
    assert index.l1_blocks == 0
    res = index.search(queries[:3], "manhattan", "hkmeans", k=5)
    assert all(len(r) == 5 for r in res)
