"""The index directory: one version per directory, every file checksummed in the manifest.

Layout::

    INDEX_DIR/
      manifest.json                 format, version id, metrics, parameters, counts, checksums
      references.npy                (n_references, d) float32, the real reference signals
      basis.npy                     (d, r) float32, orthonormal basis of their span
      partition.npz                 content-partitioned builds: fine cells in reference space and
                                    the shard of each (manifest ``partition``), what routes queries
      shards/NNNNN/ids.parquet      ids (and labels) of the shard's signals, in row order
      shards/NNNNN/signals.npy      (n, d) float32 raw signals: exact re-ranking, memory-mapped
      shards/NNNNN/transform.npy    (n, r + 1) float32 reference coordinates
      shards/NNNNN/norms.npy        (n,) float32 signal norms
      shards/NNNNN/tree-SPACE.npz   one compact tree per metric space
      shards/NNNNN/graph-SPACE.npy  (n, 2 * degree) int32 neighbour lists per metric space
      shards/NNNNN/l1-blocks.npy    (n, l1_blocks) float32 block sums, if the index serves manhattan
                                    (manifest ``l1_blocks`` > 0; indexes without it still load)

A shard is self-contained (its rows, coordinates and trees), so a cluster can search an index that
does not fit one executor shard by shard and merge the per-shard top-k.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch_index.errors import IndexFormatError

logger = logging.getLogger(__name__)

FORMAT: Final[str] = "ecg-similarity-index"
FORMAT_VERSION: Final[int] = 1
MANIFEST: Final[str] = "manifest.json"
#: cells of a content-partitioned index and the shard of each (manifest ``partition``; indexes
#: without one are searched shard by shard in full, as before)
PARTITION_FILE: Final[str] = "partition.npz"


def shard_dir(index_dir: Path, shard: int) -> Path:
    return index_dir / "shards" / f"{shard:05d}"


def file_checksum(path: Path, chunk: int = 8 << 20) -> str:
    """SHA-256 of a file, streamed (index files can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    """What the driver learns from building one shard (small; gathered, never the raw rows)."""

    shard: int
    count: int
    max_norm: float
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256


def write_shard_arrays(index_dir: Path, shard: int, ids: list[str], labels: list[str] | None,
                       signals: np.ndarray, z: np.ndarray, norms: np.ndarray,
                       trees: dict[str, bytes], graphs: dict[str, np.ndarray],
                       extra: dict[str, np.ndarray] | None = None) -> ShardInfo:
    """Write one shard's files (``extra``: more float32 arrays, saved as ``NAME.npy``); return their checksums."""
    d = shard_dir(index_dir, shard)
    d.mkdir(parents=True, exist_ok=True)
    cols = {"id": pa.array(ids, type=pa.string())}
    if labels is not None:
        cols["label"] = pa.array(labels, type=pa.string())
    pq.write_table(pa.table(cols), d / "ids.parquet")
    np.save(d / "signals.npy", np.ascontiguousarray(signals, dtype=np.float32))
    np.save(d / "transform.npy", np.ascontiguousarray(z, dtype=np.float32))
    np.save(d / "norms.npy", np.ascontiguousarray(norms, dtype=np.float32))
    for space, blob in trees.items():
        (d / f"tree-{space}.npz").write_bytes(blob)
    for space, nbrs in graphs.items():
        np.save(d / f"graph-{space}.npy", np.ascontiguousarray(nbrs, dtype=np.int32))
    for name, arr in (extra or {}).items():
        np.save(d / f"{name}.npy", np.ascontiguousarray(arr, dtype=np.float32))
    files = {str(p.relative_to(index_dir)): file_checksum(p) for p in sorted(d.iterdir())}
    return ShardInfo(shard=shard, count=len(ids), max_norm=float(norms.max(initial=0.0)), files=files)


def write_manifest(index_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest last, atomically: a directory without one is not an index."""
    tmp = index_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, index_dir / MANIFEST)
    return index_dir / MANIFEST


def read_manifest(index_dir: Path, *, verify: bool = True) -> dict[str, Any]:
    """Read and check a manifest; with ``verify`` also every file's size and checksum."""
    path = index_dir / MANIFEST
    if not index_dir.is_dir():
        raise IndexFormatError(f"index directory {str(index_dir)!r} does not exist")
    if not path.is_file():
        raise IndexFormatError(f"{str(index_dir)!r} is not an index: no {MANIFEST} (build incomplete?)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{str(path)!r} is not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"index format version {manifest.get('format_version')!r} is not supported; "
            f"this release reads version {FORMAT_VERSION} (rebuild the index)")
    if verify:
        for rel, digest in manifest.get("files", {}).items():
            p = index_dir / rel
            if not p.is_file():
                raise IndexFormatError(f"index file {rel!r} is missing from {str(index_dir)!r}")
            if file_checksum(p) != digest:
                raise IndexFormatError(f"index file {rel!r} is corrupt: checksum does not match the manifest")
    return manifest


def load_npy(path: Path, *, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"cannot read index file {str(path)!r}: {e}") from e
