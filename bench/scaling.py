"""Study 2, scaling: build time, peak memory and query time at fixed recall as the corpus grows.

Each build runs in a fresh subprocess (``python -m bench.scaling --child ...``) so its peak RSS
(``ru_maxrss``) is its own; queries are then timed in this process on one thread (one call per query,
and one call for all) at the smallest ``ef`` (= rerank) of the ladder that reaches the recall target,
next to exact search.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from batch_index.build.shards import BuildConfig, build_index
from batch_index.corpus.synthetic import row_id
from batch_index.search import SearchIndex, SearchParams
from bench import report
from bench.data import _synthetic_rows
from bench.measure import (
    REPO,
    STYLES,
    build_phases,
    capped_threads,
    disk_mb,
    found_scores,
    machine_info,
    median_qps,
    recall_at_k,
    run_with_peak_rss,
    time_pass,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScalingConfig:
    sizes: tuple[int, ...] = (10_000, 100_000)
    n_queries: int = 100
    k: int = 10
    metrics: tuple[str, ...] = ("cosine", "euclidean", "manhattan", "dot")
    efs: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    n_probe: int = 1
    target: float = 0.95
    repeats: int = 3
    min_time: float = 0.3
    build_threads: int = 2
    engine: str = "local"  # or "spark": `python -m batch_index build` on a Parquet corpus, its default shards
    reuse_builds: bool = False  # keep an index this study built before (and its build measurements)
    seed: int = 0
    workdir: Path = Path("/tmp/ecg-bench")
    out: Path = Path("bench/results/scaling")


def _build_child(data: Path, out: Path, seed: int, threads: int) -> dict[str, Any]:
    """Runs in the subprocess: load the corpus, build, report time and peak RSS (MB)."""
    x = np.load(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with threadpool_limits(limits=threads):
        t0 = time.perf_counter()
        build_index([row_id(i) for i in range(len(x))], x, out, BuildConfig(seed=seed), overwrite=True)
        build_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"build_s": build_s, "rss_after_load_mb": before, "peak_rss_mb": peak, "data_mb": x.nbytes / 1e6}


def build_in_subprocess(data: Path, out: Path, seed: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.scaling", "--child", str(data), str(out), str(seed), str(threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"build subprocess failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_with_spark(n: int, cfg: ScalingConfig, out: Path) -> dict[str, Any]:
    """Generate (once, on Spark) and build with the CLI's defaults; peak RSS of the whole process tree."""
    corpus = cfg.workdir / "data" / f"synth-seed{cfg.seed}-0-{n}.parquet"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cli = [sys.executable, "-m", "batch_index"]
    if not corpus.exists():
        logger.info("generating %d windows on Spark -> %s", n, corpus)
        run_with_peak_rss([*cli, "generate", "--n", str(n), "--seed", str(cfg.seed), "--engine", "spark",
                           "--output", str(corpus)], env)
    wall, peak, log = run_with_peak_rss([*cli, "build", "--input", str(corpus), "--output", str(out),
                                         "--seed", str(cfg.seed), "--overwrite"], env)
    row: dict[str, Any] = {"wall_s": wall, "peak_rss_mb": peak, "rss_after_load_mb": float("nan"),
                           "data_mb": n * 2500 * 4 / 1e6}
    return {**row, **build_phases(log)}


class IndexRows:
    """``x[rows]`` over an index's memory-mapped raw signals (global row order), for exact re-scoring."""

    def __init__(self, index: SearchIndex) -> None:
        self._index = index

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self._index.signals_of(np.asarray(rows, dtype=np.int64))


def _ms(search, q: np.ndarray, cfg: ScalingConfig) -> dict[str, float]:
    """Median ms per query on one thread, one at a time (``single``) and in one call (``batch``)."""
    out = {}
    with capped_threads(1):
        for style in STYLES:
            n = min(3, len(q))
            while (t := time_pass(search, q[:n], style)) < cfg.min_time and n < len(q):
                n = min(len(q), max(2 * n, int(1.2 * n * cfg.min_time / max(t, 1e-9))))
            times = [t] + [time_pass(search, q[:n], style) for _ in range(cfg.repeats - 1)]
            out[style] = 1e3 / median_qps(n, times)
    return out


