"""Re-ranking candidates on the raw signals, read straight from the memory map by compiled kernels.

Re-ranking 256 candidates of 2,500 samples reads 2.5 MB a query. Gathering them into a new array
first (numpy fancy indexing on the memory map) and then running BLAS wrote that 2.5 MB again and was
the largest cost of an hkmeans query once the walk was compiled (~0.6 of ~2 ms at 10^5). Here each
row is scored where it lies, the next rows prefetched meanwhile: float32 scores for every candidate
(:func:`approx_scores`), then float64 scores for the survivors (:func:`exact_scores`), computed like
:func:`batch_index.engine.metrics.scores` (cosine and euclidean on the raw values and differences, not from
stored norms) so the answer is exact mode's. The float64 pass was numpy before: converting the
survivors to float64 and norming them held the GIL for ~0.2 ms a query, a sixth of a cosine query.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
from numba import njit

from batch_index.engine.metrics import _EPS  # a zero norm scores 0 in exact mode too
from batch_index.engine.prefetch import prefetch_span

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_AHEAD = 2   # rows prefetched ahead of the one being scored
COSINE, EUCLIDEAN, MANHATTAN, DOT = 0, 1, 2, 3
METRIC_CODE: Final[dict[str, int]] = {"cosine": COSINE, "euclidean": EUCLIDEAN, "manhattan": MANHATTAN, "dot": DOT}


def approx_scores(queries: F32, signals: np.ndarray, rows: I64, sq_norms: F32, metric: str) -> F32:
    """float32 scores (higher = more similar, up to float32 rounding) of ``signals[rows[i]]`` to ``queries[i]``.

    ``rows`` has shape (nq, r), -1 where there is no row (scored ``-inf``); ``sq_norms`` are the squared
    norms of all of ``signals`` (used by cosine and euclidean); ``signals`` may be a memory map. The order
    is the metric's (euclidean: ``-|q - x|^2``; manhattan: ``-|q - x|_1``).
    """
    return _approx_many(np.asarray(signals), np.ascontiguousarray(rows, dtype=np.int64),
                        np.ascontiguousarray(queries, dtype=np.float32), sq_norms, METRIC_CODE[metric])


def exact_scores(queries: np.ndarray, signals: np.ndarray, rows: I64, metric: str) -> F64:
    """float64 scores of ``signals[rows[i]]`` to ``queries[i]`` (:func:`batch_index.engine.metrics.scores` on
    those rows); ``-inf`` where a row is -1."""
    return _exact_many(np.asarray(signals), np.ascontiguousarray(rows, dtype=np.int64),
                       np.ascontiguousarray(queries, dtype=np.float64), METRIC_CODE[metric])


@njit(cache=True, nogil=True, fastmath=True)
def _approx_many(x, rows, queries, sq_norms, code):  # type: ignore[no-untyped-def]
    out = np.full(rows.shape, -np.inf, np.float32)
    for i in range(rows.shape[0]):
        q = queries[i]
        real = rows[i][rows[i] >= 0]
        s = _row_scores(x, real, q, code == MANHATTAN)
        if code == COSINE or code == EUCLIDEAN:
            qq = np.float32(0.0)
            for j in range(q.shape[0]):
                qq += q[j] * q[j]
            for k in range(real.shape[0]):
                xx = sq_norms[real[k]]
                if code == COSINE:
                    s[k] = s[k] / max(np.sqrt(xx * qq), np.float32(_EPS))
                else:
                    s[k] = np.float32(2.0) * s[k] - xx - qq
        elif code == MANHATTAN:
            s = -s
        m = 0
        for k in range(rows.shape[1]):
            if rows[i, k] >= 0:
                out[i, k] = s[m]
                m += 1
    return out


@njit(cache=True, nogil=True, fastmath=True)
def _exact_many(x, rows, queries, code):  # type: ignore[no-untyped-def]
    """float64 per row, summed in any order (fastmath): differs from numpy's only in the last bits."""
    d = x.shape[1]
    flat = x.reshape(-1)
    out = np.full(rows.shape, -np.inf, np.float64)
    for i in range(rows.shape[0]):
        q = queries[i]
        qq = 0.0
        if code == COSINE:
            for j in range(d):
                qq += q[j] * q[j]
        real = rows[i][rows[i] >= 0]
        for k in range(min(_AHEAD, real.shape[0])):
            prefetch_span(flat, real[k] * d, d)
        m = 0
        for k in range(rows.shape[1]):
            r = rows[i, k]
            if r < 0:
                continue
            if m + _AHEAD < real.shape[0]:
                prefetch_span(flat, real[m + _AHEAD] * d, d)
            m += 1
            s = 0.0
            if code == DOT:
                for j in range(d):
                    s += np.float64(x[r, j]) * q[j]
                out[i, k] = s
            elif code == COSINE:
                xx = 0.0
                for j in range(d):
                    v = np.float64(x[r, j])
                    s += v * q[j]
                    xx += v * v
                denom = np.sqrt(qq) * np.sqrt(xx)
                out[i, k] = s / denom if denom > _EPS else 0.0
            elif code == EUCLIDEAN:
                for j in range(d):
                    t = np.float64(x[r, j]) - q[j]
                    s += t * t
                out[i, k] = 1.0 / (1.0 + np.sqrt(s))
            else:
                for j in range(d):
                    s += abs(np.float64(x[r, j]) - q[j])
                out[i, k] = 1.0 / (1.0 + s)
    return out


@njit(cache=True, nogil=True, fastmath=True)
def _row_scores(x, rows, q, l1):  # type: ignore[no-untyped-def]
    """Per row of ``x[rows]``: its dot product with ``q``, or with ``l1`` its L1 distance to ``q``."""
    d = x.shape[1]
    flat = x.reshape(-1)
    out = np.empty(rows.shape[0], np.float32)
    for k in range(min(_AHEAD, rows.shape[0])):
        prefetch_span(flat, rows[k] * d, d)
    for k in range(rows.shape[0]):
        if k + _AHEAD < rows.shape[0]:
            prefetch_span(flat, rows[k + _AHEAD] * d, d)
        r = rows[k]
        s = np.float32(0.0)
        if l1:
            for j in range(d):
                s += abs(x[r, j] - q[j])
        else:
            for j in range(d):
                s += x[r, j] * q[j]
        out[k] = s
    return out
