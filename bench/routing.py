"""Study 8: shards probed per query on a content-partitioned index, recall@10 and query time.

One process builds a content-partitioned index of ``n`` synthetic windows in ``shards`` shards
(``build_index``), then answers held-out windows with noise (rows past the corpus, another seed than
any default was chosen on) in hkmeans mode for every ``n_shards_probe`` from 1 to all, against exact
search (every shard). Time is a ratio against probing every shard, measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from batch_index.build.shards import BuildConfig, build_index
from batch_index.corpus.synthetic import SynthConfig, generate
from batch_index.search import SearchIndex, SearchParams
from bench import report
from bench.measure import machine_info


@dataclass(frozen=True)
class RoutingConfig:
    n: int = 40_000
    shards: int = 8
    cells_per_shard: int = BuildConfig().cells_per_shard
    n_queries: int = 200
    metrics: tuple[str, ...] = ("cosine", "euclidean", "manhattan", "dot")
    noise: float = 0.05
    seed: int = 3
    workdir: Path = Path("/tmp/ecg-bench")
    out: Path = Path("bench/results/routing")


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(got, truth)]))


def run(cfg: RoutingConfig, command: str) -> Path:
    ids, _, x = generate(0, cfg.n, SynthConfig(seed=cfg.seed))
    q = generate(10 * cfg.n, cfg.n_queries, SynthConfig(seed=cfg.seed))[2]
    q = q + np.random.default_rng(cfg.seed).normal(0, cfg.noise * float(q.std()), q.shape).astype(np.float32)
    t0 = time.perf_counter()
    path = build_index(ids, x, cfg.workdir / f"routing-{cfg.n}-{cfg.shards}", BuildConfig(
        cells_per_shard=cfg.cells_per_shard), n_shards=cfg.shards, overwrite=True)
    build_s = time.perf_counter() - t0
    del x
    index = SearchIndex.load(path).warm()
    rows: list[dict[str, Any]] = []
    for metric in cfg.metrics:
        truth, _ = index.search_arrays(q, metric, "exact", 10, SearchParams())
        base = SearchParams.for_metric(metric)
        timed = []
        for probe in range(1, cfg.shards + 1):
            params = replace(base, n_shards_probe=probe)
            index.search_arrays(q[:8], metric, "hkmeans", 10, params)  # warm
            t = time.perf_counter()
            got, _ = index.search_arrays(q, metric, "hkmeans", 10, params)
            timed.append((probe, _recall(got, truth), (time.perf_counter() - t) / len(q) * 1e3))
        full_ms = timed[-1][2]
        rows += [{"metric": metric, "n_shards_probe": p, "default": p == base.n_shards_probe, "recall": r,
                  "ms_per_query": ms, "time_vs_all_shards": ms / full_ms} for p, r, ms in timed]
    return write(rows, cfg, index, build_s, command)


def write(rows: list[dict[str, Any]], cfg: RoutingConfig, index: SearchIndex, build_s: float, command: str) -> Path:
    cfg.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, cfg.out / "routing.csv")
    m = machine_info()
    sizes = [len(s.ids) for s in index.shards]
    md = ["# Study 8: shards probed per query (content-partitioned index)", "",
          f"`{command}`", "",
          f"{cfg.n} synthetic windows in {cfg.shards} shards by content ({cfg.cells_per_shard} k-means cells per "
          f"shard; shard sizes {min(sizes)}..{max(sizes)}), built in {build_s:.0f} s in one process. "
          f"{cfg.n_queries} held-out windows with {cfg.noise:.0%} noise; recall@10 against exact search of "
          "every shard; hkmeans at each metric's default ef/rerank, one thread, time per query in a batch, "
          "as a ratio against probing every shard in the same run. `default`: the metric's n_shards_probe.",
          "", f"Machine: {m}", "",
          report.table(["metric", "n_shards_probe", "default", "recall@10", "ms/query", "time vs all shards"],
                       [[r["metric"], r["n_shards_probe"], "yes" if r["default"] else "", r["recall"],
                         r["ms_per_query"], r["time_vs_all_shards"]] for r in rows]), ""]
    (cfg.out / "README.md").write_text("\n".join(md))
    return cfg.out
