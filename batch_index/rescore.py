"""Re-ranking candidates on the raw signals, read straight from the memory map by a compiled kernel.

Re-ranking 256 candidates of 2,500 samples reads 2.5 MB a query. Gathering them into a new array
first (numpy fancy indexing on the memory map) and then running BLAS wrote that 2.5 MB again and was
the largest cost of an hkmeans query once the walk was compiled (~0.6 of ~2 ms at 10^5). Here each
row is scored where it lies, the next rows prefetched meanwhile; the caller re-scores the survivors in
float64 exactly as :func:`batch_index.metrics.top_k_exact` does, so the answer is the same.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit

from batch_index.prefetch import prefetch_span

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

_AHEAD = 2   # rows prefetched ahead of the one being scored


def approx_scores(query: F32, signals: np.ndarray, rows: I64, sq_norms: F32, metric: str) -> F32:
    """float32 scores (higher = more similar, up to float32 rounding) of ``signals[rows]`` to ``query``.

    ``sq_norms`` are the squared norms of all of ``signals`` (used by cosine and euclidean);
    ``signals`` may be a memory map.
    """
    x = np.asarray(signals)  # a plain view of the map: numba takes ndarrays, not np.memmap
    q = np.ascontiguousarray(query, dtype=np.float32)
    r = np.ascontiguousarray(rows, dtype=np.int64)
    if metric == "manhattan":
        return -_row_scores(x, r, q, True)
    dots = _row_scores(x, r, q, False)
    if metric == "dot":
        return dots
    qq = np.float32(q @ q)
    if metric == "cosine":
        return dots / np.maximum(np.sqrt(sq_norms[r] * qq), np.float32(1e-12))
    return 2.0 * dots - sq_norms[r] - qq  # = -|q - x|^2


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
