"""The indexed side of ``shape`` and ``zeuclidean`` (see :mod:`batch_index.engine.shape`): build and search.

Both reuse the machinery of the other metrics (a k-means tree per shard to start from, a neighbour
graph walked over 8-bit codes, an exact re-rank), fed with different points:

- ``shape`` space: :func:`~batch_index.engine.shape.spectral_features` of every z-normalised signal (the
  padded |FFT|, invariant to shift, whose dot product bounds NCC at every lag from above), reduced
  by a PCA fitted per shard (``shape-basis.npy``, the leading ``shape_rank`` directions of a sample
  of the shard's features plus the residual norm, as :class:`~batch_index.engine.transform.ReferenceTransform`
  does for raw signals). Candidates the walk finds are re-ranked by the exact FFT NCC.
  ``exact`` mode scores every row, in the order of the spectral bound, and stops once the bound of
  the next row is below the k-th best score found: rows it skips cannot enter the top k.
- ``zeuclidean`` space: z-normalised euclidean orders like cosine on centred signals, and a centred
  signal's reference coordinates follow from the stored ones (``Q^T (x - m 1) = Q^T x - m Q^T 1``;
  the residual norm from the centred norm), so it needs only each signal's mean and centred norm
  (``zstats.npy``, 8 bytes a signal), not a second copy of the signals.

Files per shard (float32, checksummed like the rest): ``shape-features.npy`` (n, shape_bins + 1),
``shape-basis.npy``, ``zstats.npy`` (n, 2), ``tree-shape.npz``/``graph-shape.npy``,
``tree-zeuclidean.npz``/``graph-zeuclidean.npy``. The manifest lists them under ``shape_spaces``
(not ``spaces``, which older readers load), with ``shape_max_lag``, ``shape_bins`` and ``shape_nfft``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from batch_index.engine.graph import build_graph
from batch_index.engine.metrics import RESCORE_MARGIN
from batch_index.engine.rescore import approx_scores
from batch_index.engine.shape import (
    SHAPE_METRICS,
    best_lags,
    fft_length,
    shape_scores,
    spectra,
    spectral_features,
    zeuclidean_scores,
    znormalise,
)
from batch_index.engine.transform import ReferenceTransform
from batch_index.engine.tree import KMeansTree, build_tree
from batch_index.engine.walk import ScalarCodes, VisitStamps, walk_many
from batch_index.errors import IndexFormatError
from batch_index.index_files import load_npy

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

#: rows z-normalised and transformed at once while building (bounds the float64 temporaries)
_BUILD_BLOCK: Final[int] = 8192
#: rows scored per step of exact mode's bound-ordered sweep
_SWEEP_BLOCK: Final[int] = 1024
#: queries of exact mode's sweep sharing each row's FFT (bounds their (queries, rows) arrays)
_SWEEP_QUERIES: Final[int] = 32
#: slack on the spectral bound for float32 rounding (features and NCC are unit-scale)
_BOUND_SLACK: Final[float] = 1e-4
#: features sampled per shard to fit its PCA
_PCA_SAMPLE: Final[int] = 8192


def spaces_of(metrics: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(m for m in SHAPE_METRICS if m in metrics)


# ---- build ------------------------------------------------------------------------------------------
def centred_coordinates(z: F32, stats: F32, basis: F32) -> F32:
    """Cosine-space points of the centred signals from raw reference coordinates ``z`` (n, r + 1).

    ``stats`` holds each signal's mean and centred norm; a flat signal maps to the origin.
    """
    u = basis.sum(axis=0, dtype=np.float64)  # Q^T 1
    proj = z[:, :-1].astype(np.float64) - stats[:, :1].astype(np.float64) * u[None, :]
    cn = stats[:, 1].astype(np.float64)
    resid = np.sqrt(np.maximum(cn * cn - np.einsum("ij,ij->i", proj, proj), 0.0))
    out = np.hstack([proj, resid[:, None]]) / np.where(cn > 0, cn, 1.0)[:, None]
    out[cn <= 0] = 0.0
    return out.astype(np.float32)


def signal_stats(signals: F32) -> F32:
    """Mean and centred norm per row, in float64 (the centred norm of a signal with a large offset)."""
    out = np.empty((len(signals), 2), dtype=np.float32)
    for lo in range(0, len(signals), _BUILD_BLOCK):
        x = np.asarray(signals[lo:lo + _BUILD_BLOCK], dtype=np.float64)
        mean = x.mean(axis=1)
        c = x - mean[:, None]
        cn = np.sqrt(np.einsum("ij,ij->i", c, c))
        out[lo:lo + len(x), 0] = mean
        out[lo:lo + len(x), 1] = np.where(znormalise(x).any(axis=1), cn, 0.0)  # flat: no shape
    return out


def shard_features(signals: F32, nfft: int, bins: int) -> F32:
    return np.vstack([spectral_features(znormalise(signals[lo:lo + _BUILD_BLOCK], np.float32), nfft, bins)
                      for lo in range(0, len(signals), _BUILD_BLOCK)]) if len(signals) else np.zeros(
        (0, bins + 1), np.float32)


def fit_feature_basis(features: F32, rank: int, seed: int) -> F32:
    """Leading ``rank`` directions of a sample of a shard's features (flat rows, all zero, left out)."""
    live = np.flatnonzero(features.any(axis=1))
    if live.size == 0:
        return np.eye(features.shape[1], min(rank, features.shape[1]), dtype=np.float32)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(live, size=min(_PCA_SAMPLE, live.size), replace=False))
    return ReferenceTransform.fit(features[pick], rank).basis


