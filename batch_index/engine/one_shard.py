"""An hkmeans query on one shard, from tree descent to its top k, in one compiled call.

At the shipped defaults a one-query hkmeans call spent ~0.3 ms unprofiled (~0.7 of ~2.0 under cProfile)
in the Python between its compiled stages (real record windows, docs/search_profile.md): the walk's
(nq, ef) output, then per stage an ``np.where`` per shard, ``argpartition`` / ``take_along_axis`` /
``sort`` for the pool and for the float32 survivors, a stable ``argsort`` of the float64 scores, and a
dispatch per kernel. On an index searched as one shard (the usual small index, or an executor's share)
every stage below runs in one kernel per call (measured 1.2-1.3x faster one query a call, batches on par):

1. the tree descent and graph walk (:func:`batch_index.engine.walk._walk`, the same compiled walk);
2. the pool: the ``pool`` walk results nearest in reference space, or for manhattan on an index with
   block sums, the ``pool`` of all it found with the lowest block-sum L1 bound (``block_sums``);
3. float32 scores of the pool on the raw rows, the best ``k + margin`` of them re-scored in float64
   (``rescore``'s kernels);
4. the top ``k`` by float64 score, ties to the lower row, as :meth:`SearchIndex._rerank`.

The answer must be the generic path's to the bit. Sets chosen by score are the same whatever the
selection algorithm *unless* two candidates tie exactly where a set is cut (``argpartition`` then
keeps either); such a query, one whose walk found fewer than ``k``, and any the caller marks ``skip``
come back with ``ok`` False, for the caller to answer on the generic path.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from batch_index.engine.rescore import _approx_many, _exact_many
from batch_index.engine.tree import descend
from batch_index.engine.walk import _query_terms, _walk


@njit(cache=True, nogil=True)
def answer_one_shard(child_start, child_count, leaf_start, leaf_count, order, vectors, row_of_node, n_probe, beam,
                     codes, code_sq_norms, base, step, neighbors, space_queries, ef, stamps, mark, space_offset,
                     pool, by_blocks, l1, query_sums, l1_code, signals, signal_sq_norms, queries, code, k, margin,
                     skip):  # type: ignore[no-untyped-def]
    """Top ``k`` local rows and float64 scores of each query, and whether each was answered here.

    The first nine arguments are :meth:`batch_index.engine.tree.KMeansTree.descent`'s; ``codes`` ..
    ``neighbors``: the shard's ``ScalarCodes`` and graph; ``space_queries`` (nq, r'): the queries in
    reference space; ``stamps``, ``mark``: visit marks (``mark + i`` for query ``i``); ``space_offset``:
    the shard's distance offset (``_Shard.space_offset``); ``pool``: candidates kept for the raw
    re-rank; ``by_blocks``: choose them by the block sums ``l1`` (n, b) against ``query_sums`` (nq, b)
    (else both are ignored), ``l1_code`` being manhattan's ``rescore.METRIC_CODE``; ``signals`` (n, d)
    and their ``signal_sq_norms``; ``queries`` (nq, d) float32; ``code``: the metric's
    ``rescore.METRIC_CODE``; ``skip`` (nq,): queries left to the caller.

    The raw re-rank calls ``rescore``'s kernels themselves, on one-row C-contiguous arrays: the same
    compiled code as the generic path runs, so the same float bits (a copy of their loops inlined here
    vectorised differently and moved the float64 scores' last bits).

    Returns (rows (nq, k) int64, scores (nq, k) float64, ok (nq,) bool); rows of a query not ok are -1.
    """
    nq = queries.shape[0]
    out_i = np.full((nq, k), -1, np.int64)
    out_s = np.full((nq, k), -np.inf, np.float64)
    alive = ~skip
    # stage by stage over every query, as the generic path goes, so that a batch's walks share the codes and
    # the graph in cache (one query's walk and re-rank, then the next's, measured slower for batches of 16
    # in runs under load: manhattan 1.0-1.45 against 1.0-1.15 ms a query)
    found = np.full((nq, ef), -1, np.int64)
    dist = np.full((nq, ef), np.inf, np.float32)
    n_found = np.zeros(nq, np.int64)
    for i in range(nq):
        if alive[i]:
            aq = space_queries[i]
            seeds = descend(child_start, child_count, leaf_start, leaf_count, order, vectors, row_of_node, n_probe,
                            beam, aq).astype(np.int64)
            q_base, qq = _query_terms(base, aq)
            ids, d = _walk(codes, code_sq_norms, neighbors, (step * aq).astype(np.float32), q_base, qq, seeds, ef,
                           stamps, mark + i)
            n_found[i] = ids.shape[0]
            found[i, :ids.shape[0]] = ids
            dist[i, :ids.shape[0]] = d
    pools = np.full((nq, pool), -1, np.int64)
    n_pool = np.zeros(nq, np.int64)
    sums = np.empty((1, query_sums.shape[1]), np.float32)
    offset = np.float32(space_offset)
    for i in range(nq):
        if alive[i]:
            rows = found[i, :n_found[i]].copy()
            if by_blocks:  # every row found, ordered by the L1 bound (a lower bound: smaller = nearer)
                sums[0] = query_sums[i]
                key = -_approx_many(l1, rows.reshape(1, -1), sums, signal_sq_norms, l1_code)[0]
            else:  # as the generic path ranks walks of several shards: less the shard's offset, in float32
                key = dist[i, :n_found[i]] - offset
            chosen, tie = _least(key, pool)
            alive[i] = not tie
            n_pool[i] = chosen.shape[0]
            pools[i, :chosen.shape[0]] = np.sort(rows[chosen])
    best = np.full((nq, k + margin), -1, np.int64)
    n_best = np.zeros(nq, np.int64)
    q32 = np.empty((1, queries.shape[1]), np.float32)
    for i in range(nq):
        if alive[i]:
            rows = pools[i, :n_pool[i]].copy().reshape(1, -1)
            q32[0] = queries[i]
            approx = _approx_many(signals, rows, q32, signal_sq_norms, code)[0]
            chosen, tie = _least(-approx, k + margin)
            alive[i] = not tie and chosen.shape[0] >= k
            n_best[i] = chosen.shape[0]
            best[i, :chosen.shape[0]] = np.sort(rows[0][chosen])
    q64 = np.empty((1, queries.shape[1]), np.float64)
    for i in range(nq):
        if alive[i]:
            rows = best[i, :n_best[i]].copy().reshape(1, -1)
            for j in range(queries.shape[1]):
                q64[0, j] = np.float64(queries[i, j])
            exact = _exact_many(signals, rows, q64, code)[0]
            top = np.argsort(-exact, kind="mergesort")[:k]  # stable: equal scores keep row order
            out_i[i] = rows[0][top]
            out_s[i] = exact[top]
    return out_i, out_s, alive


@njit(cache=True, nogil=True, inline="always")
def _least(key, keep):  # type: ignore[no-untyped-def]
    """Positions of the ``keep`` lowest of ``key`` (all of them when there are no more), and whether the
    cut falls between two equal values (which the generic path's ``argpartition`` may break either way)."""
    if key.shape[0] <= keep:
        return np.arange(key.shape[0]), False
    order = np.argsort(key)
    return order[:keep], key[order[keep - 1]] == key[order[keep]]
