"""Shard-by-shard search on a real Spark standalone cluster (a master and two workers on loopback).

``local[2]`` runs every task in one JVM; here each executor is its own JVM with its own Python
workers, so the test can see that both searched, that each task memory-mapped only the shard it was
given, and that the driver's merge of their top-k equals the local routed search.

It needs its own SparkContext (one per process), so it stops any session already active (pytest runs
this file after ``test_spark_jobs.py``, whose local session it then ends).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from batch_index.build import spark_job
from batch_index.build.shards import BuildConfig, build_index
from batch_index.corpus.files import write_corpus
from batch_index.corpus.synthetic import SynthConfig, generate
from batch_index.index_files import shard_dir
from batch_index.search import SearchIndex, SearchParams
from devtools.spark_cluster import StandaloneCluster, wait_for_executors

SYN = SynthConfig(sampling_rate=50.0, seed=5)
CFG = BuildConfig(n_references=128, reference_sample=600, basis_rank=64, leaf_size=24, branching=8,
                  graph_degree=12, cells_per_shard=8, partitioning="kmeans")
SHARDS, PROBE, K = 4, 2, 5


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> SearchIndex:
    ids, _, x = generate(0, 2400, SYN)
    return SearchIndex.load(build_index(ids, x, tmp_path_factory.mktemp("cluster-index") / "v1", CFG,
                                        n_shards=SHARDS, sampling_rate=SYN.sampling_rate))


@pytest.fixture(scope="module")
def cluster_spark(tmp_path_factory) -> Iterator[object]:
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    with StandaloneCluster(tmp_path_factory.mktemp("cluster"), workers=2, cores=1, memory="1g") as cluster:
        conf = {**cluster.session_conf(executor_memory="768m"), "spark.locality.wait": "0"}
        session = spark_job.spark_session(cluster.master_url, app_name="ecg-cluster-test", driver_memory="1g",
                                          conf=conf)
        session.sparkContext.setLogLevel("ERROR")
        try:
            wait_for_executors(session, 2)
            yield session
        finally:
            session.stop()


def test_routed_shard_search_runs_on_both_workers_one_shard_each(cluster_spark, index: SearchIndex,
                                                                 tmp_path: Path) -> None:
    qids, _, q = generate(60_000, 40, SYN)
    write_corpus(tmp_path / "q.parquet", qids, q)
    params = SearchParams.for_metric("cosine", n_shards_probe=PROBE)
    assert index.partition is not None and index.routes("cosine", PROBE)
    table = spark_job.search(cluster_spark, index, tmp_path / "q.parquet", "cosine", "hkmeans", K, None, params,
                             by_shard=True, diagnostics=True)

    # (a) the driver's merge of the executors' per-shard top-k is, ids and scores, what this process gets
    # by searching each routed shard on its own and merging (the whole-index routed search is not the
    # reference: it shares its candidate budget across the routed shards, so it can differ)
    routes = index.shard_routes(*index.transform.apply(q), "cosine", PROBE)
    alone = {s: SearchIndex.load(index.path, shards=[s]) for s in range(SHARDS)}
    expected = []
    for qid, row, route in sorted(zip(qids, q, routes), key=lambda t: t[0]):
        found = [(m.score, m.id) for s in route for m in alone[int(s)].search(row[None], "cosine", "hkmeans", K,
                                                                              params=params)[0]]
        expected += [(qid, rank, mid, score) for rank, (score, mid)
                     in enumerate(sorted(found, key=lambda t: (-t[0], t[1]))[:K], start=1)]
    got = list(zip(table.column("query_id").to_pylist(), table.column("rank").to_pylist(),
                   table.column("id").to_pylist()))
    assert got == [e[:3] for e in expected]
    np.testing.assert_allclose(table.column("score").to_numpy(), [e[3] for e in expected], rtol=1e-9)

    # (b) both workers' executors searched: standalone runs each executor in work/<app>/<executor id>
    executors = {Path(e.split(":", 1)[1]).name for e in table.column("executor").to_pylist()}
    workers = {Path(e.split(":", 1)[1]).parents[1].name for e in table.column("executor").to_pylist()}
    assert len(executors) == 2 and workers == {"worker-0", "worker-1"}, (executors, workers)

    # (c) each task's cached index memory-maps exactly the shard it was given, and only routed shards ran
    shards, mapped = table.column("shard").to_pylist(), table.column("mapped").to_pylist()
    assert all(m == shard_dir(index.path, s).name for s, m in zip(shards, mapped)), set(zip(shards, mapped))
    routed = {qid: set(r.tolist()) for qid, r in zip(qids, routes)}
    assert all(s in routed[qid] for qid, s in zip(table.column("query_id").to_pylist(), shards))
    assert len(set(shards)) > 1
    by_pid = {(e, p) for e, p in zip(table.column("executor").to_pylist(), table.column("pid").to_pylist())}
    assert len(by_pid) >= 2
