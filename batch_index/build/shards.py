"""Building an index from arrays: the pure-numpy steps the Spark job runs per partition.

:func:`build_index` chains them on one machine for small corpora and tests; ``spark_job`` runs
:func:`fit_transform` on a driver-side sample and :func:`build_shard` inside ``mapInArrow``.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from batch_index.engine.block_sums import DEFAULT_L1_BLOCKS, block_starts, block_sums
from batch_index.engine.graph import build_graph
from batch_index.engine.metrics import DEFAULT_METRICS, parse_metrics
from batch_index.engine.partition import Partition, fit_partition
from batch_index.engine.shape import check_max_lag, default_max_lag, fft_length
from batch_index.engine.shape_index import build_shape_spaces
from batch_index.engine.shape_index import spaces_of as shape_spaces_of
from batch_index.engine.transform import (
    REFERENCE_METHODS,
    ReferenceTransform,
    choose_references,
    space_points,
    spaces_for,
)
from batch_index.engine.tree import KMEANS_KINDS, build_tree
from batch_index.errors import InvalidInputError
from batch_index.index_files import (
    FORMAT,
    FORMAT_VERSION,
    PARTITION_FILE,
    ShardInfo,
    file_checksum,
    write_manifest,
    write_shard_arrays,
)

logger = logging.getLogger(__name__)

#: how a multi-shard build splits the corpus: ``kmeans`` by content (queries then visit the nearest
#: shards only, see ``partition``), ``rows`` in input order (every query visits every shard)
PARTITIONINGS = ("kmeans", "rows")
SHARD_ROWS = 131_072  # default signals per shard when a Spark build is not told how many partitions to use


@dataclass(frozen=True)
class BuildConfig:
    """Index parameters; the CLI's ``build`` flags mirror these fields one to one."""

    metrics: tuple[str, ...] = DEFAULT_METRICS
    n_references: int = 1024
    reference_method: str = "sample"
    reference_sample: int = 8192
    basis_rank: int = 384
    branching: int = 16
    leaf_size: int = 64
    max_depth: int = 12
    kmeans: str = "minibatch"
    graph_degree: int = 16
    graph_cluster_size: int = 4096
    l1_blocks: int = DEFAULT_L1_BLOCKS
    shape_max_lag: int | None = None
    shape_bins: int = 512
    shape_rank: int = 64
    partitioning: str = "kmeans"
    cells_per_shard: int = 64  # k-means cells per shard; routing by 16 needed more shards probed
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", parse_metrics(self.metrics))
        if self.n_references < 1 or self.basis_rank < 1:
            raise InvalidInputError(
                f"n_references and basis_rank must be >= 1, got {self.n_references} and {self.basis_rank}")
        if self.reference_method not in REFERENCE_METHODS:
            raise InvalidInputError(
                f"reference_method must be one of {REFERENCE_METHODS}, got {self.reference_method!r}")
        if self.partitioning not in PARTITIONINGS:
            raise InvalidInputError(
                f"partitioning must be one of {PARTITIONINGS}, got {self.partitioning!r}")
        if self.cells_per_shard < 1:
            raise InvalidInputError(f"cells_per_shard must be >= 1, got {self.cells_per_shard}")
        if self.kmeans not in KMEANS_KINDS:
            raise InvalidInputError(f"kmeans must be one of {KMEANS_KINDS}, got {self.kmeans!r}")
        if self.l1_blocks < 0:
            raise InvalidInputError(f"l1_blocks must be >= 0 (0: none), got {self.l1_blocks}")
        if (self.shape_max_lag is not None and (isinstance(self.shape_max_lag, bool) or self.shape_max_lag < 0)
                ) or self.shape_bins < 1 or self.shape_rank < 1:
            raise InvalidInputError("shape_max_lag >= 0 (samples; None: 15% of the signal length), shape_bins >= 1 "
                                    f"and shape_rank >= 1 are required; got {self.shape_max_lag}, "
                                    f"{self.shape_bins} and {self.shape_rank}")
        if self.graph_degree < 1 or self.graph_cluster_size < 2:
            raise InvalidInputError("graph_degree >= 1 and graph_cluster_size >= 2 are required; got "
                                    f"{self.graph_degree} and {self.graph_cluster_size}")
        if self.branching < 2 or self.leaf_size < 1 or self.max_depth < 1 or self.reference_sample < 1:
            raise InvalidInputError("branching >= 2, leaf_size >= 1, max_depth >= 1 and reference_sample >= 1 "
                                    f"are required; got {self.branching}, {self.leaf_size}, "
                                    f"{self.max_depth}, {self.reference_sample}")


