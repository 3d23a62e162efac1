"""The graph walk of an hkmeans search, compiled (numba) over 8-bit codes of the reference coordinates.

A walk scores a few thousand points it reaches in an order no cache predicts: each one is a DRAM miss,
and that, not arithmetic, was the walk's cost (measured: ~200 ns per float32 row of 385 coordinates,
~1.8 ms per cosine query at 10^5 in numpy). Two things cut scoring a row to ~45-55 ns (the whole
walk, heaps and visit marks included, to ~0.65 ms for its ~3,900 points):

- the walk reads 8-bit codes (per-coordinate affine scalar quantisation, as FAISS's SQ8), 385 bytes
  a point instead of 1,540: six cache lines, not twenty-four;
- once a node's unvisited neighbours are known, their rows are prefetched a few ahead of the one
  being scored, so the misses overlap instead of queueing (hnswlib does the same).

The walk only chooses candidates: the caller re-ranks them exactly on the raw signals, so the codes'
rounding moves which points reach the pool, never a returned score.

The search itself is HNSW's bottom-layer best-first search: a min-heap of points to expand, a max-heap
of the ``ef`` nearest found, stop when the nearest unexpanded point is farther than the ``ef``-th.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

from batch_index.engine.prefetch import prefetch_span
from batch_index.engine.tree import descend

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

PREFETCH_AHEAD = 8  # rows requested ahead of the one being scored (2-8 alike within noise; all at once: slower)


@dataclass(frozen=True)
class ScalarCodes:
    """8-bit codes of points: ``x ~= base + codes * step`` coordinate by coordinate.

    Attributes
    ----------
    codes : array of shape (n, d), int8
    base, step : arrays of shape (d,), float32
    sq_norms : array of shape (n,), float32: squared norms of the decoded points, so a walk distance is
        the exact squared distance to the decoded point
    """

    codes: npt.NDArray[np.int8]
    base: F32
    step: F32
    sq_norms: F32

    @classmethod
    def encode(cls, points: F32, block: int = 16384) -> ScalarCodes:
        """Codes spanning each coordinate's [min, max] in 256 levels (no clipping: outliers stay outliers)."""
        empty = np.zeros(points.shape[1], dtype=np.float32)  # an empty shard: any codebook will do
        lo = points.min(axis=0) if len(points) else empty
        hi = points.max(axis=0) if len(points) else empty
        step = np.where(hi > lo, (hi - lo) / np.float32(255.0), np.float32(1.0)).astype(np.float32)
        base = (lo + np.float32(128.0) * step).astype(np.float32)
        codes = np.empty(points.shape, dtype=np.int8)
        sq = np.empty(points.shape[0], dtype=np.float32)
        for s in range(0, points.shape[0], block):
            c = np.subtract(points[s:s + block], base, dtype=np.float32)
            c /= step
            np.rint(c, out=c)
            np.clip(c, -128, 127, out=c)
            codes[s:s + block] = c
            c *= step
            c += base
            sq[s:s + block] = np.einsum("ij,ij->i", c, c)
        return cls(codes=codes, base=base, step=step, sq_norms=sq)

    def decode(self, rows: npt.ArrayLike) -> F32:
        return (self.base + self.codes[np.asarray(rows)].astype(np.float32) * self.step).astype(np.float32)