def build_shape_spaces(signals: F32, z: F32, transform: ReferenceTransform, metrics: tuple[str, ...], *,
                       max_lag: int, bins: int, rank: int, tree_args: dict[str, Any], graph_args: dict[str, Any],
                       seed: int) -> tuple[dict[str, bytes], dict[str, npt.NDArray[np.int32]], dict[str, F32]]:
    """Trees, graphs and extra arrays of one shard for the shape spaces in ``metrics``."""
    trees: dict[str, bytes] = {}
    graphs: dict[str, npt.NDArray[np.int32]] = {}
    extra: dict[str, F32] = {}
    points: dict[str, F32] = {}
    took: dict[str, float] = {}
    t0 = time.perf_counter()
    if "shape" in metrics:
        feats = shard_features(signals, fft_length(signals.shape[1], max_lag), bins)
        basis = fit_feature_basis(feats, rank, seed)
        extra["shape-features"], extra["shape-basis"] = feats, basis
        points["shape"] = _apply(basis, feats)
        took["shape/points"] = time.perf_counter() - t0
    if "zeuclidean" in metrics:
        t0 = time.perf_counter()
        extra["zstats"] = signal_stats(signals)
        points["zeuclidean"] = centred_coordinates(z, extra["zstats"], transform.basis)
        took["zeuclidean/points"] = time.perf_counter() - t0
    for space, pts in points.items():
        t0 = time.perf_counter()
        trees[space] = build_tree(pts, seed=seed, **tree_args).to_bytes()
        took[f"{space}/tree"] = time.perf_counter() - t0
        graphs[space] = build_graph(pts, seed=seed, **graph_args)
        took[f"{space}/graph"] = time.perf_counter() - t0 - took[f"{space}/tree"]
    logger.info("shape spaces of %d signals built: %s", len(signals),
                ", ".join(f"{key} {v:.1f} s" for key, v in took.items()), extra={"shape_timings": took})
    return trees, graphs, extra


# ---- search -----------------------------------------------------------------------------------------
@dataclass
class _ShapeShard:
    offset: int
    signals: np.ndarray  # memory map (n, d)
    points: dict[str, F32]
    trees: dict[str, KMeansTree]
    graphs: dict[str, npt.NDArray[np.int32]]
    features: F32 | None = None
    basis: F32 | None = None
    stats: F32 | None = None
    codes: dict[str, ScalarCodes] = field(default_factory=dict)
    _visits: dict[int, VisitStamps] = field(default_factory=dict)

    def visits(self) -> VisitStamps:
        import threading

        key = threading.get_ident()
        if key not in self._visits:
            self._visits[key] = VisitStamps(len(self.signals))
        return self._visits[key]

    def code(self, space: str) -> ScalarCodes:
        if space not in self.codes:
            self.codes[space] = ScalarCodes.encode(self.points[space])
        return self.codes[space]