def uses_l1_blocks(cfg: BuildConfig) -> bool:
    """Whether shards keep block sums (see :mod:`batch_index.engine.block_sums`): only manhattan reads them."""
    return cfg.l1_blocks > 0 and "manhattan" in cfg.metrics


def shape_max_lag(cfg: BuildConfig, dim: int) -> int:
    """The ``shape`` lag bound in samples for signals of ``dim`` samples (checked against ``dim``)."""
    return check_max_lag(default_max_lag(dim) if cfg.shape_max_lag is None else cfg.shape_max_lag, dim)


def fit_transform(sample: npt.NDArray[np.float32], cfg: BuildConfig) -> ReferenceTransform:
    """Choose references on a sample of the corpus (shape (s, d)) and orthonormalise them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        chosen = choose_references(sample, cfg.n_references, cfg.reference_method, cfg.seed)
    transform = ReferenceTransform.fit(sample[chosen], cfg.basis_rank)
    logger.info("references: %d chosen by %s from a sample of %d; basis rank %d",
                len(chosen), cfg.reference_method, len(sample), transform.width - 1)
    return transform


def shard_seed(seed: int, shard: int) -> int:
    """Per-shard seed derived from (seed, shard) so any partitioning builds reproducibly."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


def build_shard(index_dir: Path, shard: int, ids: list[str], labels: list[str] | None,
                signals: npt.NDArray[np.float32], transform: ReferenceTransform, cfg: BuildConfig
                ) -> ShardInfo:
    """Transform one shard, build one tree per metric space, write its files."""
    clock = _StageClock()
    z, norms = transform.apply(signals)
    max_norm = float(norms.max(initial=0.0))
    clock.lap("transform")
    trees: dict[str, bytes] = {}
    graphs: dict[str, npt.NDArray[np.int32]] = {}
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for space in spaces_for(cfg.metrics):
            pts = space_points(z, norms, space, max_norm)
            tree = build_tree(pts, branching=cfg.branching, leaf_size=cfg.leaf_size, max_depth=cfg.max_depth,
                              kmeans=cfg.kmeans, seed=shard_seed(cfg.seed, shard))
            trees[space] = tree.to_bytes()
            clock.lap(f"tree {space}")
            graphs[space] = build_graph(pts, degree=cfg.graph_degree, cluster_size=cfg.graph_cluster_size,
                                         seed=shard_seed(cfg.seed, shard),
                                         inner_product_cols=z.shape[1] if space == "dot" else 0)
            clock.lap(f"graph {space}")
    extra = {"l1-blocks": block_sums(signals, cfg.l1_blocks)} if uses_l1_blocks(cfg) else {}
    if shape_spaces_of(cfg.metrics):
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            more_trees, more_graphs, more = build_shape_spaces(
                signals, z, transform, cfg.metrics, max_lag=shape_max_lag(cfg, signals.shape[1]),
                bins=cfg.shape_bins, rank=cfg.shape_rank, seed=shard_seed(cfg.seed, shard),
                tree_args={"branching": cfg.branching, "leaf_size": cfg.leaf_size, "max_depth": cfg.max_depth,
                           "kmeans": cfg.kmeans},
                graph_args={"degree": cfg.graph_degree, "cluster_size": cfg.graph_cluster_size})
        trees.update(more_trees)
        graphs.update(more_graphs)
        extra.update(more)
    clock.lap("block sums, shape")
    info = write_shard_arrays(index_dir, shard, ids, labels, signals, z, norms, trees, graphs, extra)
    clock.lap("write")
    logger.info("shard %d: %d signals, trees %s built in %.1f s (%s)", shard, len(ids), list(trees),
                clock.total, clock)
    return info