class VisitStamps:
    """A per-shard, per-thread "visited" array that needs no clearing between walks.

    Each walk gets a new mark; a point counts as visited when its stamp equals the walk's mark.
    Clearing a bitmap of the shard's size per walk would cost more than the walk at large shards.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.stamps = np.zeros(size, dtype=np.int32)
        self._mark = 0

    def next_mark(self) -> int:
        return self.reserve(1)

    def reserve(self, n: int) -> int:
        """The first of ``n`` fresh marks (``mark .. mark + n - 1``), one per walk."""
        if self._mark + n >= np.iinfo(np.int32).max:
            self.stamps[:] = 0
            self._mark = 0
        first = self._mark + 1
        self._mark += n
        return first


def walk(codes: ScalarCodes, neighbors: npt.NDArray[np.int32], query: F32, seeds: npt.ArrayLike, ef: int,
         visits: VisitStamps) -> tuple[I64, F32]:
    """The ``ef`` nearest points a best-first walk from ``seeds`` finds: local ids and squared distances.

    Distances are to the decoded points, ``|x|^2 - 2 <x, q> + |q|^2``; ``neighbors`` is (n, m), -1 padded.
    """
    q = np.asarray(query, dtype=np.float32)
    q_step = (codes.step * q).astype(np.float32)
    q_base = float(codes.base.astype(np.float64) @ q.astype(np.float64))
    qq = float(q.astype(np.float64) @ q.astype(np.float64))
    return _walk(codes.codes, codes.sq_norms, neighbors, q_step, np.float32(q_base), np.float32(qq),
                 np.ascontiguousarray(seeds, dtype=np.int64), int(ef), visits.stamps, visits.next_mark())


def walk_many(codes: ScalarCodes, neighbors: npt.NDArray[np.int32], queries: F32, descent: tuple[Any, ...], ef: int,
              visits: VisitStamps) -> tuple[I64, F32]:
    """:func:`walk` for each row of ``queries``, seeded by the tree descent ``descent``
    (:meth:`batch_index.engine.tree.KMeansTree.descent`), in one compiled call.

    Returns arrays of shape (nq, ef): local ids (-1 where a walk found fewer) and squared distances
    (inf there). One call per slice of queries, not per query: the Python between the per-query kernels
    held the GIL for ~0.3 ms a query, which kept threads from scaling.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    return _walk_many(*descent, codes.codes, codes.sq_norms, codes.base, codes.step, neighbors, q, int(ef),
                      visits.stamps, visits.reserve(len(q)))


@njit(cache=True, nogil=True)
def _query_terms(base, q):  # type: ignore[no-untyped-def]
    """<base, q> and |q|^2 in float64, summed in order (as :func:`walk`'s numpy does)."""
    qb = 0.0
    qq = 0.0
    for j in range(q.shape[0]):
        qb += np.float64(base[j]) * np.float64(q[j])
        qq += np.float64(q[j]) * np.float64(q[j])
    return np.float32(qb), np.float32(qq)


@njit(cache=True, nogil=True)
def _walk_many(child_start, child_count, leaf_start, leaf_count, order, vectors, row_of_node, n_probe, beam,
               codes, sq_norms, base, step, neighbors, queries, ef, stamps, mark):  # type: ignore[no-untyped-def]
    nq = queries.shape[0]
    out_i = np.full((nq, ef), -1, np.int64)
    out_d = np.full((nq, ef), np.inf, np.float32)
    for i in range(nq):
        q = queries[i]
        seeds = descend(child_start, child_count, leaf_start, leaf_count, order, vectors, row_of_node, n_probe, beam,
                        q).astype(np.int64)
        q_base, qq = _query_terms(base, q)
        ids, d = _walk(codes, sq_norms, neighbors, (step * q).astype(np.float32), q_base, qq, seeds, ef, stamps,
                       mark + i)
        out_i[i, :ids.shape[0]] = ids
        out_d[i, :ids.shape[0]] = d
    return out_i, out_d


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _distance(codes, sq_norms, q_step, q_base, qq, row):  # type: ignore[no-untyped-def]
    s = np.float32(0.0)
    for j in range(codes.shape[1]):
        s += np.float32(codes[row, j]) * q_step[j]
    return sq_norms[row] - np.float32(2.0) * (s + q_base) + qq