class ShapeSpaces:
    """The shape spaces of a loaded index: per-shard arrays, and the search of ``shape``/``zeuclidean``."""

    def __init__(self, manifest: dict[str, Any], shards: list[_ShapeShard], transform: ReferenceTransform) -> None:
        self.metrics = tuple(manifest.get("shape_spaces", ()))
        self.max_lag = int(manifest.get("shape_max_lag", 0))
        self.nfft = int(manifest.get("shape_nfft", 0))
        self.bins = int(manifest.get("shape_bins", 0))
        self.shards = shards
        self.transform = transform

    @classmethod
    def load(cls, manifest: dict[str, Any], shard_dirs: list[Path], offsets: list[int], signals: list[np.ndarray],
             zs: list[F32], transform: ReferenceTransform) -> ShapeSpaces:
        spaces = tuple(manifest.get("shape_spaces", ()))
        loaded = []
        for d, off, sig, z in zip(shard_dirs, offsets, signals, zs):
            trees, graphs, points = {}, {}, {}
            shard = _ShapeShard(off, sig, points, trees, graphs)
            for space in spaces:
                try:
                    trees[space] = KMeansTree.from_bytes((d / f"tree-{space}.npz").read_bytes())
                except OSError as e:
                    raise IndexFormatError(f"cannot read tree {space!r} in {d}: {e}") from e
                graphs[space] = load_npy(d / f"graph-{space}.npy")
            if "shape" in spaces:
                shard.features = load_npy(d / "shape-features.npy", mmap=True)
                shard.basis = load_npy(d / "shape-basis.npy")
                points["shape"] = _apply(shard.basis, np.asarray(shard.features))
            if "zeuclidean" in spaces:
                shard.stats = load_npy(d / "zstats.npy")
                points["zeuclidean"] = centred_coordinates(z, shard.stats, transform.basis)
            n = len(sig)
            for space in spaces:
                g, t = graphs[space], trees[space]
                if points[space].shape[0] != n or (g.size and (int(g.min()) < -1 or int(g.max()) >= n)) or (
                        t.order.size and (int(t.order.min()) < 0 or int(t.order.max()) >= n)) or (
                        t.centroid.shape[1:] != points[space].shape[1:]):
                    raise IndexFormatError(f"the {space!r} arrays in {d} do not match the shard's {n} signals")
            loaded.append(shard)
        return cls(manifest, loaded, transform)

    def warm(self) -> None:
        for s in self.shards:
            for space in self.metrics:
                s.code(space)

    # -- the three modes ---------------------------------------------------------------------------
    def search(self, q: F32, metric: str, mode: str, k: int, ef: int, rerank: int, n_probe: int, route: str
               ) -> tuple[I64, npt.NDArray[np.float64]]:
        """Global rows and exact scores, shape (nq, k): the same contract as ``SearchIndex.search_arrays``."""
        if mode == "exact":
            return self._exact(q, metric, k)
        cand = self._candidates(q, metric, mode, ef, max(rerank, k), n_probe, route)
        return self._rerank(q, cand, metric, k)

    def _query_points(self, q: F32, metric: str, shard: _ShapeShard) -> F32:
        if metric == "shape":
            assert shard.basis is not None
            return _apply(shard.basis, spectral_features(znormalise(q, np.float32), self.nfft, self.bins))
        zq, _ = self.transform.apply(q)
        return centred_coordinates(zq, signal_stats(q), self.transform.basis)

    def _candidates(self, q: F32, metric: str, mode: str, ef: int, keep: int, n_probe: int, route: str) -> I64:
        """Per query the ``keep`` nearest rows found in the metric's space (global, -1 padded)."""
        cands, dists = [], []
        for s in self.shards:
            aq = self._query_points(q, metric, s)
            pts = s.points[metric]
            if mode == "transform":
                d = (np.einsum("ij,ij->i", pts, pts)[None, :] - 2.0 * (aq @ pts.T)).astype(np.float32)
                r = min(keep, d.shape[1])
                local = np.argpartition(d, r - 1, axis=1)[:, :r] if r < d.shape[1] else np.tile(
                    np.arange(d.shape[1]), (len(q), 1))
                dist = np.take_along_axis(d, local, axis=1)
            else:
                local, dist = walk_many(s.code(metric), s.graphs[metric], aq,
                                        s.trees[metric].descent(pts, n_probe, route), ef, s.visits())
            cands.append(np.where(local >= 0, local + s.offset, -1))
            dists.append(np.where(local >= 0, dist, np.inf))
        cand, dist = np.hstack(cands), np.hstack(dists)
        if cand.shape[1] > keep:
            cand = np.take_along_axis(cand, np.argpartition(dist, keep - 1, axis=1)[:, :keep], 1)
        return cand

    def _gather(self, rows: I64) -> F32:
        """Raw signals of global ``rows`` (any order), read from the shards' memory maps in row order."""
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.shards[0].signals.shape[1]), dtype=np.float32)
        srt = rows[order]
        for s in self.shards:
            mine = (srt >= s.offset) & (srt < s.offset + len(s.signals))
            if mine.any():
                out[order[mine]] = s.signals[srt[mine] - s.offset]
        return out

    def scores_of(self, query: npt.NDArray, rows: npt.NDArray, metric: str, dtype: type = np.float64
                  ) -> tuple[npt.NDArray, I64]:
        """Scores (and, for shape, best lags; 0 for zeuclidean) of global ``rows`` against one query."""
        x = self._gather(rows)
        if metric == "shape":
            return shape_scores(query, x, self.max_lag, dtype=dtype)
        if dtype is np.float64:
            return zeuclidean_scores(query, x), np.zeros(len(rows), np.int64)
        qz = znormalise(query, np.float32)[0]
        return -np.sqrt(np.maximum(2.0 - 2.0 * (znormalise(x, np.float32) @ qz), 0.0)), np.zeros(len(rows), np.int64)

    def _pearson_preselect(self, q: F32, cand: I64, keep: int) -> I64:
        """The ``keep`` candidates per row of highest float32 Pearson correlation ``<zq, x> / |x - mean|``.

        ``zq`` has zero mean, so the raw rows need no centring: the compiled in-place dot kernel of the
        other metrics (``rescore``) scores them where they lie in the memory map.
        """
        qz = znormalise(q, np.float32)
        score = np.full(cand.shape, -np.inf, np.float32)
        for s in self.shards:
            assert s.stats is not None
            mine = (cand >= s.offset) & (cand < s.offset + len(s.signals))
            local = np.where(mine, cand - s.offset, -1)
            dots = approx_scores(qz, s.signals, local, s.stats[:, 1], "dot")
            cn = s.stats[:, 1][np.maximum(local, 0)]
            score = np.where(mine, dots / np.where(cn > 0, cn, np.inf), score)
        best = np.argpartition(-score, keep - 1, axis=1)[:, :keep]
        return np.where(np.take_along_axis(score, best, 1) > -np.inf, np.take_along_axis(cand, best, 1), -1)

    def _rerank(self, q: F32, cand: I64, metric: str, k: int) -> tuple[I64, npt.NDArray[np.float64]]:
        """float32 NCC (or correlation) over every candidate, float64 over the best ``k + margin``."""
        if metric == "zeuclidean" and cand.shape[1] > k + RESCORE_MARGIN:
            cand = self._pearson_preselect(q, cand, k + RESCORE_MARGIN)
        out_i = np.full((len(q), k), -1, np.int64)
        out_s = np.full((len(q), k), -np.inf)
        for i, row in enumerate(cand):
            row = np.unique(row[row >= 0])
            if len(row) > k + RESCORE_MARGIN:
                approx, _ = self.scores_of(q[i], row, metric, np.float32)
                row = np.sort(row[np.argpartition(-approx, k + RESCORE_MARGIN - 1)[:k + RESCORE_MARGIN]])
            s, _ = self.scores_of(q[i], row, metric)
            best = np.lexsort((row, -s))[:k]
            out_i[i, :len(best)], out_s[i, :len(best)] = row[best], s[best]
        return out_i, out_s

    def _exact(self, q: F32, metric: str, k: int) -> tuple[I64, npt.NDArray[np.float64]]:
        if metric == "zeuclidean":
            return self._rerank(q, self._pearson_top(q, k + RESCORE_MARGIN), metric, k)
        return self._rerank(q, self._bounded_sweep(q, k + RESCORE_MARGIN), metric, k)

    def _pearson_top(self, q: F32, keep: int, block: int = 65536) -> I64:
        """Per query the ``keep`` rows of highest float32 Pearson correlation: one GEMM per block."""
        qz = znormalise(q, np.float32)
        cands = []
        for s in self.shards:
            assert s.stats is not None
            for lo in range(0, len(s.signals), block):
                x = np.asarray(s.signals[lo:lo + block], dtype=np.float32)
                cn = s.stats[lo:lo + block, 1]
                r = (qz @ x.T) / np.where(cn > 0, cn, np.inf)[None, :]
                kk = min(keep, r.shape[1])
                part = np.argpartition(-r, kk - 1, axis=1)[:, :kk]
                cands.append(part + lo + s.offset)
        return np.hstack(cands)

    def _bounded_sweep(self, q: F32, keep: int) -> I64:
        """Per query the ``keep`` rows of highest float32 NCC: every row whose spectral bound can reach
        the query's running ``keep``-th score is scored, every other row is skipped (it cannot enter).

        Queries go in groups sharing each row's FFT: the group's thresholds are seeded by scoring each
        query's ``keep`` rows of highest bound, then the shards are read in row order, block by block,
        each block's spectra computed once and multiplied by the spectra of the queries that still need
        those rows (one inverse FFT per query and needed row: the cost that remains).
        """
        out = np.full((len(q), keep), -1, np.int64)
        for lo in range(0, len(q), _SWEEP_QUERIES):
            got = self._sweep_group(q[lo:lo + _SWEEP_QUERIES], keep)  # fewer columns if fewer rows
            out[lo:lo + len(got), :got.shape[1]] = got
        return out

    def _sweep_group(self, q: F32, keep: int) -> I64:
        qz = znormalise(q, np.float32)
        qspec = spectra(qz, self.nfft)
        fq = spectral_features(qz, self.nfft, self.bins)
        # columns: the loaded shards' rows end to end; a loaded subset (an executor's shards) does not
        # start at global row 0 nor run contiguously, so a column maps to its global row by ``start``
        bounds = np.vstack([np.asarray(s.features) @ fq.T for s in self.shards]).T  # (nq, loaded rows)
        start = np.cumsum([0] + [len(s.signals) for s in self.shards])
        global_row = np.concatenate([np.arange(s.offset, s.offset + len(s.signals)) for s in self.shards])
        keep = min(keep, bounds.shape[1])
        if keep == 0:
            return np.full((len(q), 0), -1, np.int64)
        seed = np.argpartition(-bounds, keep - 1, axis=1)[:, :keep]  # columns
        best_i = np.empty((len(q), keep), np.int64)
        best_s = np.empty((len(q), keep), np.float32)
        for i, cols in enumerate(seed):
            rows = np.sort(global_row[cols])
            sc, _ = best_lags(qspec[i:i + 1], spectra(znormalise(self._gather(rows), np.float32), self.nfft),
                              self.nfft, self.max_lag)
            best_i[i], best_s[i] = rows, sc
        seen = np.zeros(bounds.shape, dtype=bool)
        np.put_along_axis(seen, seed, True, axis=1)
        floor = best_s.min(axis=1)
        for s, first in zip(self.shards, start, strict=False):
            for lo in range(0, len(s.signals), _SWEEP_BLOCK):
                hi = min(lo + _SWEEP_BLOCK, len(s.signals))
                g = slice(first + lo, first + hi)
                need = (bounds[:, g] + _BOUND_SLACK >= floor[:, None]) & ~seen[:, g]
                if not need.any():
                    continue
                rows = np.flatnonzero(need.any(axis=0))
                xs = spectra(znormalise(np.asarray(s.signals[lo + rows], np.float32), np.float32), self.nfft)
                for i in np.flatnonzero(need[:, rows].any(axis=1)):
                    mine = need[i, rows]
                    sc, _ = best_lags(qspec[i:i + 1], xs[mine], self.nfft, self.max_lag)
                    if not (sc > floor[i]).any():
                        continue
                    cat_s = np.concatenate([best_s[i], sc])
                    cat_i = np.concatenate([best_i[i], rows[mine] + s.offset + lo])
                    top = np.argpartition(-cat_s, keep - 1)[:keep]
                    best_s[i], best_i[i] = cat_s[top], cat_i[top]
                    floor[i] = best_s[i].min()
        return best_i


def _apply(basis: F32, feats: npt.NDArray) -> F32:
    """PCA coordinates plus residual norm (as ``ReferenceTransform.apply``)."""
    return ReferenceTransform(references=np.zeros((0, basis.shape[0]), np.float32), basis=basis).apply(feats)[0]
