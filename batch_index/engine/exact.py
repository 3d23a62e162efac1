"""Exact top-k without scoring every signal: lower bounds prune, survivors are scored in bound order.

Brute force reads every raw signal for every query (10 KB each: 1 GB a query at 10^5). The index
already keeps, per signal, summaries that bound every metric from the right side (as data-series
indexes such as MESSI and SOFA bound distances with their summaries):

- reference coordinates ``z = [B^T x, |x - B B^T x|]`` in an orthonormal basis ``B`` (``transform``):
  ``|z_q - z_x| <= |q - x|`` and ``<q, x> <= <z_q, z_x>`` (the residuals meet at best head on), so
  euclidean, cosine (divided by the norms) and dot are bounded; manhattan too, as ``|d|_1 >= |d|_2``;
- 8-bit codes of those coordinates in each metric's space (the ones the graph walk reads), with each
  point's own rounding error ``e = |p - p_hat|`` kept: ``|a - p| >= |a - p_hat| - e`` and
  ``<a, p> <= <a, p_hat> + |a| e``: a bound from a quarter of the bytes;
- block sums (``block_sums``): ``sum_b |S_b(q) - S_b(x)| <= |q - x|_1``, also for coarser blocks;
- float32 scores (BLAS) with the classic error bound of a float32 sum.

Per query: the cheap bound over every signal (codes, or 25 coarse block sums for manhattan), the finer
one (all float coordinates, or all block sums) for the signals it cannot rule out, float32 scores
where many are still left, then the raw signals in float64, in the order of the bounds and in growing
chunks, until the next bound cannot reach the k-th best score found. A signal is skipped only when its
bound is strictly below that score, so a tie is always scored, and the answer is brute force's
(:func:`brute_force_top_k`): the same float64 scores (:func:`batch_index.engine.metrics.scores`, row by row)
ranked by score, then by lower row.

Floating point: the stored coordinates were computed in float32 (a GEMM over 2,500 samples), so the
bounds from them are loosened by ``Z_SLACK`` of ``|q| |x|`` (dot, cosine) or of ``|q| + |x|``
(euclidean), ~150x twice the largest float32 error measured on the bench corpora (3.4e-6 of the norm,
``bench/results/exact``);
every other error is bounded by analysis (float32 sums, the codes' own errors, block sums rounded once
from float64). Where a cosine's norms are too small to bound (zero signals), the bound is 2, above any
cosine: such signals are always scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from numba import njit

from batch_index.engine.block_sums import block_starts, block_sums
from batch_index.engine.metrics import scores, top_k
from batch_index.engine.transform import SPACE_OF_METRIC, space_points, space_queries
from batch_index.engine.walk import ScalarCodes

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: coarse block sums in the cheap manhattan bound (sums of runs of the index's block sums)
COARSE_BLOCKS: Final[int] = 25
#: signals the first round scores raw (best by the finer bound among the best by the cheap one), so
#: that a k-th best score exists to prune with
SEED: Final[int] = 256
FIRST_CHUNK: Final[int] = 32
#: more signals than this left after the finer bound are bounded once more, by float32 scores
BULK: Final[int] = 256
MAX_CHUNK: Final[int] = 1024
Z_SLACK: Final[float] = 1e-3
L1_SLACK: Final[float] = 1e-6
#: below this |q| |x| a cosine is not bounded (brute force scores 0 below 1e-12)
_TINY_DENOM: Final[float] = 1e-9

COSINE, EUCLIDEAN, DOT, L2_FOR_L1 = 0, 1, 2, 3
_Z_CODE: Final[dict[str, int]] = {"cosine": COSINE, "euclidean": EUCLIDEAN, "dot": DOT, "manhattan": L2_FOR_L1}
_FASTMATH: Final[set[str]] = {"nsz", "contract", "reassoc"}  # SIMD sums; no nnan/ninf: bounds may be large
#: float32 sums of up to ~1,000 terms err by at most ~6e-5 of the summed magnitudes; 1e-4 covers it
_SUM_SLACK: Final[float] = 1e-4
_CODE_MAX: Final[float] = 128.0  # |code| of an int8 code


@dataclass(frozen=True)
class SpaceCodes:
    """8-bit codes of a metric space's points with each point's own rounding error, so a bound from the
    codes is a bound: ``|p - p_hat| = err`` moves a distance by at most ``err`` (triangle inequality)
    and a dot product with ``a`` by at most ``|a| err`` (Cauchy-Schwarz)."""

    codes: npt.NDArray[np.int8]
    base: F32
    step: F32
    err: F64  # (n,) |p - decoded p|, computed in float64 and rounded up
    sq: F64  # (2, n): |decoded p|^2 and |p|^2

    @classmethod
    def of(cls, points: F32, codes: ScalarCodes | None = None, block: int = 16384) -> SpaceCodes:
        codes = codes if codes is not None else ScalarCodes.encode(points)
        err, sq = np.empty(len(points)), np.empty((2, len(points)))
        for lo in range(0, len(points), block):
            exact = points[lo:lo + block].astype(np.float64)
            decoded = codes.base.astype(np.float64) + codes.codes[lo:lo + block] * codes.step.astype(np.float64)
            err[lo:lo + block] = np.sqrt(np.einsum("ij,ij->i", exact - decoded, exact - decoded))
            sq[0, lo:lo + block] = np.einsum("ij,ij->i", decoded, decoded)
            sq[1, lo:lo + block] = np.einsum("ij,ij->i", exact, exact)
        return cls(codes=codes.codes, base=codes.base, step=codes.step, err=err * (1 + 1e-6) + 1e-30, sq=sq)


def _coarse(sums: F32, n_coarse: int) -> F32:
    """Sums of runs of block sums: coarser block sums, a looser (and cheaper) L1 bound."""
    return np.add.reduceat(sums, block_starts(sums.shape[1], n_coarse), axis=1, dtype=np.float64).astype(np.float32)


@dataclass
class ShardBounds:
    """A shard's summaries laid out for the bound kernels (built once per loaded shard)."""

    z: F32  # (n, r + 1) reference coordinates, the residual norm last
    norms: F32  # (n,) signal norms
    blocks: F32 | None  # (n, b) block sums (memory map) or None
    coarse: F32 | None  # (n, c) sums of runs of them
    abs_sums: F64 | None  # (n,) sum of |block sums|, what the L1 slack scales with
    all_rows: I64
    spaces: dict[str, SpaceCodes]  # codes of each metric space's points, for the cheap bound

    @classmethod
    def of(cls, z: F32, norms: F32, blocks: F32 | None = None,
           codes: dict[str, tuple[F32, ScalarCodes]] | None = None) -> ShardBounds:
        """``codes``: per space, its points and their codes where the caller has them (a loaded shard
        does, for its walks); every other space is encoded here."""
        supplied = codes or {}
        max_norm = float(norms.max(initial=0.0))
        spaces = {}
        for space in dict.fromkeys(SPACE_OF_METRIC.values()):
            points, sq8 = supplied.get(space, (space_points(z, norms, space, max_norm), None))
            spaces[space] = SpaceCodes.of(points, sq8)
        coarse = abs_sums = None
        if blocks is not None:
            blocks = np.asarray(blocks)
            coarse = _coarse(blocks, COARSE_BLOCKS)
            abs_sums = np.abs(blocks).sum(axis=1, dtype=np.float64)
        return cls(z=np.ascontiguousarray(z), norms=np.asarray(norms, dtype=np.float32),
                   blocks=blocks, coarse=coarse,
                   abs_sums=abs_sums, all_rows=np.arange(len(z), dtype=np.int64),
                   spaces=spaces)

    @property
    def size(self) -> int:
        return len(self.z)


