"""Fill numba's cache once, at install time, so that no user's first search pays for compiling.

Every search kernel is declared ``cache=True``, but a cache starts empty: the first ``batch_index
search`` after an install compiled the walk, descent, re-scoring and bound kernels for ~20-30 s
(measured on a 360-signal index: 24.4 s wall against 3.1 s for the next, see
``bench/results/first-search``). Compiled code is specific to the argument types, not to sizes, so a
tiny index answering every metric in every mode, one query and a batch, compiles every signature a
real index uses (float32 memory maps opened read-only, int32 graphs, ...). The index is one shard,
so hkmeans answers in one call (``one_shard``); :meth:`SearchIndex.warm` also runs the stage-by-stage
path, which indexes of several shards take. ``make setup`` and the Docker image run this once after
installing.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batch_index.build.shards import BuildConfig, build_index
from batch_index.corpus.synthetic import SynthConfig, generate
from batch_index.engine.metrics import METRICS
from batch_index.search import MODES, SearchIndex, SearchParams

#: small enough to build in about a second, large enough for a tree with inner nodes and a real walk
_TINY = BuildConfig(metrics=METRICS, n_references=64, reference_sample=256, basis_rank=32, leaf_size=16,
                    branching=4, graph_degree=8, l1_blocks=25)
_SYNTH = SynthConfig(sampling_rate=25.0, duration_s=10.0, seed=3)


@dataclass(frozen=True)
class WarmReport:
    seconds: float
    cache_dir: str
    cached_files: int


def cache_dir() -> str:
    """Where numba writes its cache: ``NUMBA_CACHE_DIR`` if set, else ``__pycache__`` beside the compiled
    modules, which all live in ``engine/`` (numba falls back to a user cache directory where that is not
    writable)."""
    return os.environ.get("NUMBA_CACHE_DIR") or str(Path(__file__).resolve().parent / "engine" / "__pycache__")


def _count_cached(root: str) -> int:
    path = Path(root)
    return sum(1 for _ in path.rglob("*.nbi")) if path.is_dir() else 0


def warm_kernels(n: int = 400) -> WarmReport:
    """Compile (or load from the cache) every kernel a search runs, on a throwaway index of ``n`` signals."""
    t0 = time.perf_counter()
    ids, _, x = generate(0, n, _SYNTH)
    queries = generate(n, 9, _SYNTH)[2]
    with tempfile.TemporaryDirectory(prefix="ecg-warm-") as tmp:
        index = SearchIndex.load(build_index(ids, x, Path(tmp) / "v", _TINY)).warm()
        for metric in index.metrics:
            params = SearchParams.for_metric(metric, ef=32, rerank=16)
            for mode in MODES:
                for batch in (queries[:1], queries):  # one query, and a batch (a different path for some stages)
                    index.search_arrays(np.ascontiguousarray(batch), metric, mode, 10, params)
        del index
    where = cache_dir()
    return WarmReport(time.perf_counter() - t0, where, _count_cached(where))


__all__ = ["WarmReport", "cache_dir", "warm_kernels"]
