"""The systems compared, each as ready-to-time configurations: ``search(q (nq, d)) -> rows (nq, k)``.

Ours (``exact``, ``transform``, ``hkmeans``) share one index built for all four metrics; FAISS
(``faiss-flat``, ``faiss-ivf``, ``faiss-hnsw``) and ``numpy`` brute force are built per metric:

- cosine: rows L2-normalised, inner product (FAISS's own recipe for cosine)
- euclidean: L2
- manhattan: ``METRIC_L1``, which FAISS supports for flat, IVF-flat and HNSW-flat (IVF trains its
  coarse k-means in L2 and assigns lists by L1)
- dot: inner product

``hkmeans-default`` is ``SearchParams.for_metric(metric)``, the defaults the library ships.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from batch_index.engine.transform import SPACE_OF_METRIC
from batch_index.search import SearchIndex, SearchParams
from bench.measure import F32, SearchFn, _faiss, thread_cap

logger = logging.getLogger(__name__)

OURS = ("exact", "transform", "hkmeans", "hkmeans-default")
FAISS = ("faiss-flat", "faiss-ivf", "faiss-hnsw")
PEERS = ("faiss-pca-hnsw", "faiss-pca-ivf-sq8", "scann", "usearch", "hnswlib")  # built in bench.peers
SYSTEMS = (*OURS, "numpy", *FAISS, *PEERS)
FAISS_METRIC = {"cosine": "inner product on normalised rows", "euclidean": "L2", "manhattan": "L1",
                "dot": "inner product"}


@dataclass(frozen=True)
class Sweep:
    """Parameters swept per system (every value is one configuration)."""

    ef: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    n_probe: tuple[int, ...] = (1,)
    hk_rerank: tuple[int, ...] = (0, 128, 256)  # hkmeans re-rank per ef: 0 = ef itself; values >= ef skipped
    rerank: tuple[int, ...] = (32, 64, 128, 256, 512)
    ivf_nprobe: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    ivf_nlist: int = 0  # 0: round(sqrt(n))
    hnsw_ef: tuple[int, ...] = (32, 64, 128, 256, 512)
    hnsw_m: int = 32
    hnsw_ef_construction: int = 128


@dataclass
class Config:
    """One system with one parameter setting; sizes in MB excluding / including the stored raw vectors."""

    system: str
    params: str
    search: SearchFn
    build_s: float
    index_mb: float
    index_mb_raw: float


def ours(index: SearchIndex, metric: str, k: int, sweep: Sweep, build_s: float) -> list[Config]:
    """exact, transform (rerank sweep) and hkmeans (ef x n_probe x re-rank sweep) on one loaded index."""
    space = SPACE_OF_METRIC[metric]
    raw = shared = own = 0
    for name in index.manifest["files"]:
        size = (index.path / name).stat().st_size
        if name.endswith("signals.npy"):
            raw += size
        elif name.rsplit("/", 1)[-1] in (f"tree-{space}.npz", f"graph-{space}.npy"):
            own += size
        elif name.endswith("l1-blocks.npy"):  # read by manhattan only, in both approximate modes
            shared += size if metric == "manhattan" else 0
        elif "/tree-" not in name and "/graph-" not in name:
            shared += size

    def fn(mode: str, p: SearchParams) -> SearchFn:
        return lambda q: index.search_arrays(q, metric, mode, k, p, threads=thread_cap())[0]

    mb = lambda b: b / 1e6  # noqa: E731
    out = [Config("exact", "-", fn("exact", SearchParams()), build_s, 0.0, mb(raw))]
    # transform's pool for manhattan (block-sum order) is the metric's default ef; other metrics ignore ef
    pool = f"pool={SearchParams.for_metric(metric).ef}," if metric == "manhattan" and index.l1_blocks else ""
    out += [Config("transform", f"{pool}rerank={r}", fn("transform", SearchParams.for_metric(metric, rerank=r)),
                   build_s, mb(shared), mb(shared + raw)) for r in sweep.rerank]
    hk = [SearchParams(n_probe=p, ef=e, rerank=r or e) for p in sweep.n_probe for e in sweep.ef
          for r in sweep.hk_rerank if r < e]
    out += [Config("hkmeans", _label(p), fn("hkmeans", p), build_s, mb(shared + own), mb(shared + own + raw))
            for p in hk]
    p = SearchParams.for_metric(metric)  # the library's own per-metric default, as shipped
    out.append(Config("hkmeans-default", _label(p), fn("hkmeans", p), build_s, mb(shared + own),
                      mb(shared + own + raw)))
    return out


def _label(p: SearchParams) -> str:
    return f"n_probe={p.n_probe},ef={p.ef},rerank={p.rerank}"


def _normalise(x: F32) -> F32:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _top_k(s: npt.NDArray, k: int) -> npt.NDArray[np.int64]:
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    return np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, axis=1), axis=1), axis=1)


def numpy_brute(x: F32, metric: str, k: int, block: int = 8192) -> Config:
    """Plain numpy brute force over the float32 corpus, as a user would write it (BLAS for the inner products)."""
    t0 = time.perf_counter()
    xb = _normalise(x) if metric == "cosine" else x
    sq = np.einsum("ij,ij->i", x, x)

    def search(q: F32) -> npt.NDArray[np.int64]:
        if metric == "manhattan":
            s = np.empty((len(q), len(x)), np.float32)
            for i, row in enumerate(q):
                for a in range(0, len(x), block):
                    s[i, a:a + block] = -np.abs(x[a:a + block] - row).sum(axis=1)
        elif metric == "euclidean":
            s = 2.0 * (q @ x.T) - sq
        else:
            s = (_normalise(q) if metric == "cosine" else q) @ xb.T
        return _top_k(s, k)

    return Config("numpy", "-", search, time.perf_counter() - t0, 0.0, x.nbytes / 1e6)


def faiss_systems(x: F32, metric: str, k: int, sweep: Sweep, seed: int = 0) -> list[Config]:
    """IndexFlat, IndexIVFFlat (nprobe sweep) and IndexHNSWFlat (efSearch sweep) for one metric."""
    faiss = _faiss()
    if faiss is None:
        logger.warning("faiss is not installed (pip install faiss-cpu): FAISS systems skipped")
        return []
    mt = {"euclidean": faiss.METRIC_L2, "manhattan": faiss.METRIC_L1}.get(metric, faiss.METRIC_INNER_PRODUCT)
    prep: Callable[[F32], F32] = _normalise if metric == "cosine" else np.ascontiguousarray
    xb = prep(x)
    n, d = xb.shape
    raw = xb.nbytes

    def built(index, t0: float) -> tuple[float, float, float]:
        size = faiss.serialize_index(index).nbytes
        return time.perf_counter() - t0, (size - raw) / 1e6, size / 1e6

    def fn(index, params=None) -> SearchFn:
        return lambda q: index.search(prep(q), k, params=params)[1]

    t0 = time.perf_counter()
    flat = faiss.IndexFlat(d, mt)
    flat.add(xb)
    out = [Config("faiss-flat", "-", fn(flat), *built(flat, t0))]

    t0 = time.perf_counter()
    nlist = sweep.ivf_nlist or max(1, round(math.sqrt(n)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlat(d, mt), d, nlist, mt)
    ivf.cp.seed = seed
    train = np.random.default_rng(seed).choice(n, size=min(n, 40 * nlist), replace=False)
    ivf.train(xb[np.sort(train)])
    ivf.add(xb)
    cost = built(ivf, t0)
    out += [Config("faiss-ivf", f"nlist={nlist},nprobe={p}", fn(ivf, faiss.SearchParametersIVF(nprobe=p)), *cost)
            for p in sweep.ivf_nprobe if p <= nlist]

    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(d, sweep.hnsw_m, mt)
    hnsw.hnsw.efConstruction = sweep.hnsw_ef_construction
    hnsw.add(xb)
    cost = built(hnsw, t0)
    out += [Config("faiss-hnsw", f"M={sweep.hnsw_m},efSearch={e}", fn(hnsw, faiss.SearchParametersHNSW(efSearch=e)),
                   *cost) for e in sweep.hnsw_ef]
    logger.info("faiss %s (%s): flat, IVF (nlist %d) and HNSW (M %d) built in %.1f s, %.1f s, %.1f s",
                metric, FAISS_METRIC[metric], nlist, sweep.hnsw_m, out[0].build_s, out[1].build_s, out[-1].build_s)
    return out
