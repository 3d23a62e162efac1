"""Content-partitioned shards: where a signal is built and which shards a query visits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from batch_index.build.shards import BuildConfig, build_index
from batch_index.corpus.synthetic import SynthConfig, generate
from batch_index.engine.metrics import DEFAULT_METRICS
from batch_index.engine.partition import fit_partition
from batch_index.errors import InvalidInputError
from batch_index.index_files import PARTITION_FILE
from batch_index.search import SearchIndex, SearchParams

CFG = BuildConfig(n_references=128, reference_sample=600, basis_rank=64, leaf_size=24, branching=8,
                  graph_degree=12, cells_per_shard=8)
SYN = SynthConfig(sampling_rate=50.0, duration_s=10.0, seed=11)
SHARDS = 4


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], np.ndarray]:
    ids, _, x = generate(0, 1600, SYN)
    return ids, x


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory) -> SearchIndex:
    ids, x = corpus
    return SearchIndex.load(build_index(ids, x, tmp_path_factory.mktemp("part") / "v1", CFG, n_shards=SHARDS))


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return generate(50_000, 30, SYN)[2]


def test_partition_is_in_the_manifest_and_checksummed(index: SearchIndex) -> None:
    m = index.manifest
    assert m["partition"]["kind"] == "kmeans" and m["partition"]["file"] == PARTITION_FILE
    assert PARTITION_FILE in m["files"]
    assert index.partition is not None and index.partition.n_shards == len(m["shards"]) == SHARDS


def test_every_signal_is_in_one_shard_of_balanced_size(index: SearchIndex, corpus) -> None:
    ids, _ = corpus
    assert sorted(index.ids.tolist()) == sorted(ids)
    sizes = np.array([len(s.ids) for s in index.shards])
    assert sizes.min() >= 0.5 * sizes.mean() and sizes.max() <= 1.6 * sizes.mean(), sizes


def test_a_signal_lives_in_the_shard_its_cell_routes_to(index: SearchIndex, corpus) -> None:
    """Euclidean routing with one shard probed finds a corpus signal itself: its nearest cell's shard holds it."""
    ids, x = corpus
    pick = np.arange(0, len(ids), 97)
    got = index.search(x[pick], "euclidean", "hkmeans", 1, params=SearchParams.for_metric("euclidean",
                                                                                           n_shards_probe=1))
    assert [r[0].id for r in got] == [ids[i] for i in pick]


@pytest.mark.parametrize("metric", DEFAULT_METRICS)
def test_one_shard_probed_finds_only_that_shards_rows(index: SearchIndex, queries, metric: str) -> None:
    zq, nq = index.transform.apply(queries)
    routes = index.shard_routes(zq, nq, metric, 1)
    assert routes is not None and routes.shape == (len(queries), 1)
    rows, _ = index.search_arrays(queries, metric, "hkmeans", 10, SearchParams.for_metric(metric, n_shards_probe=1))
    lo = np.array([index.shards[s].offset for s in routes[:, 0]])
    hi = lo + np.array([len(index.shards[s].ids) for s in routes[:, 0]])
    assert ((rows >= lo[:, None]) & (rows < hi[:, None])).all()


@pytest.mark.parametrize("metric", DEFAULT_METRICS)
def test_probing_every_shard_is_the_unrouted_search(index: SearchIndex, queries, metric: str) -> None:
    base = SearchParams.for_metric(metric)
    full = index.search_arrays(queries, metric, "hkmeans", 10, replace(base, n_shards_probe=0))
    every = index.search_arrays(queries, metric, "hkmeans", 10, replace(base, n_shards_probe=SHARDS))
    np.testing.assert_array_equal(full[0], every[0])


@pytest.mark.parametrize("metric", DEFAULT_METRICS)
def test_recall_grows_with_shards_probed(index: SearchIndex, queries, metric: str) -> None:
    truth, _ = index.search_arrays(queries, metric, "exact", 10, SearchParams())
    recall = []
    for p in (1, 2, SHARDS):
        got, _ = index.search_arrays(queries, metric, "hkmeans", 10, SearchParams.for_metric(metric, n_shards_probe=p))
        recall.append(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)]))
    assert recall[0] <= recall[1] + 0.02 and recall[1] <= recall[2] + 0.02 and recall[0] < recall[2], recall


def test_row_partitioned_index_has_no_partition_and_is_searched_in_full(corpus, queries, tmp_path: Path) -> None:
    ids, x = corpus
    idx = SearchIndex.load(build_index(ids[:600], x[:600], tmp_path / "rows", replace(CFG, partitioning="rows"),
                                       n_shards=2))
    assert idx.partition is None and "partition" not in idx.manifest
    assert [len(s.ids) for s in idx.shards] == [300, 300] and idx.ids.tolist() == ids[:600]
    one = idx.search_arrays(queries, "cosine", "hkmeans", 10, SearchParams.for_metric("cosine", n_shards_probe=1))
    full = idx.search_arrays(queries, "cosine", "hkmeans", 10, SearchParams.for_metric("cosine", n_shards_probe=0))
    np.testing.assert_array_equal(one[0], full[0])


def test_fit_partition_packs_cells_into_every_shard() -> None:
    z = np.random.default_rng(0).normal(size=(2000, 16)).astype(np.float32)
    part = fit_partition(z, 5, cells_per_shard=6, seed=1)
    counts = np.bincount(part.assign(z), minlength=5)
    assert part.n_shards == 5 and (counts > 0).all() and counts.max() <= 1.6 * counts.mean(), counts


@pytest.mark.parametrize("bad", [{"n_shards_probe": -1}, {"partitioning": "hash"}, {"cells_per_shard": 0}])
def test_bad_partition_settings_are_named(bad: dict) -> None:
    with pytest.raises(InvalidInputError, match=next(iter(bad))):
        (SearchParams if "n_shards_probe" in bad else BuildConfig)(**bad)
