"""Searching a loaded index in three modes.

- ``exact``: the ground truth, brute force's answer; lower bounds from the index's summaries rule out
  most signals without reading them (``exact``).
- ``transform``: every signal scored in its metric's reference space (see ``transform``), the best
  ``rerank`` candidates re-scored exactly on the raw signals.
- ``hkmeans``: each shard's tree descent picks its ``n_probe`` nearest leaves; their members seed a
  best-first walk over the shard's neighbour graph in reference space (built by ``graph``, walked
  over 8-bit codes by ``walk``), which keeps the ``ef`` nearest points it meets; the best
  ``rerank`` of those are re-scored exactly (``rescore``).

Manhattan borrows the euclidean space, whose order is a poor guide to L1: where the index keeps block
sums (``block_sums``), every candidate found (hkmeans: all the walks keep; transform: the ``ef``
nearest) is ordered by their L1 lower bound instead, and the best ``rerank`` of that order re-scored.

Scores returned are always the exact metric (higher = more similar); approximate modes differ from
``exact`` only in which points they find, which the benchmarks measure as recall.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq
from threadpoolctl import ThreadpoolController

from batch_index.corpus.files import MAX_ABS_VALUE
from batch_index.engine.block_sums import block_sums
from batch_index.engine.exact import QueryTerms, ShardBounds, pruned_top_k
from batch_index.engine.metrics import METRICS, RESCORE_MARGIN, check_metric, top_k_exact
from batch_index.engine.one_shard import answer_one_shard
from batch_index.engine.partition import Partition
from batch_index.engine.rescore import METRIC_CODE, approx_scores, exact_scores
from batch_index.engine.shape import SHAPE_METRICS
from batch_index.engine.shape_index import ShapeSpaces
from batch_index.engine.transform import SPACE_OF_METRIC, ReferenceTransform, space_points, space_queries
from batch_index.engine.tree import KMeansTree
from batch_index.engine.walk import ScalarCodes, VisitStamps, walk_many
from batch_index.errors import IndexFormatError, InvalidInputError, MetricNotIndexedError, UnknownMetricError
from batch_index.index_files import load_npy, read_manifest, shard_dir

logger = logging.getLogger(__name__)

MODES: Final[tuple[str, ...]] = ("exact", "transform", "hkmeans")
DEFAULT_MAX_K: Final[int] = 1000
F32 = npt.NDArray[np.float32]
_T = TypeVar("_T")


class Match(NamedTuple):
    id: str
    score: float
    rank: int


@dataclass(frozen=True)
class SearchParams:
    """Knobs of the approximate modes (ignored by ``exact``).

    n_probe : leaves per shard whose members seed the graph walk (hkmeans)
    ef : points the graph walk keeps per shard (hkmeans); the main recall/speed knob. For manhattan on
        an index with block sums, also the reference-space pool of ``transform`` mode
    rerank : candidates re-scored exactly on the raw signals (at least k); each costs d multiply-adds
    route : steer the tree descent by node ``centroid`` or by its ``representative`` real signal
    n_shards_probe : on a content-partitioned index, shards searched per query (the nearest under the
        query's metric, see ``partition``; the rest are skipped); 0: every shard. Indexes built
        without a partition are always searched in full; ``exact`` always reads every shard
    """

    n_probe: int = 2
    ef: int = 128
    rerank: int = 128
    route: str = "centroid"
    n_shards_probe: int = 0

    @classmethod
    def for_metric(cls, metric: str, **overrides: object) -> SearchParams:
        """Recommended settings for ``metric`` (see ``DEFAULT_PARAMS``), with ``overrides`` applied."""
        base = DEFAULT_PARAMS[check_metric(metric)]
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def __post_init__(self) -> None:
        if self.n_probe < 1 or self.rerank < 1 or self.ef < 1:
            raise InvalidInputError(
                f"n_probe, ef and rerank must be >= 1, got {self.n_probe}, {self.ef} and {self.rerank}")
        if isinstance(self.n_shards_probe, bool) or self.n_shards_probe < 0:
            raise InvalidInputError(f"n_shards_probe must be >= 0 (0: every shard), got {self.n_shards_probe!r}")
        if self.route not in ("centroid", "representative"):
            raise InvalidInputError(f"route must be 'centroid' or 'representative', got {self.route!r}")


#: Defaults per metric: the cheapest settings that reached recall@10 >= 0.95 with a margin on 10^5
#: synthetic ECG windows and on real record windows (bench/results/recall), unseen and perturbed
#: queries. ``ef`` decides what the walk finds, ``rerank`` how much of it is re-scored on raw signals:
#: on synthetic windows re-ranking 128 of 384 found lost nothing, on real windows cosine fell from
#: 0.988 to 0.951 (256: 0.978), so 256. Manhattan walks the euclidean graph, whose L2 neighbours are
#: not its own: it needs a wider walk, and its block-sum order (``block_sums``) makes 128 re-scored
#: enough (ef 1,024: recall@10 0.979-0.988 on both corpora; ef 512 / re-rank 512 in L2 order: 0.941).
#: ``n_shards_probe``: content-partitioned indexes of 4*10^4 synthetic windows in 8 shards (64 k-means
#: cells per shard), held-out noisy windows, two corpora (seed 0, where they were chosen / seed 3, the
#: bench's, bench/results/routing): euclidean 4 of 8 reached recall@10 0.979 / 0.983, manhattan 4
#: 0.984 / 0.978, cosine 5 0.976 / 0.953 (6: 0.984 / 0.969), dot 6 0.966 / 0.943 (7: 0.977 / 0.970):
#: the defaults take the count that met 0.95 on both with a margin. A count, not a fraction: how it
#: must grow with the number of shards is not measured yet.
DEFAULT_PARAMS: Final[dict[str, SearchParams]] = {
    "euclidean": SearchParams(ef=256, rerank=256, n_shards_probe=4),
    "cosine": SearchParams(ef=384, rerank=256, n_shards_probe=6),
    "manhattan": SearchParams(ef=1024, rerank=128, n_shards_probe=4),
    "dot": SearchParams(ef=384, rerank=256, n_shards_probe=7),
    # shape: candidates from a spectral bound that ranks them loosely (10^5 synthetic: recall@10 0.50-0.56
    # at these settings, 0.61-0.67 at ef/rerank 256; bench/results/shape); zeuclidean: 0.96-0.98 at ef 512
    "shape": SearchParams(ef=128, rerank=128),
    "zeuclidean": SearchParams(ef=512, rerank=256),
}


class Problem(NamedTuple):
    """Why a query is refused: ``code`` is the service's ``error_code`` (``streaming.codec.ErrorCode``)."""

    code: str
    message: str


_ERROR_OF_PROBLEM: Final[dict[str, type[InvalidInputError]]] = {
    "UNKNOWN_METRIC": UnknownMetricError, "UNKNOWN_MODE": UnknownMetricError,
    "METRIC_NOT_INDEXED": MetricNotIndexedError}


def query_problem(index: Any, samples: npt.NDArray[np.floating], metric: str, mode: str, k: int,
                  threshold: float | None, max_k: int | None = None) -> Problem | None:
    """The first rule that queries ``samples`` (shape (nq, n)) break, or None: the one set of rules for
    every door, the search API's (:meth:`SearchIndex.check_queries`, which raises it) and the service's
    decoder (which answers it as an error reply), so nothing behind either door checks again.

    ``index`` needs ``dim``, ``metrics``, ``max_k`` and ``version``; ``max_k`` lowers the index's own.
    """
    problem = _metric_problem(index, metric)
    if problem is not None:
        return problem
    if mode not in MODES:
        return Problem("UNKNOWN_MODE", f"unknown mode {echo(mode)!r}; expected one of {', '.join(MODES)}")
    limit = index.max_k if max_k is None else min(max_k, index.max_k)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
        return Problem("BAD_K", f"k must be an integer in 1..{limit}, got {k!r}")
    if threshold is not None and not np.isfinite(threshold):
        return Problem("BAD_THRESHOLD", f"threshold must be a finite number, got {threshold!r}")
    many = len(samples) > 1
    if samples.ndim != 2 or samples.shape[1] != index.dim:
        n = samples.shape[-1] if samples.ndim else 0
        return Problem("BAD_LENGTH", f"{'query has' if many or samples.ndim != 2 else 'sample has'} {n} values; "
                       f"index {index.version} expects {index.dim}")
    finite = np.isfinite(samples)
    if not finite.all():
        i, j = (int(x[0]) for x in np.nonzero(~finite))
        where = f"query {i} contains NaN or infinite values: " if many else ""
        return Problem("NON_FINITE", f"{where}sample value {j} is {samples[i, j]}; NaN and infinity are not allowed")
    if samples.size:
        magnitude = np.abs(samples)
        big = magnitude > MAX_ABS_VALUE
        if big.any():
            i, j = (int(x[0]) for x in np.nonzero(big))
            where = f"query {i}: " if many else ""
            return Problem("OUT_OF_RANGE", f"{where}sample value {j} is {samples[i, j]:.3g}; samples must lie "
                           f"within +-{MAX_ABS_VALUE:.0e}")
    return None


def _metric_problem(index: Any, metric: str) -> Problem | None:
    """The metric's part of :func:`query_problem`: known at all, and served by this index."""
    if metric not in METRICS:
        return Problem("UNKNOWN_METRIC", f"unknown metric {echo(metric)!r}; expected one of {', '.join(METRICS)}")
    if metric not in index.metrics:
        return Problem("METRIC_NOT_INDEXED", f"metric {metric!r} is not in this index (built for "
                       f"{', '.join(index.metrics)}): version {index.version}")
    return None


def echo(text: _T, limit: int = 100) -> _T:
    """What a sender wrote, cut to ``limit`` characters (marked with an ellipsis) for echoing in a message
    or a reply: an answer must stay small whatever the query held. Anything but a long string is kept."""
    if not isinstance(text, str) or len(text) <= limit:
        return text
    return cast(_T, text[:limit - 1] + "\u2026")


@dataclass
class _Shard:
    offset: int
    ids: npt.NDArray[np.object_]
    signals: np.ndarray  # memory map, (n, d) float32
    z: F32
    norms: F32
    max_norm: float
    trees: dict[str, KMeansTree]
    graphs: dict[str, npt.NDArray[np.int32]]
    _space_cache: dict[str, F32]
    l1: F32 | None = None  # (n, l1_blocks) block sums, memory-mapped; None on indexes built without them
    _local: threading.local = field(default_factory=threading.local)

    def visits(self) -> VisitStamps:
        """This thread's visited-marks for walks over this shard (walks run in several threads at once)."""
        if not hasattr(self._local, "visits"):
            self._local.visits = VisitStamps(len(self.ids))
        return self._local.visits

    def space_offset(self, name: str) -> float:
        """What every squared distance in this shard's ``name`` space carries that other shards' do not.

        In the dot space every point has norm ``max_norm`` (the extra axis fills it up), so distances
        are ``|a|^2 + max_norm^2 - 2 <a, x>``: ranking candidates from shards with different
        ``max_norm`` needs it subtracted (measured: without it, dot recall@10 on a 2-shard 10^5
        index fell to 0.66). Other spaces are the same for every shard.
        """
        return self.max_norm ** 2 if name == "dot" else 0.0

    def sq_norms(self, name: str) -> F32:
        """Squared norms of :meth:`space`'s points: ``transform`` mode ranks by ``|p|^2 - 2 <p, q>`` (one GEMM)."""
        key = f"{name}/sq"
        if key not in self._space_cache:
            pts = self.space(name)
            self._space_cache[key] = np.einsum("ij,ij->i", pts, pts)
        return self._space_cache[key]

    def space(self, name: str) -> F32:
        if name not in self._space_cache:
            self._space_cache[name] = space_points(self.z, self.norms, name, self.max_norm)
        return self._space_cache[name]

    def codes(self, name: str) -> ScalarCodes:
        """8-bit codes of :meth:`space`'s points, what the graph walk reads (see ``walk``)."""
        key = f"{name}/sq8"
        if key not in self._space_cache:
            self._space_cache[key] = ScalarCodes.encode(self.space(name))
        return self._space_cache[key]

    @cached_property
    def residual_p95(self) -> float:
        """95th percentile of ``|r_x| / |x|``, the share of a signal the basis cannot explain (see
        :meth:`SearchIndex._dot_candidates`)."""
        share = self.z[:, -1] / np.maximum(self.norms, 1e-12)
        return float(np.quantile(share, 0.95)) if len(share) else 0.0

    @cached_property
    def signal_sq_norms(self) -> F32:
        return np.square(self.norms, dtype=np.float32)

    @cached_property
    def bounds(self) -> ShardBounds:
        """What exact mode prunes with (built on first use), sharing the walks' codes."""
        return ShardBounds.of(self.z, self.norms, self.l1, {n: (self.space(n), self.codes(n)) for n in self.graphs})


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system that says
        return 0


def _prefault(mapped: np.ndarray) -> None:
    """Read one byte of every page of a memory map, so this process's page tables hold all of it."""
    flat = np.asarray(mapped).reshape(-1).view(np.uint8)
    int(flat[::mmap.PAGESIZE].sum(dtype=np.uint64))


def _check_bounds(shard: _Shard, number: int) -> None:
    """Every row a walk or descent can reach exists: the compiled kernels index without bounds checks."""
    n = len(shard.ids)
    for space, g in shard.graphs.items():
        if g.ndim != 2 or (g.size and (int(g.min()) < -1 or int(g.max()) >= n)):
            raise IndexFormatError(f"graph {space!r} of shard {number} names rows outside 0..{n - 1}")
    for space, t in shard.trees.items():
        nodes = t.n_nodes
        if (t.order.size and (int(t.order.min()) < 0 or int(t.order.max()) >= n)) or (
                t.rep.size and (int(t.rep.min()) < 0 or int(t.rep.max()) >= n)) or t.centroid.shape != (
                nodes, shard.z.shape[1] + (space == "dot")) or (
                nodes and int((t.child_start + t.child_count).max()) > nodes) or (
                nodes and int((t.leaf_start + t.leaf_count).max()) > t.order.size):
            raise IndexFormatError(f"tree {space!r} of shard {number} names rows or nodes that do not exist")


#: fewer queries than this a thread are not worth a thread's hand-off (~50 us) and its GIL contention
MIN_QUERIES_PER_THREAD: Final[int] = 8


def _slices(n: int, threads: int) -> list[tuple[int, int]]:
    """``(lo, hi)`` ranges of ``n`` queries, one per thread, each of at least ``MIN_QUERIES_PER_THREAD``."""
    parts = max(1, min(threads, n // MIN_QUERIES_PER_THREAD))
    if parts == 1:  # one query a call (a server's usual case): np.linspace took ~40 us of a ~2 ms query
        return [(0, n)]
    bounds = np.linspace(0, n, parts + 1).astype(int)
    return [(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds)]


@functools.cache
def _thread_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="ecg-search")


def _best(rows: npt.NDArray[np.int64], score: np.ndarray, keep: int) -> npt.NDArray[np.int64]:
    """Per row, the ``keep`` of ``rows`` with the highest ``score``, sorted (-1, scored -inf, only to fill)."""
    if rows.shape[1] <= keep:
        return rows
    return np.sort(np.take_along_axis(rows, np.argpartition(-score, keep - 1, axis=1)[:, :keep], 1), axis=1)


def _blas_libraries() -> tuple[Any, ...]:
    """Rescanned whenever the count of imported modules changes: a BLAS loaded after the first search
    (FAISS's, ScaNN's) arrives with an import, and a list found once left it uncapped (CI caught it)."""
    return _blas_libraries_in(len(sys.modules))


@functools.lru_cache(maxsize=1)
def _blas_libraries_in(modules: int) -> tuple[Any, ...]:
    """A ``ThreadpoolController()`` scans every loaded library (3.2 ms, half of one hkmeans query at
    10^5); the module count that keys it costs ~50 ns to read."""
    return tuple(lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas")


class _BlasCap:
    """One BLAS thread while any search is inside, whatever the number of threads searching.

    BLAS thread counts are per process. Searches in several threads at once (a server's burst, the
    index loader warming a new version while the current one answers) each entering a limit of their
    own restored each other's saved value out of order: BLAS back at N threads under a running search,
    or left at 1 after all of them. Here the first to enter saves and caps, the last to leave restores;
    each entrant also caps what was raised since (a library loaded meanwhile, or someone else's limit).
    Measured with OpenBLAS 0.3.30/0.3.31 (pthreads): once its pool has more than one thread, a
    ``set_num_threads`` from any thread but the main one is ignored, so a search running in a worker
    thread is capped only if the main thread capped the process (a server should start at 1).
    It replaces ``ThreadpoolController().limit(limits=1, user_api="blas")``, which reads every
    library's whole info on entry and sets them all back on exit (~33 us, ~2-3% of a one-query hkmeans
    call): this sets only the BLAS libraries not at one thread already.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._saved: dict[str, tuple[Any, int]] = {}  # by library file: a rescan makes new controllers

    def enter(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._saved = {}
            for lib in _blas_libraries():
                threads = lib.num_threads
                if threads != 1:
                    self._saved.setdefault(lib.filepath, (lib, threads))
                    lib.set_num_threads(1)
            self._inside += 1

    def leave(self) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                for lib, threads in self._saved.values():
                    lib.set_num_threads(threads)
                self._saved = {}


_BLAS_CAP: Final[_BlasCap] = _BlasCap()


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """See :class:`_BlasCap`."""
    _BLAS_CAP.enter()
    try:
        yield
    finally:
        _BLAS_CAP.leave()


class SearchIndex:
    """A loaded index version: small arrays in memory, raw signals memory-mapped."""

    def __init__(self, path: Path, manifest: dict[str, Any], transform: ReferenceTransform,
                 shards: list[_Shard], max_k: int = DEFAULT_MAX_K) -> None:
        self.path = path
        self.manifest = manifest
        self.transform = transform
        self.shards = shards
        self.max_k = max_k
        rows = {int(r["offset"]): int(r["shard"]) for r in manifest["shards"]}
        self.shard_numbers = np.array([rows[s.offset] for s in shards], np.int64)
        self.partition = self._load_partition(path, manifest)
        self.shape = ShapeSpaces.load(manifest, [shard_dir(path, rows[s.offset]) for s in shards],
                                      [s.offset for s in shards], [s.signals for s in shards],
                                      [s.z for s in shards], transform)

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True, max_k: int = DEFAULT_MAX_K,
             shards: Sequence[int] | None = None) -> SearchIndex:
        """Load an index directory; checksums are verified unless ``verify`` is False.

        ``shards`` loads only those shards (an executor's share of an index too big for one
        machine); results then cover those shards and row indices stay global.
        """
        root = Path(path)
        manifest = read_manifest(root, verify=verify)
        transform = ReferenceTransform(references=load_npy(root / "references.npy"),
                                       basis=load_npy(root / "basis.npy"))
        rows = manifest["shards"]
        if shards is not None:
            wanted = set(shards)
            unknown = wanted - {int(r["shard"]) for r in rows}
            if unknown:
                raise InvalidInputError(f"shard(s) {sorted(unknown)} not in this index of {len(rows)} shard(s)")
            rows = [r for r in rows if int(r["shard"]) in wanted]
        loaded = []
        for row in rows:
            d = shard_dir(root, int(row["shard"]))
            try:
                ids = np.asarray(pq.read_table(d / "ids.parquet", columns=["id"]).column("id").to_pylist(),
                                 dtype=object)
            except OSError as e:
                raise IndexFormatError(f"cannot read ids of shard {row['shard']}: {e}") from e
            trees, graphs = {}, {}
            for space in manifest["spaces"]:
                try:
                    trees[space] = KMeansTree.from_bytes((d / f"tree-{space}.npz").read_bytes())
                except OSError as e:
                    raise IndexFormatError(f"cannot read tree {space!r} of shard {row['shard']}: {e}") from e
                graphs[space] = load_npy(d / f"graph-{space}.npy")
            l1 = load_npy(d / "l1-blocks.npy", mmap=True) if manifest.get("l1_blocks", 0) else None
            shard = _Shard(offset=int(row["offset"]), ids=ids, signals=load_npy(d / "signals.npy", mmap=True),
                           z=load_npy(d / "transform.npy"), norms=load_npy(d / "norms.npy"),
                           max_norm=float(row["max_norm"]), trees=trees, graphs=graphs, _space_cache={}, l1=l1)
            if not (len(ids) == shard.signals.shape[0] == shard.z.shape[0] == int(row["count"])):
                raise IndexFormatError(f"shard {row['shard']} row counts disagree with the manifest")
            _check_bounds(shard, int(row["shard"]))
            if l1 is not None and l1.shape != (len(ids), int(manifest["l1_blocks"])):
                raise IndexFormatError(f"shard {row['shard']} block sums have shape {l1.shape}; the manifest "
                                       f"says {(len(ids), manifest['l1_blocks'])}")
            loaded.append(shard)
        logger.info("loaded index %s (%d signals, %d of %d shards, metrics %s)", manifest["version"],
                    sum(len(s.ids) for s in loaded), len(loaded), len(manifest["shards"]),
                    ",".join(manifest["metrics"]))
        return cls(root, manifest, transform, loaded, max_k)

    @staticmethod
    def _load_partition(path: Path, manifest: dict[str, Any]) -> Partition | None:
        """The cells that route queries to shards; None for indexes built without (searched in full)."""
        spec = manifest.get("partition")
        if not spec:
            return None
        if spec.get("kind") != "kmeans" or spec.get("version") != 1:
            raise IndexFormatError(f"shard partition {spec!r} is not supported by this release (rebuild the index)")
        try:
            part = Partition.from_bytes((path / spec["file"]).read_bytes())
        except OSError as e:
            raise IndexFormatError(f"cannot read the shard partition {spec['file']!r}: {e}") from e
        if part.n_shards != len(manifest["shards"]) or part.cells.shape[1] != int(manifest["basis_rank"]) + 1:
            raise IndexFormatError("the shard partition does not match the manifest's shards or basis")
        return part

    def routes(self, metric: str, n_shards_probe: int) -> bool:
        """Whether ``metric``'s queries visit fewer than every shard (a content-partitioned index)."""
        return self.partition is not None and metric in SPACE_OF_METRIC and \
            0 < n_shards_probe < self.partition.n_shards

    def shard_routes(self, zq: F32, nq: F32, metric: str, n_shards_probe: int) -> npt.NDArray[np.int64] | None:
        """Shard numbers (of the whole index) each query visits, best first; None: every shard."""
        if not self.routes(metric, n_shards_probe):
            return None
        assert self.partition is not None  # routes() holds only with one
        return self.partition.route(zq, nq, metric, n_shards_probe)

    def _visits(self, zq: F32, nq: F32, metric: str, params: SearchParams) -> npt.NDArray[np.bool_] | None:
        """(nq, loaded shards) whether each query searches each loaded shard; None: all of them."""
        if len(self.shards) < len(self.manifest["shards"]):  # an executor's share: its caller routed
            return None
        routes = self.shard_routes(zq, nq, metric, params.n_shards_probe)
        if routes is None:
            return None
        return (routes[:, :, None] == self.shard_numbers[None, None, :]).any(axis=1)

    def warm(self) -> SearchIndex:
        """Compute every space's points, norms and codes now, not in the first query of each metric.

        A server calls this before it swaps a version in: otherwise the first queries after start-up
        or an upgrade pay for it (measured at 10^5: the first hkmeans batch of 2 took 1.1 s, not 0.3;
        compiling the walk and re-scoring kernels takes ~5 s more where numba's cache is cold).
        Memory maps are faulted in too, up to a quarter of the machine's memory in all: a row's first read
        in a process costs page faults, measured doubling the re-ranking of 256 rows (0.79 -> 0.36 ms);
        mapping the 1 GB of signals at 10^5 took 0.08 s with the file in the page cache.
        """
        budget = _physical_memory() // 4
        self.shape.warm()
        for s in self.shards:
            for name in self.manifest["spaces"]:
                s.sq_norms(name)
                s.codes(name)
            s.bounds  # noqa: B018 (built now, not in the first exact query)
            for mapped in (s.signals, s.l1):
                if mapped is not None and mapped.nbytes <= budget:
                    _prefault(mapped)
                    budget -= mapped.nbytes
        if self.size:  # and compile (or load from numba's cache) the kernels each metric runs
            probe = np.asarray(self.shards[0].signals[:1], dtype=np.float32)
            params = SearchParams(n_probe=1, ef=4, rerank=4)
            for metric in self.metrics:
                for mode in ("hkmeans", "exact"):
                    self.search_arrays(probe, metric, mode, 1, params)
                if metric in SPACE_OF_METRIC and len(self.shards) == 1:  # what one_shard hands back goes by stages
                    zq, nq = self.transform.apply(probe)
                    self._answer_by_stages(probe, space_queries(zq, nq, SPACE_OF_METRIC[metric]), metric, "hkmeans",
                                           1, params)
        return self

    # ---- what callers check against -------------------------------------------------------------
    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self.manifest["metrics"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def size(self) -> int:
        """Signals loaded (all of the index unless loaded shard by shard)."""
        return sum(len(s.ids) for s in self.shards)

    @property
    def l1_blocks(self) -> int:
        """Block sums kept per signal (0: none; manhattan candidates are then ordered in L2)."""
        return int(self.manifest.get("l1_blocks", 0))

    @property
    def sampling_rate(self) -> float | None:
        return self.manifest.get("sampling_rate")

    @cached_property
    def ids(self) -> npt.NDArray[np.object_]:
        """Ids of the loaded signals in row order."""
        return np.concatenate([s.ids for s in self.shards])

    @cached_property
    def _offsets(self) -> npt.NDArray[np.int64]:
        return np.array([s.offset for s in self.shards], dtype=np.int64)

    def _locate(self, global_rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Position in ``self.shards`` of each global row (loaded shards only)."""
        return np.searchsorted(self._offsets, global_rows, side="right") - 1

    def ids_of(self, global_rows: npt.ArrayLike) -> list[str]:
        """The corpus ids of global row indices."""
        rows = np.asarray(global_rows, dtype=np.int64).ravel()
        where = self._locate(rows)
        return [str(self.shards[w].ids[r - self.shards[w].offset]) for w, r in zip(where, rows)]

    def check_metric(self, metric: str) -> str:
        """:func:`query_problem`'s metric rules alone (a search whose queries are read elsewhere, on Spark)."""
        problem = _metric_problem(self, metric)
        if problem is not None:
            raise _ERROR_OF_PROBLEM[problem.code](problem.message)
        return metric

    def check_queries(self, queries: npt.ArrayLike, metric: str, mode: str, k: int,
                      threshold: float | None = None, max_k: int | None = None) -> F32:
        """Validate once at the door (the rules of :func:`query_problem`); returns queries as float32 of
        shape (nq, dim), which :meth:`answer` then trusts."""
        try:
            q = np.asarray(queries, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"queries must be numeric arrays: {e}") from e
        q = q[None, :] if q.ndim == 1 else q
        problem = query_problem(self, q, metric, mode, k, threshold, max_k)
        if problem is not None:
            raise _ERROR_OF_PROBLEM.get(problem.code, InvalidInputError)(problem.message)
        return q

    # ---- search --------------------------------------------------------------------------------
    def search(self, queries: npt.ArrayLike, metric: str, mode: str = "hkmeans", k: int = 10,
               threshold: float | None = None, params: SearchParams | None = None, threads: int = 1
               ) -> list[list[Match]]:
        """Top-k matches per query, best first; rows below ``threshold`` are dropped (``threads``: see
        :meth:`search_arrays`)."""
        q = self.check_queries(queries, metric, mode, k, threshold)
        return self.answer(q, metric, mode, k, threshold, params, threads)

    def answer(self, q: F32, metric: str, mode: str, k: int, threshold: float | None = None,
               params: SearchParams | None = None, threads: int = 1) -> list[list[Match]]:
        """:meth:`search` for queries that already passed the door (:meth:`check_queries`, or the
        service's decoder, which applies the same :func:`query_problem`): float32 of shape (nq, dim)."""
        idx, sc = self.search_arrays(q, metric, mode, k, params or SearchParams.for_metric(metric), threads)
        out = []
        for irow, srow in zip(idx, sc):
            keep = np.ones(len(irow), bool) if threshold is None else srow >= threshold
            ids = self.ids_of(irow[keep])
            out.append([Match(i, float(s), r + 1) for r, (i, s) in enumerate(zip(ids, srow[keep]))])
        return out

    def search_arrays(self, q: F32, metric: str, mode: str, k: int, params: SearchParams, threads: int = 1
                      ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Global row indices and exact scores, shape (nq, min(k, size)); inputs already checked.

        ``threads`` > 1 answers slices of the queries in that many threads at once: every stage is a
        compiled call over a whole slice that releases the GIL, so one process can use each core it
        was given (a server answering a burst in its own process; Spark tasks keep 1, one per core).
        """
        if metric in SHAPE_METRICS:  # spaces of their own, re-ranked by FFT NCC (see shape_index)
            return self._shape_search(q, metric, mode, min(k, self.size), params, threads)
        kk = min(k, self.size)
        if mode == "exact":
            with _one_blas_thread():
                slices = _slices(len(q), threads)
                if len(slices) == 1:
                    return self._exact(q, metric, k)
                parts = [f.result() for f in [_thread_pool(len(slices)).submit(self._exact, q[lo:hi], metric, k)
                                              for lo, hi in slices]]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        # many small BLAS calls per query: threads only add contention (and fight Spark's own). The
        # transform too: OpenBLAS threads left from one multi-threaded call spin for a while after it,
        # measured doubling the CPU time of every hkmeans query served outside Spark's workers
        with _one_blas_thread():
            zq, nq = self.transform.apply(q)
            aq = space_queries(zq, nq, SPACE_OF_METRIC[metric])
            visit = self._visits(zq, nq, metric, params) if mode == "hkmeans" else None
            slices = _slices(len(q), threads)
            if len(slices) == 1:
                return self._answer(q, aq, metric, mode, kk, params, visit)
            parts = [f.result() for f in [_thread_pool(len(slices)).submit(
                self._answer, q[lo:hi], aq[lo:hi], metric, mode, kk, params,
                None if visit is None else visit[lo:hi]) for lo, hi in slices]]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _shape_search(self, q: F32, metric: str, mode: str, k: int, params: SearchParams, threads: int
                      ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        def run(part: F32) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
            return self.shape.search(part, metric, mode, k, params.ef, params.rerank, params.n_probe, params.route)

        # one limit, entered here: limits entered in each worker restore each other's "previous" value
        # out of order (seen in tests: a later build in the same process wrote different trees)
        with _one_blas_thread():
            slices = _slices(len(q), threads)
            if len(slices) == 1:
                return run(q)
            parts = [f.result() for f in [_thread_pool(len(slices)).submit(run, q[lo:hi]) for lo, hi in slices]]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @property
    def shape_max_lag(self) -> int:
        """The ``shape`` lag bound of this index in samples (0 when it does not serve ``shape``)."""
        return self.shape.max_lag

    def _answer(self, q: F32, aq: F32, metric: str, mode: str, k: int, params: SearchParams,
                visit: npt.NDArray[np.bool_] | None = None) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """:meth:`search_arrays` of queries ``q`` (``aq`` in their metric's space; ``visit``: the loaded shards
        each query searches, see :meth:`_visits`; None: all): hkmeans on one shard in one compiled call
        (:meth:`_answer_one_shard`), else :meth:`_answer_by_stages`."""
        if mode == "hkmeans" and visit is None and len(self.shards) == 1:
            return self._answer_one_shard(q, aq, metric, k, params)
        return self._answer_by_stages(q, aq, metric, mode, k, params, visit)

    def _answer_one_shard(self, q: F32, aq: F32, metric: str, k: int, params: SearchParams
                          ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """:meth:`_answer_by_stages`'s answer for hkmeans on a one-shard index, its stages fused
        (``one_shard``); the queries that kernel leaves (a tie where a set is cut, too few found, dot
        queries :meth:`_widened`) are answered by stages."""
        s = self.shards[0]
        space = SPACE_OF_METRIC[metric]
        q, aq = np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(aq, dtype=np.float32)
        by_blocks = metric == "manhattan" and self.l1_blocks > 0
        widen = metric == "dot" and "cosine" in s.graphs
        skip = self._widened(aq) if widen else np.zeros(len(q), np.bool_)
        signals = np.asarray(s.signals)
        l1, sums = (np.asarray(s.l1), block_sums(q, self.l1_blocks)) if by_blocks else (signals, q)
        codes = s.codes(space)
        top, exact, ok = answer_one_shard(
            *s.trees[space].descent(s.space(space), params.n_probe, params.route), codes.codes, codes.sq_norms,
            codes.base, codes.step, s.graphs[space], aq, int(params.ef), s.visits().stamps,
            s.visits().reserve(len(q)), s.space_offset(space), max(params.rerank, k), by_blocks, l1, sums,
            METRIC_CODE["manhattan"], signals, s.signal_sq_norms, q, METRIC_CODE[metric], k, RESCORE_MARGIN, skip)
        if s.offset:
            top[ok] += s.offset
        if not ok.all():
            rest = np.flatnonzero(~ok)
            top[rest], exact[rest] = self._answer_by_stages(q[rest], aq[rest], metric, "hkmeans", k, params)
        return top, exact

    def _answer_by_stages(self, q: F32, aq: F32, metric: str, mode: str, k: int, params: SearchParams,
                          visit: npt.NDArray[np.bool_] | None = None
                          ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """:meth:`_answer`, stage by stage over all of the queries (any index, any approximate mode)."""
        space = SPACE_OF_METRIC[metric]
        rerank = max(params.rerank, k)
        by_blocks = metric == "manhattan" and self.l1_blocks > 0
        # every candidate the walks keep goes to the block-sum order; transform keeps its ef nearest
        pool = (None if mode == "hkmeans" else max(params.ef, rerank)) if by_blocks else rerank
        cand = self._candidates(aq, space, mode, params, pool, visit)
        if metric == "dot" and mode == "hkmeans" and all("cosine" in sh.graphs for sh in self.shards):
            cand = self._dot_candidates(aq, cand, params, visit)
        if by_blocks and cand.shape[1] > rerank:
            q_sums = block_sums(q, self.l1_blocks)
            near = self._per_shard(cand, lambda s, local: approx_scores(q_sums, s.l1, local, s.signal_sq_norms,
                                                                        "manhattan"))
            cand = _best(cand, near, rerank)
        top, exact = self._rerank(q, cand, metric, k)
        for i in np.flatnonzero((top < 0).any(axis=1)):  # fewer candidates than k: pad from exact search
            top[i], exact[i] = (a[0] for a in self._exact(q[i:i + 1], metric, k))
        return top, exact

    def _dot_candidates(self, aq: F32, cand: npt.NDArray[np.int64], params: SearchParams,
                        visit: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.int64]:
        """Dot candidates, widened by the cosine walk's for queries the basis explains poorly.

        The dot space drops ``<r_q, r_x>``, the product of the parts the basis cannot explain: for a query
        whose residual share ``|r_q| / |q|`` is beyond what 95% of the corpus has, its true neighbours
        are not near in that space (real windows, 12,232: three unseen queries of share ~0.6, against a
        corpus p95 of 0.41, kept 3-4 of their top 10 at any ef, even by brute force in the dot space;
        the cosine walk found 6-10 of them). Other queries keep the dot walk's candidates alone.
        """
        wide = np.flatnonzero(self._widened(aq))
        if wide.size == 0:
            return cand
        norm = np.sqrt(np.einsum("ij,ij->i", aq, aq))
        cos_q = aq[wide, :-1] / np.maximum(norm[wide], 1e-12)[:, None]
        extra = self._candidates(np.ascontiguousarray(cos_q, dtype=np.float32), "cosine", "hkmeans", params, None,
                                 None if visit is None else visit[wide])
        merged = np.full((len(cand), cand.shape[1] + extra.shape[1]), -1, np.int64)
        merged[:, :cand.shape[1]] = cand
        merged[wide, cand.shape[1]:] = extra
        merged.sort(axis=1)
        merged[:, 1:][merged[:, 1:] == merged[:, :-1]] = -1  # each row once: a duplicate could fill two of the top k
        return np.sort(merged, axis=1)

    def _widened(self, aq: F32) -> npt.NDArray[np.bool_]:
        """Which dot queries (``aq`` in the dot space) :meth:`_dot_candidates` widens: residual share beyond
        every loaded shard's 95th percentile."""
        norm = np.sqrt(np.einsum("ij,ij->i", aq, aq))
        return np.asarray(aq[:, -2] > max(s.residual_p95 for s in self.shards) * np.maximum(norm, 1e-12))

    def _rerank(self, q: F32, cand: npt.NDArray[np.int64], metric: str, k: int, margin: int = RESCORE_MARGIN
                ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Exact top ``k`` of each row of global rows ``cand`` (-1: none): best first, float64 scores.

        float32 scores over every candidate (read in place, ``rescore``), float64 rescoring of the best
        ``k + margin``: the same answer as scoring them all in float64 (exact mode's guarantee), as in
        :func:`batch_index.engine.metrics.top_k_exact`. Ties go to the lower row, as there.
        """
        approx = self._per_shard(cand, lambda s, local: approx_scores(q, s.signals, local, s.signal_sq_norms, metric))
        cand = _best(cand, approx, k + margin)
        exact = self._per_shard(cand, lambda s, local: exact_scores(q, s.signals, local, metric))
        if cand.shape[1] < k:  # a tiny index: pad, so that the caller sees the missing rows as -1
            cand = np.pad(cand, ((0, 0), (0, k - cand.shape[1])), constant_values=-1)
            exact = np.pad(exact, ((0, 0), (0, k - exact.shape[1])), constant_values=-np.inf)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(cand, order, 1), np.take_along_axis(exact, order, 1)

    def _per_shard(self, rows: npt.NDArray[np.int64], score: Callable[[_Shard, npt.NDArray[np.int64]], np.ndarray]
                   ) -> np.ndarray:
        """``score(shard, local rows)`` for global ``rows`` (-1: none) of any shape, each row scored by its shard."""
        if len(self.shards) == 1:
            s = self.shards[0]
            return score(s, np.where(rows >= 0, rows - s.offset, -1))
        out: np.ndarray | None = None
        for s in self.shards:
            mine = (rows >= s.offset) & (rows < s.offset + len(s.ids))
            part = score(s, np.where(mine, rows - s.offset, -1))
            out = part if out is None else np.where(mine, part, out)
        assert out is not None
        return out

    def _candidates(self, aq: F32, space: str, mode: str, params: SearchParams, keep: int | None,
                    visit: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.int64]:
        """Per query (row), sorted global rows: the ``keep`` nearest found in reference space (None: all the
        walks found); -1 where fewer were found. ``visit`` (hkmeans): which shards each query walks."""
        if mode == "transform":
            return np.sort(self._transform_candidates(aq, space, keep or self.size), axis=1)
        cands, dists = [], []
        for j, s in enumerate(self.shards):
            rows = None if visit is None else np.flatnonzero(visit[:, j])
            if rows is not None and not rows.size:
                continue
            part = aq if rows is None else aq[rows]
            local, d = walk_many(s.codes(space), s.graphs[space], part,
                                 s.trees[space].descent(s.space(space), params.n_probe, params.route), params.ef,
                                 s.visits())
            local, d = np.where(local >= 0, local + s.offset, -1), d - s.space_offset(space)
            if rows is not None:  # the queries that skip this shard find nothing in it
                full, full_d = np.full((len(aq), local.shape[1]), -1, np.int64), np.full((len(aq), d.shape[1]), np.inf)
                full[rows], full_d[rows] = local, d
                local, d = full, full_d
            cands.append(local)
            dists.append(d)
        cand, dist = (cands[0], dists[0]) if len(cands) == 1 else (np.hstack(cands), np.hstack(dists))
        if keep is not None and cand.shape[1] > keep:
            cand = np.take_along_axis(cand, np.argpartition(dist, keep - 1, axis=1)[:, :keep], 1)
        return np.sort(cand, axis=1)

    def _transform_candidates(self, aq: F32, space: str, rerank: int, block_bytes: int = 1 << 27
                              ) -> npt.NDArray[np.int64]:
        """Brute force in reference space: one GEMM per block of queries and shard."""
        rows = max(1, block_bytes // (4 * max(len(s.z) for s in self.shards)))
        out = []
        for lo in range(0, len(aq), rows):
            block = aq[lo:lo + rows]
            cands, dists = [], []
            for s in self.shards:
                pts = s.space(space)
                # + |a|^2, the same in every row; minus the shard's constant so shards compare
                d = (s.sq_norms(space) - s.space_offset(space))[None, :] - 2.0 * (block @ pts.T)
                r = min(rerank, d.shape[1])
                if r < d.shape[1]:
                    part = np.argpartition(d, r - 1, axis=1)[:, :r]
                else:
                    part = np.tile(np.arange(d.shape[1]), (len(block), 1))
                cands.append(part + s.offset)
                dists.append(np.take_along_axis(d, part, axis=1))
            cand, dist = np.hstack(cands), np.hstack(dists)
            if cand.shape[1] > rerank:
                cand = np.take_along_axis(cand, np.argpartition(dist, rerank - 1, axis=1)[:, :rerank], 1)
            out.append(cand)
        return np.vstack(out) if out else np.zeros((0, 0), np.int64)

    def signals_of(self, global_rows: npt.NDArray[np.int64]) -> F32:
        """Raw signals of global rows (any order), e.g. to re-score results outside the index."""
        order = np.argsort(global_rows, kind="stable")
        out = np.empty((len(global_rows), self.dim), dtype=np.float32)
        out[order] = self._rows(np.asarray(global_rows)[order])
        return out

    def _rows(self, global_rows: npt.NDArray[np.int64]) -> F32:
        """Raw signals of sorted global rows, gathered shard by shard from the memory maps."""
        parts = [np.asarray(s.signals[local]) for s, local in self._by_shard(global_rows)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _by_shard(self, global_rows: npt.NDArray[np.int64]) -> list[tuple[_Shard, npt.NDArray[np.int64]]]:
        """Sorted global rows split into (shard, local rows), in shard order (so in row order)."""
        if len(self.shards) == 1:
            return [(self.shards[0], global_rows - self.shards[0].offset)]
        which = self._locate(global_rows)
        return [(self.shards[w], global_rows[which == w] - self.shards[w].offset) for w in np.unique(which)]

    def _exact(self, q: F32, metric: str, k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Exact top-k, pruned by lower bounds (``exact``): brute force's rows without reading most signals."""
        zq, nq = self.transform.apply(q)
        terms = QueryTerms.of(q, zq, nq, self.l1_blocks)
        parts = [pruned_top_k(terms, s.bounds, s.signals, metric, k)[:2] for s in self.shards]
        return self._merge_shards(q, k, parts)

    def _brute_force(self, q: F32, metric: str, k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Exact mode before pruning (every signal read, float32 BLAS preselection): the bench's baseline."""
        return self._merge_shards(q, k, [top_k_exact(q, s.signals, metric, k, point_sq_norms=s.signal_sq_norms)
                                         for s in self.shards])

    def _merge_shards(self, q: F32, k: int, parts: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]
                      ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Each shard's top-k (local rows) merged into the index's, by score then lower global row."""
        all_i = np.hstack([i + s.offset for s, (i, _) in zip(self.shards, parts)])
        all_s = np.hstack([sc for _, sc in parts])
        kk = min(k, self.size)
        out_i = np.zeros((len(q), kk), np.int64)
        out_s = np.zeros((len(q), kk), np.float64)
        for r in range(len(q)):
            top = np.lexsort((all_i[r], -all_s[r]))[:kk]
            out_i[r], out_s[r] = all_i[r][top], all_s[r][top]
        return out_i, out_s


__all__ = ["METRICS", "MODES", "Match", "SearchIndex", "SearchParams", "echo", "query_problem"]
