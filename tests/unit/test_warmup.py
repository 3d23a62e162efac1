"""No compile pause a user sees: every kernel is cacheable, and ``python -m batch_index warm`` fills the cache."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

from numba.core.caching import FunctionCache
from numba.core.registry import CPUDispatcher

import batch_index

REPO = Path(__file__).resolve().parents[2]


def _kernels() -> dict[str, CPUDispatcher]:
    """Every numba-compiled function defined in ``batch_index`` (spark_job imports pyspark: skipped)."""
    found = {}
    for info in pkgutil.walk_packages(batch_index.__path__, prefix="batch_index."):
        if info.name.rsplit(".", 1)[-1] in ("spark_job", "__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == module.__name__:
                found[f"{info.name.rsplit('.', 1)[-1]}.{name}"] = obj
    return found


def test_every_kernel_is_cached_on_disk() -> None:
    kernels = _kernels()
    assert {"walk._walk_many", "rescore._exact_many", "tree.descend"} <= set(kernels)
    not_cached = [name for name, k in kernels.items() if not isinstance(k._cache, FunctionCache)]
    assert not not_cached, f"compiled without cache=True: {not_cached}"


def test_warm_fills_an_empty_cache_with_every_search_kernel(tmp_path: Path) -> None:
    cache = tmp_path / "numba-cache"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "batch_index", "warm"], env=env, capture_output=True, text=True,
                          timeout=280)
    assert done.returncode == 0, done.stderr
    assert str(cache) in done.stdout
    cached = {p.name.split("-")[0] for p in cache.rglob("*.nbi")}  # e.g. "walk._walk_many"
    # every kernel a search calls directly (inlined helpers have no entry of their own)
    wanted = {n for n, k in _kernels().items() if not k.targetoptions.get("inline") == "always"}
    assert wanted <= cached, f"not compiled by warm: {sorted(wanted - cached)}"