def build_or_reuse(n: int, cfg: ScalingConfig) -> tuple[Path, dict[str, Any]]:
    """The index of ``n`` synthetic windows and its build measurements: built now, or with ``reuse_builds``
    the one an earlier run left (``bench-build.json``, written last, says that build completed)."""
    cache = cfg.workdir / "data"
    index_dir = cfg.workdir / f"scaling-index-{cfg.engine}-{n}"
    saved = index_dir / "bench-build.json"
    if cfg.reuse_builds and saved.is_file():
        build = json.loads(saved.read_text())
        logger.info("N=%d: reusing the index built %s (%.1f s)", n, build.get("built_at"), build["build_s"])
        return index_dir, build
    if cfg.engine == "spark":
        build = build_with_spark(n, cfg, index_dir)
    else:
        _synthetic_rows(0, n, cfg.seed, cache)  # make sure the corpus file exists (generated once, cached)
        build = build_in_subprocess(cache / f"synth-seed{cfg.seed}-0-{n}.npy", index_dir, cfg.seed,
                                    cfg.build_threads)
    build["built_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    saved.write_text(json.dumps(build))
    return index_dir, build


def measure_size(n: int, cfg: ScalingConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build one size in a subprocess, then time queries per metric. Returns (build row, query rows)."""
    q = _synthetic_rows(n, cfg.n_queries, cfg.seed, cfg.workdir / "data")
    index_dir, build = build_or_reuse(n, cfg)
    total = disk_mb(index_dir)
    raw = sum(disk_mb(p) for p in index_dir.rglob("signals.npy"))
    build.update(n=n, index_mb=total - raw, index_mb_raw=total, bytes_per_signal=(total - raw) * 1e6 / n,
                 bytes_per_signal_raw=total * 1e6 / n)
    logger.info("N=%d: built in %.1f s, peak RSS %.0f MB, %.0f bytes/signal (%.0f with raw signals)", n,
                build["build_s"], build["peak_rss_mb"], build["bytes_per_signal"], build["bytes_per_signal_raw"])
    index = SearchIndex.load(index_dir)
    build["shards"] = len(index.manifest["shards"])
    x = IndexRows(index)
    rows = []
    for metric in cfg.metrics:
        exact = lambda b, m=metric: index.search_arrays(b, m, "exact", cfg.k, SearchParams())[0]  # noqa: E731
        with capped_threads(cfg.build_threads):
            truth = found_scores(q, x, exact(q), metric)
        ex = _ms(exact, q, cfg)
        row: dict[str, Any] = {"n": n, "metric": metric, "exact_ms_single": ex["single"],
                               "exact_ms_batch": ex["batch"]}
        for ef in cfg.efs:
            p = SearchParams(n_probe=cfg.n_probe, ef=ef, rerank=ef)
            search = lambda b, m=metric, p=p: index.search_arrays(b, m, "hkmeans", cfg.k, p)[0]  # noqa: E731
            rec = float(recall_at_k(found_scores(q, x, search(q), metric), truth).mean())
            if rec >= cfg.target or ef == cfg.efs[-1]:
                ms = _ms(search, q, cfg)
                row.update(ef=ef, recall=rec, ms_single=ms["single"], ms_batch=ms["batch"])
                break
        logger.info("N=%d %s: ef=%d recall %.3f, %.2f ms/query one at a time, %.2f in a batch (exact %.1f, %.1f)",
                    n, metric, row["ef"], row["recall"], row["ms_single"], row["ms_batch"], row["exact_ms_single"],
                    row["exact_ms_batch"])
        rows.append(row)
    return build, rows


def run(cfg: ScalingConfig, command: str) -> Path:
    info = machine_info()
    builds, queries = [], []
    for n in sorted(cfg.sizes):
        b, q = measure_size(n, cfg)
        builds.append(b)
        queries += q
    info["load_average_at_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return write(builds, queries, cfg, command, info)


def write(builds: list[dict[str, Any]], queries: list[dict[str, Any]], cfg: ScalingConfig, command: str,
          info: dict[str, Any]) -> Path:
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(builds, out / "build.csv")
    report.write_csv(queries, out / "query.csv")
    ns = [b["n"] for b in builds]
    params = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workdir")}
    md = report.header("Study 2: scaling with N", command, info, params)
    spark = cfg.engine == "spark"
    how = ("`python -m batch_index build` with its defaults (Spark local[2], default shards) in a fresh process "
           "tree; peak memory = the summed RSS of the JVM and its Python workers, sampled every 0.5 s"
           if spark else f"builds in a fresh subprocess each ({cfg.build_threads} BLAS threads), peak memory = "
           "its `ru_maxrss`")
    md += [f"Synthetic ECG, {cfg.n_queries} unseen queries; {how}; queries on 1 thread, median of "
           f"{cfg.repeats} passes, at the smallest ef (= rerank, n_probe {cfg.n_probe}) of {list(cfg.efs)} reaching "
           f"recall@{cfg.k} >= {cfg.target}. Growth exponent b: y ~ N^b fitted on log-log (10x N -> 10^b x y).", "",
           "## Build", ""]
    size_cols = ["index MB (excl. raw)", "bytes/signal excl. raw", "bytes/signal incl. raw"]
    if spark:
        md += [report.table(["N", "shards", "build s", "of which references s", "of which shards s",
                             "wall s (incl. JVM start)", "peak RSS MB", *size_cols],
                            [[b["n"], b["shards"], b["build_s"], b["references_s"], b["shards_s"], b["wall_s"],
                              b["peak_rss_mb"], b["index_mb"], b["bytes_per_signal"], b["bytes_per_signal_raw"]]
                             for b in builds]), ""]
    else:
        md += [report.table(["N", "shards", "build s", "peak RSS MB", "of which build (peak - after loading corpus) MB",
                             *size_cols],
                            [[b["n"], b["shards"], b["build_s"], b["peak_rss_mb"],
                              b["peak_rss_mb"] - b["rss_after_load_mb"], b["index_mb"], b["bytes_per_signal"],
                              b["bytes_per_signal_raw"]] for b in builds]), ""]
    grow = [["build time", report.fit_exponent(ns, [b["build_s"] for b in builds])],
            ["peak RSS", report.fit_exponent(ns, [b["peak_rss_mb"] for b in builds])]]
    if not spark:
        grow.append(["build memory on top of the loaded corpus",
                     report.fit_exponent(ns, [b["peak_rss_mb"] - b["rss_after_load_mb"] for b in builds])])
    md += ["## Queries at fixed recall (ms per query, 1 thread: one call per query / one call for all)", "",
           report.table(["N", "metric", "ef", "recall@10", "hkmeans single", "hkmeans batch", "exact single",
                         "exact batch", "speed-up vs exact (single)"],
                        [[r["n"], r["metric"], r["ef"], r["recall"], r["ms_single"], r["ms_batch"],
                          r["exact_ms_single"], r["exact_ms_batch"], r["exact_ms_single"] / r["ms_single"]]
                         for r in queries]), ""]
    for m in cfg.metrics:
        sub = [r for r in queries if r["metric"] == m]
        for key, what in (("ms_single", "hkmeans, one at a time"), ("ms_batch", "hkmeans, batch"),
                          ("exact_ms_single", "exact, one at a time")):
            grow.append([f"query time at recall >= {cfg.target}, {what} ({m})" if key != "exact_ms_single"
                         else f"query time, {what} ({m})",
                         report.fit_exponent([r["n"] for r in sub], [r[key] for r in sub])])
    md += ["## Growth with N", "", report.table(["quantity", "exponent b", "10x N multiplies it by"],
                                                [[g, b, 10 ** b] for g, b in grow]), ""]
    path = out / "README.md"
    path.write_text("\n".join(md))
    logger.info("wrote %s", path)
    for g, b in grow:
        logger.info("growth: %s ~ N^%.2f", g, b)
    return path


def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scaling --child")
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("seed", type=int)
    p.add_argument("threads", type=int)
    a = p.parse_args(argv)
    print(json.dumps(_build_child(a.data, a.out, a.seed, a.threads)))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["--child"]:
        sys.exit("internal entry point; use `python -m bench scaling`")
    sys.exit(_child_main(sys.argv[2:]))
