"""Thread caps, timing, recall and the machine description every report carries."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_info, threadpool_limits

from batch_index.engine.metrics import scores

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
SearchFn = Callable[[F32], npt.NDArray[np.integer]]
STYLES = ("single", "batch")
REPO = Path(__file__).resolve().parents[1]


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


_caps: list[int] = []


def thread_cap() -> int:
    """The innermost :func:`capped_threads` cap (1 outside any): what a system with threads of its own,
    as our search's ``threads``, may use, as FAISS's OpenMP pool may."""
    return _caps[-1] if _caps else 1


@contextmanager
def capped_threads(n: int) -> Iterator[None]:
    """Cap every BLAS/OpenMP pool (threadpoolctl) and FAISS's OpenMP pool at ``n`` threads."""
    faiss = _faiss()
    before = faiss.omp_get_max_threads() if faiss else None
    with threadpool_limits(limits=n):
        if faiss:
            faiss.omp_set_num_threads(n)
        _caps.append(n)
        try:
            yield
        finally:
            _caps.pop()
            if faiss:
                faiss.omp_set_num_threads(before)


class TreeRss:
    """Peak summed RSS of a process and all its descendants (psutil, every ``every`` s), by role.

    A Spark job's memory lives in the driver's JVM and its Python workers, which a daemon forks out of
    the driver's process group: one process's ``ru_maxrss``, or the group, says too little.
    """

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.pid, self.every = pid, every
        self.peak, self.peak_by_role = 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _role(cmd: str) -> str:
        return ("jvm" if "java" in cmd else "source" if "streaming_source_runner" in cmd
                else "executor workers" if "pyspark" in cmd else "driver")

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every):
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:  # the service itself has exited
                continue
            by_role: dict[str, int] = {}
            for p in tree:
                try:
                    role = "driver" if p.pid == self.pid else self._role(" ".join(p.cmdline()))
                    by_role[role] = by_role.get(role, 0) + p.memory_info().rss
                except psutil.Error:  # exited between listing and reading, or a zombie: skip it, not the sample
                    continue
            if sum(by_role.values()) > self.peak:
                self.peak, self.peak_by_role = sum(by_role.values()), by_role

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def run_with_peak_rss(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; returns (wall s, peak summed RSS of its process tree in MB, stdout + stderr)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
        sampler = TreeRss(proc.pid)
        proc.wait()
        sampler.stop()
        wall = time.perf_counter() - t0
        log.seek(0)
        out = log.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {out[-3000:]}")
    return wall, sampler.peak / 2**20, out


# what `python -m batch_index build` logs, to split its time into the serial and parallel parts
BUILD_PHASES = {"references_s": re.compile(r"build: references fitted in ([\d.]+) s"),
                "shards_s": re.compile(r"build shards: done in ([\d.]+) s"),
                "build_s": re.compile(r"built in ([\d.]+) s")}


def build_phases(log: str) -> dict[str, float]:
    """Seconds of each :data:`BUILD_PHASES` phase found in a build's log (NaN where absent)."""
    return {key: float(found[-1]) if (found := pat.findall(log)) else float("nan")
            for key, pat in BUILD_PHASES.items()}


def time_pass(search: SearchFn, q: F32, style: str) -> float:
    """Seconds to answer every row of ``q``: one call (``batch``) or one call per query (``single``)."""
    t0 = time.perf_counter()
    if style == "batch":
        search(q)
    else:
        for i in range(len(q)):
            search(q[i:i + 1])
    return time.perf_counter() - t0


def found_scores(q: F32, x: F32, found: npt.NDArray[np.integer], metric: str) -> npt.NDArray[np.float64]:
    """Exact scores of the rows each query got back (shape (nq, k)); -inf for missing (-1) or repeated rows."""
    out = np.full(found.shape, -np.inf)
    for i, row in enumerate(found):
        rows, first = np.unique(row, return_index=True)
        ok = rows >= 0
        out[i, first[ok]] = scores(q[i], x[rows[ok]], metric)
    return out


def recall_at_k(got: npt.NDArray[np.float64], truth: npt.NDArray[np.float64], rel_tol: float = 1e-6
                ) -> npt.NDArray[np.float64]:
    """Per-query recall@k as ann-benchmarks counts it: answers scoring at least the k-th true score.

    ``got`` and ``truth`` are exact scores (higher = better) of shape (nq, k); counting by score rather
    than by id treats ties (equal windows, float32 vs float64 rounding) fairly for every system.
    """
    k = truth.shape[1]
    kth = truth[:, -1:]
    hit = got >= kth - rel_tol * np.maximum(1.0, np.abs(kth))
    return np.minimum(hit.sum(axis=1), k) / k


def disk_mb(path: Path) -> float:
    """Bytes under ``path`` (file or directory) in MB (10^6)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def code_version() -> dict[str, str]:
    """The commit, and a hash of the ``batch_index`` sources as they are now (others may edit the tree)."""
    h = hashlib.sha256()
    for p in sorted((REPO / "batch_index").rglob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    dirty = _git("status", "--porcelain", "--", "batch_index", "bench")
    return {"commit": _git("rev-parse", "--short", "HEAD") or "unknown",
            "batch_index_sha256": h.hexdigest()[:16],
            "uncommitted": " ".join(sorted({line.split()[-1] for line in dirty.splitlines() if line.strip()}))
            or "none"}


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare runs: CPU, memory, load, versions, BLAS."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        mem_gb = None
    versions = {}
    for pkg in ("numpy", "scikit-learn", "scipy", "faiss-cpu", "pyspark", "threadpoolctl", "psutil"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    faiss = _faiss()
    if faiss is not None:
        versions["faiss compile options"] = faiss.get_compile_options().strip()
    blas = sorted({f"{p['internal_api']} {p.get('version') or ''} ({p['prefix']})".replace("  ", " ")
                   for p in threadpool_info()})
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "memory_gb": mem_gb,
        "load_average_at_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "python": platform.python_version(),
        "versions": versions,
        "blas_openmp": blas,
        "code": code_version(),
    }


def median_qps(n_queries: int, seconds: list[float]) -> float:
    return n_queries / float(np.median(seconds)) if seconds else float("nan")
