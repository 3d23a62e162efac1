"""Study 5: the first ``batch_index search`` after an install against the next one, with and without warming.

Each scenario starts from an empty numba cache (its own ``NUMBA_CACHE_DIR``) and runs the CLI in fresh
processes, as a user would: ``cold`` searches twice; ``warmed`` runs ``python -m batch_index warm``
(what ``make setup`` and the Docker image do after installing), then searches twice. The issue's
target: the first search after setup within 2x of the next.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.measure import REPO, machine_info

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FirstSearchConfig:
    wfdb_dir: Path
    metric: str = "cosine"
    mode: str = "hkmeans"
    repeats: int = 1
    workdir: Path = Path("/tmp/ecg-bench")
    out: Path = Path("bench/results/first-search")


def _cli(args: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one ``python -m batch_index`` process."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "batch_index", *args], env=env, check=True, capture_output=True,
                   cwd=REPO)
    return time.perf_counter() - t0


def run(cfg: FirstSearchConfig, command: str) -> Path:
    work = cfg.workdir / "first-search"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    corpus, queries, index = work / "corpus.parquet", work / "queries.parquet", work / "index"
    _cli(["ingest", "--records", str(cfg.wfdb_dir / "100"), "--output", str(corpus), "--stride", "5"], env)
    _cli(["ingest", "--records", str(cfg.wfdb_dir / "a103l"), "--output", str(queries), "--stride", "10"], env)
    _cli(["build", "--engine", "local", "--input", str(corpus), "--output", str(index), "--overwrite"], env)
    search = ["search", "--index", str(index), "--queries", str(queries), "--metric", cfg.metric,
              "--mode", cfg.mode, "--output", str(work / "results.parquet")]
    rows: list[dict[str, Any]] = []
    for rep in range(cfg.repeats):
        for scenario in ("cold", "warmed"):
            cache = work / f"numba-cache-{scenario}-{rep}"
            shutil.rmtree(cache, ignore_errors=True)
            run_env = {**env, "NUMBA_CACHE_DIR": str(cache)}
            warm_s = _cli(["warm"], run_env) if scenario == "warmed" else None
            first, second = _cli(search, run_env), _cli(search, run_env)
            rows.append({"scenario": scenario, "repeat": rep, "warm_s": warm_s, "first_s": first,
                         "second_s": second, "ratio": first / second})
            logger.info("%s: first %.2f s, second %.2f s (%.2fx)", scenario, first, second, first / second)
    cfg.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "machine": machine_info(), "params": {k: str(v) for k, v in asdict(cfg).items()},
            "rows": rows}
    (cfg.out / "results.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = ["# First search after install (study 5)", "", f"`{command}`", "",
             "Wall time of `python -m batch_index search` (a fresh process each: imports, index load, search of "
             f"33 real-record windows, {cfg.metric}/{cfg.mode}) over a 360-window index of record 100, starting "
             "from an empty numba cache. `warmed` first runs `python -m batch_index warm`, as `make setup` and "
             "the Docker image do after installing. Target: first within 2x of second.", "",
             "| scenario | warm (s) | first search (s) | second search (s) | first / second |", "|---|---|---|---|---|"]
    for r in rows:
        warm = "-" if r["warm_s"] is None else f"{r['warm_s']:.1f}"
        lines.append(f"| {r['scenario']} | {warm} | {r['first_s']:.2f} | {r['second_s']:.2f} | {r['ratio']:.2f} |")
    lines += ["", "Host and load: see `results.json` (`machine`); the machine is shared, so compare within a row.", ""]
    path = cfg.out / "README.md"
    path.write_text("\n".join(lines))
    return path


__all__ = ["FirstSearchConfig", "run"]