@dataclass(frozen=True)
class QueryTerms:
    """The query side of every bound, for a batch of queries (the same for every shard)."""

    q64: F64
    z: F32
    norms: F32
    blocks: F32 | None
    coarse: F32 | None
    abs_sums: F64 | None
    spaces: dict[str, F32]  # query coordinates in each metric space

    @classmethod
    def of(cls, q: F32, z: F32, norms: F32, l1_blocks: int) -> QueryTerms:
        """``z``, ``norms``: the transform of ``q`` (``ReferenceTransform.apply``); ``l1_blocks``: 0 for none."""
        blocks = block_sums(q, l1_blocks) if l1_blocks else None
        return cls(q64=np.asarray(q, dtype=np.float64), z=z, norms=norms, blocks=blocks,
                   coarse=None if blocks is None else _coarse(blocks, COARSE_BLOCKS),
                   abs_sums=None if blocks is None else np.abs(blocks).sum(axis=1, dtype=np.float64),
                   spaces={s: space_queries(z, norms, s) for s in dict.fromkeys(SPACE_OF_METRIC.values())})


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _z_bounds(code, zq, qn, zx, xn, rows, slack):  # type: ignore[no-untyped-def]
    """Upper bounds of the score of ``rows`` from their reference coordinates ``zx``."""
    m = zq.shape[0]
    out = np.empty(rows.shape[0], np.float64)
    for k in range(rows.shape[0]):
        r = rows[k]
        if code == EUCLIDEAN or code == L2_FOR_L1:
            s = 0.0
            for j in range(m):
                d = np.float64(zq[j]) - np.float64(zx[r, j])
                s += d * d
            lb = np.sqrt(s) - slack * (np.float64(qn) + np.float64(xn[r]))
            out[k] = 1.0 / (1.0 + max(lb, 0.0))
        else:
            s = 0.0
            for j in range(m):
                s += np.float64(zq[j]) * np.float64(zx[r, j])
            denom = np.float64(qn) * np.float64(xn[r])
            if code == DOT:
                out[k] = s + slack * denom
            elif denom > _TINY_DENOM:
                out[k] = s / denom + slack
            else:
                out[k] = 2.0
    return out


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _l1_bounds(sq, aq, sx, ax, rows, slack):  # type: ignore[no-untyped-def]
    """Upper bounds of the manhattan score of ``rows`` from block sums ``sx`` (their |sums| summed: ``ax``)."""
    b = sq.shape[0]
    out = np.empty(rows.shape[0], np.float64)
    for k in range(rows.shape[0]):
        r = rows[k]
        s = 0.0
        for j in range(b):
            s += abs(np.float64(sq[j]) - np.float64(sx[r, j]))
        lb = s - slack * (aq + ax[r])
        out[k] = 1.0 / (1.0 + max(lb, 0.0))
    return out


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _code_bounds(code, u, a_base, a_norm, a_sq, qn, q_slack, codes, err, p_sq, xn, rows, slack
                 ):  # type: ignore[no-untyped-def]
    """Upper bounds of the score of ``rows`` from 8-bit codes of their points ``p`` in the metric's space.

    One multiply-add per byte: ``<a, p_hat> = <a, base> + sum_j u_j c_j`` with ``u = a * step``, exact up
    to ``q_slack``. Then ``<a, p> <= <a, p_hat> + |a| err`` (dot), and with ``|a - p_hat|^2 = |a|^2 +
    |p_hat|^2 - 2 <a, p_hat>``, ``|a - p| >= |a - p_hat| - err`` (euclidean; cosine on unit vectors:
    ``<a, p> = (|a|^2 + |p|^2 - |a - p|^2) / 2``). ``p_sq``: ``|p_hat|^2``, then ``|p|^2`` (cosine).
    """
    width = codes.shape[1]
    out = np.empty(rows.shape[0], np.float64)
    for k in range(rows.shape[0]):
        r = rows[k]
        s = np.float32(0.0)
        for j in range(width):
            s += u[j] * np.float32(codes[r, j])
        dot = a_base + np.float64(s)
        if code == DOT:
            out[k] = dot + q_slack + a_norm * err[r] + slack * np.float64(qn) * np.float64(xn[r])
            continue
        d2 = a_sq + p_sq[0, r] - 2.0 * (dot + q_slack)
        lb = max(np.sqrt(max(d2, 0.0)) - err[r], 0.0)
        if code == COSINE:
            if np.float64(qn) * np.float64(xn[r]) <= _TINY_DENOM:
                out[k] = 2.0
            else:
                out[k] = 0.5 * (a_sq + p_sq[1, r] - lb * lb) + slack
        else:
            lb -= slack * (np.float64(qn) + np.float64(xn[r]))
            out[k] = 1.0 / (1.0 + max(lb, 0.0))
    return out


