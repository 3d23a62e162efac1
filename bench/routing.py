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
    target: float = 0.95
    growth_sizes: tuple[int, ...] = ()  # with shard_rows: the growth study (``run_growth``)
    shard_rows: int = 5_000


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(got, truth)]))


def _queries(cfg: RoutingConfig, n: int) -> np.ndarray:
    """Held-out windows (rows past the corpus) with noise."""
    q = generate(10 * n, cfg.n_queries, SynthConfig(seed=cfg.seed))[2]
    return q + np.random.default_rng(cfg.seed).normal(0, cfg.noise * float(q.std()), q.shape).astype(np.float32)


def _build(cfg: RoutingConfig, n: int, shards: int) -> tuple[SearchIndex, float]:
    ids, _, x = generate(0, n, SynthConfig(seed=cfg.seed))
    t0 = time.perf_counter()
    path = build_index(ids, x, cfg.workdir / f"routing-{n}-{shards}", BuildConfig(
        cells_per_shard=cfg.cells_per_shard), n_shards=shards, overwrite=True)
    return SearchIndex.load(path).warm(), time.perf_counter() - t0


def _ms_per_query(index: SearchIndex, q: np.ndarray, metric: str, params: SearchParams) -> tuple[np.ndarray, float]:
    index.search_arrays(q[:8], metric, "hkmeans", 10, params)  # warm
    t = time.perf_counter()
    got, _ = index.search_arrays(q, metric, "hkmeans", 10, params)
    return got, (time.perf_counter() - t) / len(q) * 1e3


def run(cfg: RoutingConfig, command: str) -> Path:
    q = _queries(cfg, cfg.n)
    index, build_s = _build(cfg, cfg.n, cfg.shards)
    rows: list[dict[str, Any]] = []
    for metric in cfg.metrics:
        truth, _ = index.search_arrays(q, metric, "exact", 10, SearchParams())
        base = SearchParams.for_metric(metric)
        timed = []
        for probe in range(1, cfg.shards + 1):
            got, ms = _ms_per_query(index, q, metric, replace(base, n_shards_probe=probe))
            timed.append((probe, _recall(got, truth), ms))
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


def run_growth(cfg: RoutingConfig, command: str) -> Path:
    """How the shards a query must probe grow with their number, at a fixed shard size.

    The scaling model's open question (``bench/results/scaling/MODEL.md``): at 10^9 a query can afford
    a few of ~7,600 shards. Corpora of ``growth_sizes`` in shards of ``shard_rows`` (a scaled-down
    shard, so that many shards fit on one machine): per metric, the fewest shards probed that reach
    recall@10 >= ``target``, and that probe's time per query against probing one shard and all of them.
    """
    rows: list[dict[str, Any]] = []
    for n in sorted(cfg.growth_sizes):
        shards = max(1, -(-n // cfg.shard_rows))
        q = _queries(cfg, n)
        index, build_s = _build(cfg, n, shards)
        for metric in cfg.metrics:
            truth, _ = index.search_arrays(q, metric, "exact", 10, SearchParams())
            base = SearchParams.for_metric(metric)
            one_ms = _ms_per_query(index, q, metric, replace(base, n_shards_probe=1))[1]
            all_got, all_ms = _ms_per_query(index, q, metric, replace(base, n_shards_probe=0))
            full = _recall(all_got, truth)
            probe, recall, ms = shards, full, all_ms
            for p in range(1, shards):
                got, t = _ms_per_query(index, q, metric, replace(base, n_shards_probe=p))
                if (r := _recall(got, truth)) >= cfg.target:
                    probe, recall, ms = p, r, t
                    break
            rows.append({"n": n, "shards": shards, "metric": metric, "probe_for_target": probe,
                         "probe_fraction": probe / shards, "recall": recall, "recall_all_shards": full,
                         "ms_per_query": ms, "ms_one_shard": one_ms, "ms_all_shards": all_ms, "build_s": build_s})
        del index
    return write_growth(rows, cfg, command)


def write_growth(rows: list[dict[str, Any]], cfg: RoutingConfig, command: str) -> Path:
    cfg.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, cfg.out / "growth.csv")
    md = ["# Study 8b: shards a query must probe as their number grows", "", f"`{command}`", "",
          f"Synthetic corpora of {', '.join(str(n) for n in sorted(cfg.growth_sizes))} windows in shards of "
          f"{cfg.shard_rows} by content ({cfg.cells_per_shard} k-means cells per shard), each built in one "
          f"process; {cfg.n_queries} held-out windows with {cfg.noise:.0%} noise; recall@10 against exact "
          f"search of every shard; hkmeans at each metric's default ef/rerank, one thread, time per query in a "
          f"batch. `probe`: the fewest shards probed with recall@10 >= {cfg.target} (all of them if none fewer "
          "did); the times are measured in the same run.", "", f"Machine: {machine_info()}", "",
          report.table(["N", "shards", "metric", "probe", "probe / shards", "recall@10", "recall, all shards",
                        "ms/query", "ms, 1 shard", "ms, all shards"],
                       [[r["n"], r["shards"], r["metric"], r["probe_for_target"], r["probe_fraction"], r["recall"],
                         r["recall_all_shards"], r["ms_per_query"], r["ms_one_shard"], r["ms_all_shards"]]
                        for r in rows]), ""]
    (cfg.out / "GROWTH.md").write_text("\n".join(md))
    return cfg.out