@njit(cache=True, nogil=True, inline="always")
def _push(hd, hi, n, d, i, sign):  # type: ignore[no-untyped-def]
    """Binary heap on ``sign * d`` (1: min-heap, -1: max-heap) in arrays; returns the new size."""
    pos = n
    hd[pos] = d
    hi[pos] = i
    while pos > 0:
        parent = (pos - 1) >> 1
        if sign * hd[parent] <= sign * hd[pos]:
            break
        hd[parent], hd[pos] = hd[pos], hd[parent]
        hi[parent], hi[pos] = hi[pos], hi[parent]
        pos = parent
    return n + 1


@njit(cache=True, nogil=True, inline="always")
def _pop(hd, hi, n, sign):  # type: ignore[no-untyped-def]
    """Remove the root; returns the new size."""
    n -= 1
    hd[0] = hd[n]
    hi[0] = hi[n]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= n:
            break
        if child + 1 < n and sign * hd[child + 1] < sign * hd[child]:
            child += 1
        if sign * hd[pos] <= sign * hd[child]:
            break
        hd[child], hd[pos] = hd[pos], hd[child]
        hi[child], hi[pos] = hi[pos], hi[child]
        pos = child
    return n


@njit(cache=True, nogil=True, fastmath=True)
def _score_batch(codes, flat, sq_norms, q_step, q_base, qq, batch, m, ef,  # type: ignore[no-untyped-def]
                 cd, ci, nc, rd, ri, nr):
    """Score ``batch[:m]`` (unvisited rows), prefetching ahead; push those that beat the ``ef``-th."""
    width = codes.shape[1]
    for k in range(min(m, PREFETCH_AHEAD)):
        prefetch_span(flat, batch[k] * width, width)
    for k in range(m):
        if k + PREFETCH_AHEAD < m:
            prefetch_span(flat, batch[k + PREFETCH_AHEAD] * width, width)
        v = batch[k]
        d = _distance(codes, sq_norms, q_step, q_base, qq, v)
        if nr < ef or d < rd[0]:
            if nc == cd.shape[0]:
                cd = np.concatenate((cd, np.empty_like(cd)))
                ci = np.concatenate((ci, np.empty_like(ci)))
            nc = _push(cd, ci, nc, d, v, np.float32(1.0))
            nr = _push(rd, ri, nr, d, v, np.float32(-1.0))
            if nr > ef:
                nr = _pop(rd, ri, nr, np.float32(-1.0))
    return cd, ci, nc, nr


@njit(cache=True, nogil=True, fastmath=True)
def _walk(codes, sq_norms, neighbors, q_step, q_base, qq, seeds, ef, stamps, mark):  # type: ignore[no-untyped-def]
    flat = codes.reshape(-1)
    cd = np.empty(max(64, 2 * ef), np.float32)  # candidates to expand (min-heap), grown when full
    ci = np.empty(cd.shape[0], np.int64)
    rd = np.empty(ef + 1, np.float32)  # the ef nearest found (max-heap)
    ri = np.empty(ef + 1, np.int64)
    nc = 0
    nr = 0
    batch = np.empty(max(seeds.shape[0], neighbors.shape[1]), np.int64)
    m = 0
    for s in seeds:
        if stamps[s] != mark:
            stamps[s] = mark
            batch[m] = s
            m += 1
    cd, ci, nc, nr = _score_batch(codes, flat, sq_norms, q_step, q_base, qq, batch, m, ef, cd, ci, nc, rd, ri, nr)
    while nc > 0:
        if nr >= ef and cd[0] > rd[0]:
            break
        c = ci[0]
        nc = _pop(cd, ci, nc, np.float32(1.0))
        m = 0
        for t in range(neighbors.shape[1]):
            v = neighbors[c, t]
            if v >= 0 and stamps[v] != mark:
                stamps[v] = mark
                batch[m] = v
                m += 1
        cd, ci, nc, nr = _score_batch(codes, flat, sq_norms, q_step, q_base, qq, batch, m, ef, cd, ci, nc, rd, ri,
                                      nr)
    return ri[:nr].copy(), rd[:nr].copy()
