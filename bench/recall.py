"""Study 1, recall vs throughput (the ann-benchmarks protocol) for our modes, numpy and FAISS.

For each dataset and metric: ground truth from our ``exact`` mode; every configuration answers every
query once (recall@k); then queries/s is timed per cell (thread count x one-at-a-time/batch) in
``repeats`` rounds that visit every configuration in turn, so machine noise spreads over all systems
alike; the report quotes the median round.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batch_index.build.shards import BuildConfig, build_index
from batch_index.engine.metrics import DEFAULT_METRICS as METRICS
from batch_index.search import SearchIndex
from bench import report
from bench.data import Dataset, Perturb, real_records, synthetic
from bench.measure import SearchFn, capped_threads, found_scores, machine_info, median_qps, recall_at_k, time_pass
from bench.peers import PeerSweep, peer_systems
from bench.systems import PEERS, Config, Sweep, faiss_systems, numpy_brute, ours

logger = logging.getLogger(__name__)

Cell = tuple[int, str]


@dataclass(frozen=True)
class RecallConfig:
    n: int = 100_000
    n_queries: int = 200
    k: int = 10
    datasets: tuple[str, ...] = ("synthetic", "real")
    metrics: tuple[str, ...] = METRICS
    sweep: Sweep = field(default_factory=Sweep)
    perturb: Perturb = field(default_factory=Perturb)
    cells: tuple[Cell, ...] = ((1, "single"), (1, "batch"), (2, "batch"))
    build_threads: int = 2
    repeats: int = 3
    min_time: float = 0.2
    min_queries: int = 3
    target: float = 0.95
    margin: float = 0.02
    faiss: bool = True
    reuse_index: bool = False
    peers: tuple[str, ...] = PEERS
    peer_sweep: PeerSweep = field(default_factory=PeerSweep)
    seed: int = 0
    stride_s: float = 0.5
    wfdb_dir: Path = Path("../shared/data/wfdb")
    workdir: Path = Path("/tmp/ecg-bench")
    out: Path = Path("bench/results/recall")


def cell_name(cell: Cell) -> str:
    return f"qps_{cell[0]}t_{cell[1]}"


def _calibrated(search: SearchFn, q: np.ndarray, style: str, min_time: float, min_q: int) -> tuple[int, float]:
    """Queries per timed pass so that one pass lasts ``min_time``; returns (n, seconds of the last pass)."""
    n = min(min_q, len(q))
    while True:
        t = time_pass(search, q[:n], style)
        if t >= min_time or n == len(q):
            return n, t
        n = min(len(q), max(2 * n, int(1.2 * n * min_time / max(t, 1e-9))))


def evaluate(ds: Dataset, metric: str, configs: list[Config], cfg: RecallConfig) -> list[dict[str, Any]]:
    """Recall and timed queries/s of every configuration on every query set of ``ds``."""
    top = max(t for t, _ in cfg.cells)
    rows: list[dict[str, Any]] = []
    with capped_threads(top):  # configs[0] is our exact mode: its answers are the ground truth
        truth = {qs: found_scores(q, ds.corpus, configs[0].search(q), metric) for qs, q in ds.queries.items()}
    for c in configs:
        for qs, q in ds.queries.items():
            if c is configs[0]:
                got = truth[qs]
            else:
                with capped_threads(top):
                    got = found_scores(q, ds.corpus, c.search(q), metric)
            r = recall_at_k(got, truth[qs])
            rows.append({"dataset": ds.name, "n": len(ds.corpus), "query_set": qs, "n_queries": len(q),
                         "metric": metric, "system": c.system, "params": c.params, "recall": float(r.mean()),
                         "recall_p05": float(np.quantile(r, 0.05)), "build_s": c.build_s,
                         "index_mb": c.index_mb, "index_mb_raw": c.index_mb_raw, "_c": c, "_q": q})
    times: dict[tuple[int, Cell], list[float]] = {}
    sizes: dict[tuple[int, Cell], int] = {}
    for rep in range(cfg.repeats):
        for i, row in enumerate(rows):
            for cell in cfg.cells:
                with capped_threads(cell[0]):
                    if rep == 0:
                        sizes[i, cell], t = _calibrated(row["_c"].search, row["_q"], cell[1], cfg.min_time,
                                                        cfg.min_queries)
                    else:
                        t = time_pass(row["_c"].search, row["_q"][:sizes[i, cell]], cell[1])
                times.setdefault((i, cell), []).append(t)
    for i, row in enumerate(rows):
        del row["_c"], row["_q"]
        for cell in cfg.cells:
            row[cell_name(cell)] = median_qps(sizes[i, cell], times[i, cell])
            row[f"{cell_name(cell)}_n"] = sizes[i, cell]
            row[f"{cell_name(cell)}_s"] = ";".join(f"{t:.4f}" for t in times[i, cell])
    return rows


def run_dataset(ds: Dataset, cfg: RecallConfig) -> list[dict[str, Any]]:
    index_dir = cfg.workdir / f"index-{ds.name}"
    if cfg.reuse_index and (index_dir / "manifest.json").is_file():
        build_s = float("nan")  # built by an earlier run: its time is in that run's report
        logger.info("%s: reusing our index in %s", ds.name, index_dir)
    else:
        with capped_threads(cfg.build_threads):
            t0 = time.perf_counter()
            build_index(ds.ids, ds.corpus, index_dir, BuildConfig(seed=cfg.seed), overwrite=True)
            build_s = time.perf_counter() - t0
        logger.info("%s: our index (all four metrics) built in %.1f s", ds.name, build_s)
    index = SearchIndex.load(index_dir)
    if index.size != len(ds.corpus):
        raise ValueError(f"{index_dir} holds {index.size} signals, not the {len(ds.corpus)} of {ds.name}")
    rows = []
    for metric in cfg.metrics:
        t0 = time.perf_counter()
        configs = [*ours(index, metric, cfg.k, cfg.sweep, build_s), numpy_brute(ds.corpus, metric, cfg.k)]
        if cfg.faiss:
            with capped_threads(cfg.build_threads):
                configs += faiss_systems(ds.corpus, metric, cfg.k, cfg.sweep, cfg.seed)
        if cfg.peers:
            with capped_threads(cfg.build_threads):
                configs += peer_systems(ds.corpus, metric, cfg.k, cfg.peer_sweep, cfg.peers, cfg.seed)
        rows += evaluate(ds, metric, configs, cfg)
        logger.info("%s %s: %d configurations done in %.0f s", ds.name, metric, len(configs),
                    time.perf_counter() - t0)
        del configs
        gc.collect()
        report.log_best(rows, ds.name, metric, cfg.target, cell_name(cfg.cells[0]))
    return rows


def datasets(cfg: RecallConfig) -> Iterator[Dataset]:
    """The requested datasets, one at a time (a 10^6 corpus is 10 GB)."""
    if "synthetic" in cfg.datasets:
        yield synthetic(cfg.n, cfg.n_queries, seed=cfg.seed, cache=cfg.workdir / "data", perturb=cfg.perturb)
    if "real" in cfg.datasets:
        yield real_records(cfg.wfdb_dir, cfg.n_queries, stride_s=cfg.stride_s, seed=cfg.seed, perturb=cfg.perturb)


def run(cfg: RecallConfig, command: str) -> Path:
    """Run study 1 and write ``results.csv``, ``README.md`` and plots into ``cfg.out``."""
    info = machine_info()
    t0 = time.perf_counter()
    rows, described = [], {}
    for ds in datasets(cfg):
        described[ds.name] = ds.description
        rows += run_dataset(ds, cfg)
    info["study_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    info["load_average_at_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    params = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workdir")}
    return report.write_recall(rows, cfg.out, command=command, machine=info, params=params, datasets=described,
                               primary=cell_name(cfg.cells[0]), cells=[cell_name(c) for c in cfg.cells],
                               target=cfg.target, margin=cfg.margin)


__all__ = ["RecallConfig", "cell_name", "evaluate", "run"]