def _cheap_code_bounds(terms: QueryTerms, i: int, sb: ShardBounds, metric: str, rows: I64) -> F64:
    space = SPACE_OF_METRIC[metric]
    sc, a = sb.spaces[space], terms.spaces[space][i].astype(np.float64)
    weighted = a * sc.step.astype(np.float64)
    a_base = float(a @ sc.base.astype(np.float64))
    # float32 products and sum: at most _SUM_SLACK of the summed magnitudes; <a, base> is float64
    q_slack = _SUM_SLACK * _CODE_MAX * float(np.abs(weighted).sum()) + 1e-12 * abs(a_base)
    return _code_bounds(_Z_CODE[metric], weighted.astype(np.float32), a_base, float(np.linalg.norm(a)),
                        float(a @ a), terms.norms[i], q_slack, sc.codes, sc.err, sc.sq, sb.norms, rows, Z_SLACK)


@njit(cache=True, nogil=True)
def _top_rows(values, m):  # type: ignore[no-untyped-def]
    """Rows of the ``m`` largest ``values`` (any order): a size-``m`` min-heap, one comparison for most rows."""
    heap_v = np.empty(m, np.float64)
    heap_i = np.empty(m, np.int64)
    for r in range(m):
        heap_v[r] = values[r]
        heap_i[r] = r
    for start in range(m // 2 - 1, -1, -1):
        _sift(heap_v, heap_i, start, m)
    for r in range(m, values.shape[0]):
        if values[r] > heap_v[0]:
            heap_v[0] = values[r]
            heap_i[0] = r
            _sift(heap_v, heap_i, 0, m)
    return heap_i


@njit(cache=True, nogil=True, inline="always")
def _sift(hv, hi, pos, n):  # type: ignore[no-untyped-def]
    while True:
        child = 2 * pos + 1
        if child >= n:
            return
        if child + 1 < n and hv[child + 1] < hv[child]:
            child += 1
        if hv[pos] <= hv[child]:
            return
        hv[pos], hv[child] = hv[child], hv[pos]
        hi[pos], hi[child] = hi[child], hi[pos]
        pos = child


def _bounds(terms: QueryTerms, i: int, sb: ShardBounds, metric: str, rows: I64, fine: bool) -> F64:
    """Score upper bounds of ``rows`` for query ``i``: the cheap kind (``fine`` False) or the finer one."""
    if metric == "manhattan" and sb.blocks is not None and terms.blocks is not None:
        assert sb.coarse is not None and sb.abs_sums is not None
        assert terms.coarse is not None and terms.abs_sums is not None
        sq, sx = (terms.blocks[i], sb.blocks) if fine else (terms.coarse[i], sb.coarse)
        return _l1_bounds(sq, terms.abs_sums[i], sx, sb.abs_sums, rows, L1_SLACK)
    if not fine:
        return _cheap_code_bounds(terms, i, sb, metric, rows)
    return _z_bounds(_Z_CODE[metric], terms.z[i], terms.norms[i], sb.z, sb.norms, rows, Z_SLACK)


def _merge(best: tuple[I64, F64], rows: I64, sc: F64, k: int) -> tuple[I64, F64]:
    """The ``k`` best of both, by score then lower row (brute force's order)."""
    r, s = np.concatenate((best[0], rows)), np.concatenate((best[1], sc))
    keep = np.lexsort((r, -s))[:k]
    return r[keep], s[keep]


def _score_rows(q64: F64, signals: np.ndarray, rows: I64, metric: str) -> tuple[I64, F64]:
    rows = np.sort(rows)  # in file order: a memory map reads forward
    return rows, scores(q64, np.asarray(signals[rows]), metric)


def _float32_bounds(q: F64, qn: float, x: F32, xn: F32, metric: str) -> F64:
    """Upper bounds of the scores of rows ``x`` from float32 arithmetic (BLAS), made safe by the classic
    error bound of a float32 sum of ``d`` terms: ``|error| <= d u / (1 - d u) * sum |terms|`` with
    ``u = 2^-24``, whatever the order of summation, ``sum |x_j q_j| <= |x| |q|`` (with 4 u more for the
    rounding of the products and of the stored norms)."""
    d = x.shape[1]
    u = 2.0 ** -24
    g = 1.01 * d * u / (1 - d * u) + 4 * u
    if metric == "manhattan":  # a float32 sum of non-negative terms: relative error <= g
        l1 = np.abs(x - q.astype(np.float32)).sum(axis=1, dtype=np.float32).astype(np.float64)
        return 1.0 / (1.0 + l1 * (1 - g))
    x_norm = xn.astype(np.float64)
    slack = g * qn * x_norm
    dot = (x @ q.astype(np.float32)).astype(np.float64) + slack
    if metric == "dot":
        return dot
    if metric == "cosine":
        denom = qn * x_norm
        return np.where(denom > _TINY_DENOM, dot / np.maximum(denom, _TINY_DENOM), 2.0)
    d2 = (qn * qn + x_norm * x_norm) * (1 - 4 * u) - 2.0 * dot
    return 1.0 / (1.0 + np.sqrt(np.maximum(d2, 0.0)))


def _one_query(terms: QueryTerms, i: int, sb: ShardBounds, signals: np.ndarray, metric: str, k: int
               ) -> tuple[I64, F64, int]:
    """Exact top ``min(k, n)`` of one query in one shard, and how many raw signals were scored."""
    n = sb.size
    q64 = terms.q64[i]
    cheap = _bounds(terms, i, sb, metric, sb.all_rows, fine=False)
    seeds = sb.all_rows if n <= SEED else _top_rows(cheap, SEED)
    seed_bound = _bounds(terms, i, sb, metric, seeds, fine=True)
    first = seeds[np.argsort(-seed_bound, kind="stable")[:max(k, FIRST_CHUNK)]]
    best = _merge((np.zeros(0, np.int64), np.zeros(0)), *_score_rows(q64, signals, first, metric), k)
    scored = len(first)
    tau = best[1][-1] if len(best[1]) == k else -np.inf
    cheap[first] = np.nan  # scored already: NaN passes no comparison, not even >= -inf
    rest = np.flatnonzero(cheap >= tau)
    if 4 * len(rest) <= n or metric == "manhattan":  # else the bounds are loose here: float32 scores next
        bound = _bounds(terms, i, sb, metric, rest, fine=True)
        keep = bound >= tau
        rest, bound = rest[keep], bound[keep]
    else:
        bound = cheap[rest]
    if len(rest) > BULK:  # many left (the bounds are loose on this data): bound them in float32 at once,
        # in place over every row (one BLAS pass) where gathering them would copy more than a quarter of
        # the shard; L1 has no BLAS, so manhattan always gathers
        everything = 4 * len(rest) > n and metric != "manhattan"
        x = np.asarray(signals) if everything else np.asarray(signals)[rest]
        b32 = _float32_bounds(q64, float(terms.norms[i]), x, sb.norms if everything else sb.norms[rest], metric)
        bound = np.minimum(bound, b32[rest] if everything else b32)
        keep = bound >= tau
        rest, bound = rest[keep], bound[keep]
    order = np.argsort(-bound, kind="stable")
    rest, bound = rest[order], bound[order]
    pos, chunk = 0, FIRST_CHUNK
    while pos < len(rest) and bound[pos] >= tau:
        part = rest[pos:pos + chunk][bound[pos:pos + chunk] >= tau]
        best = _merge(best, *_score_rows(q64, signals, part, metric), k)
        scored += len(part)
        tau = best[1][-1] if len(best[1]) == k else -np.inf
        pos, chunk = pos + chunk, min(2 * chunk, MAX_CHUNK)
    return best[0], best[1], scored


def pruned_top_k(terms: QueryTerms, sb: ShardBounds, signals: np.ndarray, metric: str, k: int
                 ) -> tuple[I64, F64, I64]:
    """Exact top-k of every query of ``terms`` in one shard: local rows and float64 scores of shape
    (nq, min(k, n)), best first, and the raw signals each query scored (brute force: n)."""
    nq, kk = len(terms.q64), min(k, sb.size)
    rows, sc, scored = np.zeros((nq, kk), np.int64), np.zeros((nq, kk)), np.zeros(nq, np.int64)
    if kk == 0:
        return rows, sc, scored
    for i in range(nq):
        rows[i], sc[i], scored[i] = _one_query(terms, i, sb, signals, metric, kk)
    return rows, sc, scored


def brute_force_top_k(q: npt.ArrayLike, signals: np.ndarray, metric: str, k: int) -> tuple[I64, F64]:
    """The definition :func:`pruned_top_k` answers to: every signal scored (float64), best k by score, ties
    to the lower row. One query (shape (d,)); kept as the reference for tests and the bench."""
    s = scores(q, np.asarray(signals), metric)
    top = top_k(s, min(k, len(s)))
    return top, s[top]


__all__ = ["QueryTerms", "ShardBounds", "brute_force_top_k", "pruned_top_k"]
