"""The peers a practitioner would pick for 2,500-dim vectors, as ready-to-time configurations.

- FAISS composites that do what hkmeans does (reduce, walk or probe, re-rank exactly):
  ``PCA{128,256},HNSW32,RFlat`` (efSearch x k_factor) and ``PCA256,IVF{4 sqrt n},SQ8,RFlat``
  (nprobe x k_factor). The PCA is fitted with a randomized SVD of a sample (scikit-learn) and handed to
  FAISS as its ``LinearTransform``: FAISS's own ``PCAMatrix`` training, a dense 2,500 x 2,500
  eigendecomposition, took minutes on this 2-core host; the search path is FAISS's either way. Caveat
  (measured): on 10^5 synthetic windows these composites topped out at recall 0.906 for cosine, where
  the issue measured >= 0.95 with FAISS's exact PCA; a randomized SVD captures less of a flat
  spectrum, so the peers may be understated until this is replaced by an exact PCA.
- ScaNN (tree of ``round(sqrt n)`` leaves, anisotropic hashing, exact re-ordering), usearch and hnswlib
  (HNSW over the raw vectors).

Cosine: rows L2-normalised, then L2 (the PCA composites; rank-equivalent on unit vectors) or inner
product (ScaNN, usearch, hnswlib use their cosine / inner-product kernels). Dot: inner product
(ScaNN ``dot_product``, usearch ``ip``, hnswlib ``ip``); the PCA composites are not built for dot
(PCA centres the data, which changes inner products). Manhattan: no peer here has L1 except FAISS's
flat, IVF-flat and HNSW-flat with ``METRIC_L1`` (``bench.systems.faiss_systems``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bench.measure import F32, SearchFn, _faiss, thread_cap
from bench.systems import PEERS, Config, _normalise

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerSweep:
    pca_dims: tuple[int, ...] = (128, 256)
    hnsw_ef: tuple[int, ...] = (16, 32, 64, 128)
    k_factor: tuple[int, ...] = (2, 4, 8)
    ivf_nprobe: tuple[int, ...] = (8, 16, 32, 64)
    scann_leaves: tuple[int, ...] = (4, 8, 16, 32)
    scann_reorder: tuple[int, ...] = (50, 100, 200)
    graph_ef: tuple[int, ...] = (16, 32, 64, 128, 256)  # usearch / hnswlib ef
    graph_m: int = 16
    ef_construction: int = 128
    train_sample: int = 20_000


def _pca(x: F32, dims: int, sample: int, seed: int) -> tuple[F32, F32]:
    """(mean, components of shape (dims, d)) by a randomized SVD of a centred sample."""
    from sklearn.utils.extmath import randomized_svd

    rng = np.random.default_rng(seed)
    s = x[np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))].astype(np.float32)
    mean = s.mean(axis=0)
    _, _, vt = randomized_svd(s - mean, n_components=min(dims, *s.shape), n_iter=4, random_state=seed)
    return mean.astype(np.float32), vt.astype(np.float32)


def _refine(faiss, k_factor: int, inner):  # type: ignore[no-untyped-def]
    """Search parameters of ``IndexRefineFlat(IndexPreTransform(..., inner index))``."""
    return faiss.IndexRefineSearchParameters(
        k_factor=k_factor, base_index_params=faiss.SearchParametersPreTransform(index_params=inner))


def faiss_composites(x: F32, metric: str, k: int, sweep: PeerSweep, seed: int = 0) -> list[Config]:
    faiss = _faiss()
    if faiss is None or metric not in ("cosine", "euclidean"):
        return []
    prep: Callable[[F32], F32] = _normalise if metric == "cosine" else np.ascontiguousarray
    xb = prep(x)
    n, d = xb.shape
    out: list[Config] = []

    def transform(mean: F32, comps: F32):  # y = A x + b with A = comps, b = -A mean
        lt = faiss.LinearTransform(d, comps.shape[0], True)
        faiss.copy_array_to_vector(np.ascontiguousarray(comps).ravel(), lt.A)
        faiss.copy_array_to_vector((-(comps @ mean)).astype(np.float32), lt.b)
        lt.is_trained = True
        return lt

    def size_mb(index) -> tuple[float, float]:
        total = faiss.serialize_index(index).nbytes
        return (total - xb.nbytes) / 1e6, total / 1e6

    def fn(index, params) -> SearchFn:
        return lambda q: index.search(prep(q), k, params=params)[1]

    train = xb[np.sort(np.random.default_rng(seed).choice(n, size=min(n, sweep.train_sample), replace=False))]
    pcas = {}
    for dims in sorted(set(sweep.pca_dims) | {256}):
        t0 = time.perf_counter()
        pcas[dims] = (*_pca(xb, dims, sweep.train_sample, seed), time.perf_counter() - t0)
    for dims in sweep.pca_dims:
        mean, comps, pca_s = pcas[dims]
        t0 = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(comps.shape[0], 32, faiss.METRIC_L2)
        hnsw.hnsw.efConstruction = sweep.ef_construction
        index = faiss.IndexRefineFlat(faiss.IndexPreTransform(transform(mean, comps), hnsw))
        index.add(xb)
        build = pca_s + time.perf_counter() - t0
        name = f"PCA{comps.shape[0]},HNSW32,RFlat"
        out += [Config("faiss-pca-hnsw", f"{name},efSearch={e},k_factor={f}",
                       fn(index, _refine(faiss, f, faiss.SearchParametersHNSW(efSearch=e))), build, *size_mb(index))
                for e in sweep.hnsw_ef for f in sweep.k_factor]
        logger.info("faiss %s %s built in %.1f s", name, metric, build)
    mean, comps, pca_s = pcas[256]
    nlist = max(1, round(4 * math.sqrt(n)))
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatL2(comps.shape[0])
    ivf = faiss.IndexIVFScalarQuantizer(quantizer, comps.shape[0], nlist, faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_L2)
    ivf.cp.seed = seed
    pre = faiss.IndexPreTransform(transform(mean, comps), ivf)
    pre.train(train)
    index = faiss.IndexRefineFlat(pre)
    index.add(xb)
    build = pca_s + time.perf_counter() - t0
    name = f"PCA{comps.shape[0]},IVF{nlist},SQ8,RFlat"
    out += [Config("faiss-pca-ivf-sq8", f"{name},nprobe={p},k_factor={f}",
                   fn(index, _refine(faiss, f, faiss.SearchParametersIVF(nprobe=p))), build, *size_mb(index))
            for p in sweep.ivf_nprobe if p <= nlist for f in sweep.k_factor]
    logger.info("faiss %s %s built in %.1f s", name, metric, build)
    return out


def scann_systems(x: F32, metric: str, k: int, sweep: PeerSweep, seed: int = 0) -> list[Config]:
    try:
        import scann
    except ImportError:
        logger.warning("scann is not installed (pip install scann): skipped")
        return []
    if metric == "manhattan":
        return []
    prep: Callable[[F32], F32] = _normalise if metric == "cosine" else np.ascontiguousarray
    xb = prep(x)
    n = len(xb)
    leaves = max(2, round(math.sqrt(n)))
    t0 = time.perf_counter()
    builder = scann.scann_ops_pybind.builder(xb, k, "squared_l2" if metric == "euclidean" else "dot_product")
    builder = builder.tree(num_leaves=leaves, num_leaves_to_search=min(leaves, 16),
                           training_sample_size=min(n, sweep.train_sample))
    builder = (builder.score_ah(2) if metric == "euclidean"
               else builder.score_ah(2, anisotropic_quantization_threshold=0.2))
    searcher = builder.reorder(max(sweep.scann_reorder)).build()
    build = time.perf_counter() - t0

    def fn(leaves_to_search: int, reorder: int) -> SearchFn:
        def search(q: F32) -> np.ndarray:
            call = searcher.search_batched_parallel if thread_cap() > 1 and len(q) > 1 else searcher.search_batched
            return call(prep(q), final_num_neighbors=k, leaves_to_search=leaves_to_search,
                        pre_reorder_num_neighbors=reorder)[0].astype(np.int64)
        return search

    logger.info("scann %s (%d leaves) built in %.1f s", metric, leaves, build)
    return [Config("scann", f"leaves={leaves},search={s},AH,reorder={r}", fn(s, r), build, 0.0, xb.nbytes / 1e6)
            for s in sweep.scann_leaves if s <= leaves for r in sweep.scann_reorder if r >= k]


def usearch_systems(x: F32, metric: str, k: int, sweep: PeerSweep) -> list[Config]:
    try:
        from usearch.index import Index
    except ImportError:
        logger.warning("usearch is not installed (pip install usearch): skipped")
        return []
    kind = {"cosine": "cos", "euclidean": "l2sq", "dot": "ip"}.get(metric)
    if kind is None:
        return []
    t0 = time.perf_counter()
    index = Index(ndim=x.shape[1], metric=kind, dtype="f32", connectivity=sweep.graph_m,
                  expansion_add=sweep.ef_construction)
    index.add(np.arange(len(x)), np.ascontiguousarray(x), threads=2)
    build = time.perf_counter() - t0

    def fn(ef: int) -> SearchFn:
        def search(q: F32) -> np.ndarray:
            index.expansion_search = ef
            return np.atleast_2d(index.search(np.ascontiguousarray(q), k, threads=thread_cap()).keys).astype(np.int64)
        return search

    logger.info("usearch %s built in %.1f s", metric, build)
    return [Config("usearch", f"M={sweep.graph_m},ef={e}", fn(e), build, 0.0, index.memory_usage / 1e6)
            for e in sweep.graph_ef if e >= k]


def hnswlib_systems(x: F32, metric: str, k: int, sweep: PeerSweep, seed: int = 0) -> list[Config]:
    try:
        import hnswlib
    except ImportError:
        logger.warning("hnswlib is not installed (pip install hnswlib): skipped")
        return []
    space = {"cosine": "cosine", "euclidean": "l2", "dot": "ip"}.get(metric)
    if space is None:
        return []
    t0 = time.perf_counter()
    index = hnswlib.Index(space=space, dim=x.shape[1])
    index.init_index(max_elements=len(x), ef_construction=sweep.ef_construction, M=sweep.graph_m, random_seed=seed)
    index.add_items(x, num_threads=2)
    build = time.perf_counter() - t0

    def fn(ef: int) -> SearchFn:
        def search(q: F32) -> np.ndarray:
            index.set_ef(ef)
            return index.knn_query(q, k, num_threads=thread_cap())[0].astype(np.int64)
        return search

    logger.info("hnswlib %s built in %.1f s", metric, build)
    return [Config("hnswlib", f"M={sweep.graph_m},ef={e}", fn(e), build, 0.0, x.nbytes / 1e6)
            for e in sweep.graph_ef if e >= k]


def peer_systems(x: F32, metric: str, k: int, sweep: PeerSweep, peers: tuple[str, ...] = PEERS,
                 seed: int = 0) -> list[Config]:
    out: list[Config] = []
    if "faiss-pca-hnsw" in peers or "faiss-pca-ivf-sq8" in peers:
        out += [c for c in faiss_composites(x, metric, k, sweep, seed) if c.system in peers]
    if "scann" in peers:
        out += scann_systems(x, metric, k, sweep, seed)
    if "usearch" in peers:
        out += usearch_systems(x, metric, k, sweep)
    if "hnswlib" in peers:
        out += hnswlib_systems(x, metric, k, sweep, seed)
    return out


__all__ = ["PEERS", "PeerSweep", "peer_systems"]
