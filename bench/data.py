"""Benchmark corpora and their two query sets: unseen windows, and perturbed copies of corpus members."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from batch_index.corpus.synthetic import SynthConfig, generate, row_id
from batch_index.corpus.wfdb import IngestConfig, windows_from_record

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
REAL_RECORDS = ("100", "a103l")


@dataclass(frozen=True)
class Perturb:
    """How a corpus member becomes a "perturbed" query: shifted, rescaled, with noise added.

    max_shift : samples, uniform in [-max_shift, max_shift]; the window is shifted, edges repeated
    gain : uniform range of the amplitude factor
    noise : std of added white noise as a fraction of the window's own std
    """

    max_shift: int = 5
    gain: tuple[float, float] = (0.9, 1.1)
    noise: float = 0.05

    def apply(self, x: F32, seed: int) -> F32:
        """Perturbed copies of the rows of ``x`` (shape (n, d)), deterministic for ``seed``."""
        rng = np.random.default_rng(seed)
        n, d = x.shape
        shift = rng.integers(-self.max_shift, self.max_shift + 1, size=n)
        src = np.clip(np.arange(d)[None, :] - shift[:, None], 0, d - 1)
        y = np.take_along_axis(x, src, axis=1).astype(np.float64)
        y *= rng.uniform(*self.gain, size=(n, 1))
        y += rng.standard_normal(y.shape) * (self.noise * x.std(axis=1, keepdims=True))
        return y.astype(np.float32)


@dataclass
class Dataset:
    """A corpus (ids, signals of shape (n, d)) and named query sets of shape (nq, d)."""

    name: str
    ids: list[str]
    corpus: F32
    queries: dict[str, F32]
    description: str


def _synthetic_rows(start: int, count: int, seed: int, cache: Path | None) -> F32:
    """Rows ``start .. start + count - 1`` of the synthetic corpus, cached as ``.npy`` (slow to generate)."""
    path = None if cache is None else cache / f"synth-seed{seed}-{start}-{count}.npy"
    if path is not None and path.is_file():
        return np.load(path)
    logger.info("generating %d synthetic windows (rows %d..)", count, start)
    x = generate(start, count, SynthConfig(seed=seed))[2]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, x)
        tmp.rename(path)
    return x


def synthetic(n: int, n_queries: int, *, seed: int = 0, cache: Path | None = None,
              perturb: Perturb = Perturb()) -> Dataset:
    """``n`` synthetic windows; unseen queries are the next rows (``n ..``), never in the corpus."""
    x = _synthetic_rows(0, n, seed, cache)
    unseen = _synthetic_rows(n, n_queries, seed, cache)
    picks = np.random.default_rng([seed, 1]).choice(n, size=min(n_queries, n), replace=False)
    return Dataset(f"synthetic-{n}", [row_id(i) for i in range(n)], x,
                   {"unseen": unseen, "perturbed": perturb.apply(x[np.sort(picks)], seed)},
                   f"synthetic ECG (batch_index.corpus.synthetic, seed {seed}): {n} windows of {x.shape[1]} samples; "
                   f"unseen queries = rows {n}..{n + n_queries - 1}")


def real_records(wfdb_dir: Path, n_queries: int, *, stride_s: float = 0.5, holdout: float = 0.12, seed: int = 0,
                 perturb: Perturb = Perturb(), records: tuple[str, ...] = REAL_RECORDS) -> Dataset:
    """Overlapping 10 s windows of the shared WFDB records; the last ``holdout`` of each record is held out.

    Held-out windows start after the cut, corpus windows end before it, so no query shares a sample
    with the corpus; the unseen queries are drawn from the held-out windows.
    """
    cfg = IngestConfig(stride_s=stride_s)
    ids: list[str] = []
    corpus, held = [], []
    for rec in records:
        rid, _, x = windows_from_record(wfdb_dir / rec, cfg)
        start = np.array([int(i.rsplit("-", 1)[1]) for i in rid])
        cut = (start.max() + cfg.window_len) * (1 - holdout)
        keep = start + cfg.window_len <= cut
        ids += [i for i, k in zip(rid, keep) if k]
        corpus.append(x[keep])
        held.append(x[start >= cut])
    x, pool = np.concatenate(corpus), np.concatenate(held)
    rng = np.random.default_rng([seed, 2])
    unseen = pool[np.sort(rng.choice(len(pool), size=min(n_queries, len(pool)), replace=False))]
    picks = np.sort(rng.choice(len(x), size=min(n_queries, len(x)), replace=False))
    return Dataset("real-records", ids, x, {"unseen": unseen, "perturbed": perturb.apply(x[picks], seed)},
                   f"records {', '.join(records)} ({wfdb_dir}): {len(x)} windows of 10 s at 250 Hz, stride "
                   f"{stride_s} s; last {holdout:.0%} of each record held out ({len(pool)} windows)")
