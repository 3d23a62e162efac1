"""Study 4, distributed build: the same Spark build with ``local[1]`` and ``local[2]``.

The corpus is written once with ``python -m batch_index generate``; every build then runs
``python -m batch_index build`` in its own process (JVM start-up included in the wall time) with the
same number of partitions, so both masters do identical work. Rounds alternate the masters.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import report
from bench.measure import REPO, build_phases, machine_info

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class DistributedConfig:
    n: int = 20_000
    masters: tuple[str, ...] = ("local[1]", "local[2]")
    partitions: int = 4
    repeats: int = 2
    driver_memory: str = "4g"
    seed: int = 0
    workdir: Path = Path("/tmp/ecg-bench")
    out: Path = Path("bench/results/distributed")


def _cli(*args: str) -> tuple[float, str]:
    """Run ``python -m batch_index ARGS``; returns (wall seconds, stdout + stderr)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "batch_index", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"python -m batch_index {' '.join(args)} failed ({done.returncode}): "
                           f"{done.stderr[-2000:]}")
    return wall, done.stdout + done.stderr


def run(cfg: DistributedConfig, command: str) -> Path:
    info = machine_info()
    corpus = cfg.workdir / f"dist-corpus-{cfg.n}-seed{cfg.seed}.parquet"
    if not corpus.exists():
        corpus.parent.mkdir(parents=True, exist_ok=True)
        _cli("generate", "--n", str(cfg.n), "--output", str(corpus), "--engine", "local", "--seed", str(cfg.seed))
    rows: list[dict[str, Any]] = []
    for rep in range(cfg.repeats):
        for master in cfg.masters:
            wall, log = _cli("build", "--input", str(corpus), "--output", str(cfg.workdir / "dist-index"),
                             "--master", master, "--partitions", str(cfg.partitions), "--driver-memory",
                             cfg.driver_memory, "--seed", str(cfg.seed), "--overwrite")
            row: dict[str, Any] = {"master": master, "round": rep, "n": cfg.n, "partitions": cfg.partitions,
                                   "wall_s": wall}
            phases = build_phases(log)
            row.update(job_s=phases["build_s"], references_s=phases["references_s"], shards_s=phases["shards_s"])
            logger.info("build %s round %d: %.1f s wall (shards %.1f s)", master, rep, wall, row["shards_s"])
            rows.append(row)
    info["load_average_at_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return write(rows, cfg, command, info)


def write(rows: list[dict[str, Any]], cfg: DistributedConfig, command: str, info: dict[str, Any]) -> Path:
    cfg.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, cfg.out / "results.csv")
    keys = ("wall_s", "job_s", "references_s", "shards_s")
    med = {m: {k: float(np.median([r[k] for r in rows if r["master"] == m])) for k in keys} for m in cfg.masters}
    base = cfg.masters[0]
    params = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workdir")}
    md = report.header("Study 4: distributed build", command, info, params)
    md += [f"`python -m batch_index build` on {cfg.n} synthetic windows ({cfg.partitions} partitions = shards for "
           f"every master), each build a fresh process; medians of {cfg.repeats} rounds. `wall` includes the JVM "
           "and Python start-up; `job` is what the CLI reports; `references` is the driver-side fit (serial); "
           "`shards` is the parallel `mapInArrow` stage.", "",
           report.table(["master", *[f"{k} (median)" for k in keys], f"speed-up (wall) vs {base}",
                         f"speed-up (shards) vs {base}"],
                        [[m, *(med[m][k] for k in keys), med[base]["wall_s"] / med[m]["wall_s"],
                          med[base]["shards_s"] / med[m]["shards_s"]] for m in cfg.masters]), ""]
    path = cfg.out / "README.md"
    path.write_text("\n".join(md))
    for m in cfg.masters[1:]:
        logger.info("speed-up %s vs %s: %.2fx wall, %.2fx shard stage", m, base,
                    med[base]["wall_s"] / med[m]["wall_s"], med[base]["shards_s"] / med[m]["shards_s"])
    return path