class _StageClock:
    """Seconds per build stage, logged with each shard: where a large build's time goes (the graphs,
    measured) is what decides which knob to turn."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.t0

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.stages.items())


def finish_index(index_dir: Path, transform: ReferenceTransform, shards: list[ShardInfo], cfg: BuildConfig,
                 *, dim: int, sampling_rate: float | None, extra: dict[str, Any] | None = None,
                 partition: Partition | None = None) -> Path:
    """Write references, basis, the shard partition (content-partitioned builds) and (last) the manifest
    with every file's checksum."""
    shards = sorted(shards, key=lambda s: s.shard)
    if [s.shard for s in shards] != list(range(len(shards))):
        raise InvalidInputError(f"shards must be numbered 0..n-1, got {[s.shard for s in shards]}")
    np.save(index_dir / "references.npy", transform.references)
    np.save(index_dir / "basis.npy", transform.basis)
    written = ["references.npy", "basis.npy"]
    if partition is not None:
        if partition.n_shards != len(shards):
            raise InvalidInputError(f"the partition names {partition.n_shards} shards; {len(shards)} were built")
        (index_dir / PARTITION_FILE).write_bytes(partition.to_bytes())
        written.append(PARTITION_FILE)
    files = {name: file_checksum(index_dir / name) for name in written}
    offset = 0
    shard_rows = []
    for s in shards:
        shard_rows.append({"shard": s.shard, "count": s.count, "offset": offset, "max_norm": s.max_norm})
        offset += s.count
        files.update(s.files)
    now = datetime.now(timezone.utc)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}",
        "created": now.isoformat(),
        "metrics": list(cfg.metrics),
        "spaces": list(spaces_for(cfg.metrics)),
        "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "count": offset,
        "dim": dim,
        "sampling_rate": sampling_rate,
        "n_references": int(transform.references.shape[0]),
        "basis_rank": transform.width - 1,
        "l1_blocks": len(block_starts(dim, cfg.l1_blocks)) if uses_l1_blocks(cfg) else 0,  # as block_sums cuts
        "shards": shard_rows,
        "files": files,
        **_shape_manifest(cfg, dim),
        **({"partition": {"kind": "kmeans", "version": 1, "file": PARTITION_FILE,
                          "cells": len(partition.cells)}} if partition is not None else {}),
        **(extra or {}),
    }
    return write_manifest(index_dir, manifest)


def _shape_manifest(cfg: BuildConfig, dim: int) -> dict[str, Any]:
    """Manifest fields of the shape spaces (none when the index serves neither shape metric)."""
    spaces = shape_spaces_of(cfg.metrics)
    if not spaces:
        return {}
    lag = shape_max_lag(cfg, dim)
    return {"shape_spaces": list(spaces), "shape_max_lag": lag, "shape_bins": cfg.shape_bins,
            "shape_nfft": fft_length(dim, lag)}


def prepare_output(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Create an empty output directory; refuse to mix files into an existing index."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InvalidInputError(f"output {str(out)!r} exists and is not empty (use --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_index(ids: list[str], signals: npt.ArrayLike, out_dir: str | Path, cfg: BuildConfig = BuildConfig(),
                *, labels: list[str] | None = None, sampling_rate: float | None = None, n_shards: int = 1,
                overwrite: bool = False) -> Path:
    """Build an index on this machine (no Spark), e.g. for tests and small corpora."""
    x = np.ascontiguousarray(np.asarray(signals, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] == 0:
        raise InvalidInputError(f"signals must be a non-empty (n_signals, n_samples) array, got shape {x.shape}")
    if len(ids) != x.shape[0]:
        raise InvalidInputError(f"{len(ids)} ids for {x.shape[0]} signals")
    if not np.isfinite(x).all():
        raise InvalidInputError(f"signal in row {int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])} "
                                "contains NaN or infinite values")
    if len(set(ids)) != len(ids):
        raise InvalidInputError("ids must be unique")
    shape_max_lag(cfg, x.shape[1])
    out = prepare_output(out_dir, overwrite=overwrite)
    rng = np.random.default_rng(cfg.seed)
    sample_rows = np.sort(rng.choice(x.shape[0], size=min(cfg.reference_sample, x.shape[0]), replace=False))
    transform = fit_transform(x[sample_rows], cfg)
    partition = None
    if n_shards > 1 and cfg.partitioning == "kmeans":
        partition = fit_partition(transform.apply(x[sample_rows])[0], n_shards, cfg.cells_per_shard, cfg.seed)
        shard_of = np.concatenate([partition.assign(transform.apply(x[lo:lo + 16384])[0])
                                   for lo in range(0, x.shape[0], 16384)])
        held = [int(s) for s in np.unique(shard_of)]  # a shard no signal went to is not built
        partition = partition.renumbered(held)
        groups = [np.flatnonzero(shard_of == s) for s in held]
    else:
        bounds = np.linspace(0, x.shape[0], max(1, n_shards) + 1).astype(int)
        groups = [np.arange(a, b) for a, b in itertools.pairwise(bounds)]
    infos = [build_shard(out, i, [ids[r] for r in rows], None if labels is None else [labels[r] for r in rows],
                         x[rows], transform, cfg) for i, rows in enumerate(groups)]
    return finish_index(out, transform, infos, cfg, dim=x.shape[1], sampling_rate=sampling_rate,
                        partition=partition).parent
