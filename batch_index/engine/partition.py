"""Content partitioning: which shard a signal lives in, and which shards a query visits.

A global k-means over a sample (in reference space, the euclidean coordinates ``z``) cuts it into
``cells_per_shard * n_shards`` fine cells; the cells are packed into ``n_shards`` shards of about equal
sample weight, each cell to the nearest coarse centre (a weighted k-means of the cells) that still has
room. A signal goes to its nearest cell's shard (a row-local decision, so a Spark task can assign
its rows without seeing the others), which keeps similar signals together (IVF, SPANN's postings).

At query time a shard is scored by its best cell under the query's metric and only the best
``n_shards_probe`` shards are searched. The cells (several per shard, not one centroid) are what make
that routing follow the shard's real shape: a shard packed from cells is rarely a ball.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning

from batch_index.errors import IndexFormatError, InvalidInputError

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

#: how far above the mean a shard's share of the sample may grow while cells are packed
BALANCE_SLACK = 1.1


@dataclass(frozen=True)
class Partition:
    """Fine cells in ``z`` space and the shard each belongs to.

    cells : (C, w) float32 centroids; cell_shard : (C,) int64 shard of each cell; radius : (C,) float32
    largest distance from a cell's centroid to a sample member (bounds the dot score of its members)
    """

    cells: F32
    cell_shard: I64
    radius: F32

    @property
    def n_shards(self) -> int:
        return int(self.cell_shard.max()) + 1 if self.cell_shard.size else 0

    def assign(self, z: F32) -> I64:
        """Shard of each row of ``z`` (n, w): its nearest cell's."""
        return self.cell_shard[_nearest(z, self.cells)]

    def renumbered(self, old_of_new: list[int]) -> Partition:
        """The same cells with shards renumbered (``old_of_new[new] = old``; shards not listed dropped)."""
        new_of_old = {old: new for new, old in enumerate(old_of_new)}
        keep = np.array([int(s) in new_of_old for s in self.cell_shard], bool)
        return Partition(self.cells[keep], np.array([new_of_old[int(s)] for s in self.cell_shard[keep]], np.int64),
                         self.radius[keep])

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, cells=self.cells, cell_shard=self.cell_shard, radius=self.radius)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> Partition:
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as f:
                part = cls(np.asarray(f["cells"], np.float32), np.asarray(f["cell_shard"], np.int64),
                           np.asarray(f["radius"], np.float32))
        except (OSError, ValueError, KeyError) as e:
            raise IndexFormatError(f"cannot read the shard partition: {e}") from e
        if part.cells.ndim != 2 or len(part.cells) != len(part.cell_shard) != len(part.radius):
            raise IndexFormatError("shard partition arrays disagree in length")
        return part

    def shard_scores(self, zq: F32, nq: F32, metric: str) -> F32:
        """(nq, n_shards) how promising each shard is for each query (higher: search it first).

        euclidean / manhattan: minus the squared distance to the shard's nearest cell (manhattan is
        served from the euclidean space); cosine: the best cosine to a cell's centroid; dot: the best
        upper bound ``<q, c> + |q| r`` of a cell's members' inner product.
        """
        dots = zq @ self.cells.T
        if metric in ("euclidean", "manhattan"):
            cell = 2.0 * dots - self._cell_sq_norms[None, :]
        elif metric == "cosine":
            cell = dots / np.maximum(self._cell_norms, 1e-12)[None, :]
        elif metric == "dot":
            cell = dots + nq[:, None] * self.radius[None, :]
        else:
            raise InvalidInputError(f"shards cannot be routed for metric {metric!r}")
        out = np.full((len(zq), self.n_shards), -np.inf, np.float32)
        order, shards, starts = self._cells_by_shard
        out[:, shards] = np.maximum.reduceat(cell[:, order], starts, axis=1)
        return out

    # what every routed query needs of the cells, derived once (a server routes one query per call)
    @cached_property
    def _cell_sq_norms(self) -> F32:
        return np.einsum("ij,ij->i", self.cells, self.cells)

    @cached_property
    def _cell_norms(self) -> F32:
        return np.linalg.norm(self.cells, axis=1)

    @cached_property
    def _cells_by_shard(self) -> tuple[I64, I64, I64]:
        """The cells in shard order, the shards that have cells, and where each one's cells start."""
        order = np.argsort(self.cell_shard, kind="stable")
        shards, starts = np.unique(self.cell_shard[order], return_index=True)
        return order, shards, starts

    def route(self, zq: F32, nq: F32, metric: str, n_probe: int) -> I64:
        """(nq, min(n_probe, n_shards)) the shards each query visits, best first."""
        scores = self.shard_scores(zq, nq, metric)
        p = min(n_probe, scores.shape[1])
        top = np.argpartition(-scores, p - 1, axis=1)[:, :p] if p < scores.shape[1] else \
            np.tile(np.arange(scores.shape[1]), (len(zq), 1))
        return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)


def _nearest(z: F32, cells: F32, block: int = 8192) -> I64:
    sq = np.einsum("ij,ij->i", cells, cells)
    out = np.empty(len(z), np.int64)
    for lo in range(0, len(z), block):
        out[lo:lo + block] = np.argmin(sq[None, :] - 2.0 * (z[lo:lo + block] @ cells.T), axis=1)
    return out


def fit_partition(z_sample: F32, n_shards: int, cells_per_shard: int = 16, seed: int = 0) -> Partition:
    """Cells by k-means over a sample of ``z``, packed into ``n_shards`` shards of about equal weight."""
    if n_shards < 1 or cells_per_shard < 1:
        raise InvalidInputError(f"n_shards and cells_per_shard must be >= 1, got {n_shards} and {cells_per_shard}")
    z = np.asarray(z_sample, np.float32)
    n_cells = max(1, min(n_shards * cells_per_shard, len(z)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = (KMeans(n_cells, n_init=1, random_state=seed) if len(z) <= 20_000 else
              MiniBatchKMeans(n_cells, n_init=1, random_state=seed, batch_size=4096)).fit(z)
    cells = km.cluster_centers_.astype(np.float32)
    member = _nearest(z, cells)
    weight = np.bincount(member, minlength=n_cells).astype(np.float64)
    radius = np.zeros(n_cells, np.float32)
    np.maximum.at(radius, member, np.linalg.norm(z - cells[member], axis=1).astype(np.float32))
    used = weight > 0
    cells, weight, radius = cells[used], weight[used], radius[used]
    return Partition(cells, _pack(cells, weight, n_shards, seed), radius)


def _pack(cells: F32, weight: npt.NDArray[np.float64], n_shards: int, seed: int) -> I64:
    """Shard of each cell: nearest coarse centre with room (capacity ``BALANCE_SLACK`` x the mean)."""
    if n_shards == 1 or len(cells) <= n_shards:
        return np.arange(len(cells), dtype=np.int64) % n_shards
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        coarse = KMeans(n_shards, n_init=3, random_state=seed).fit(cells, sample_weight=weight).cluster_centers_
    dist = ((cells[:, None, :] - coarse[None, :, :]) ** 2).sum(axis=2)
    capacity = BALANCE_SLACK * weight.sum() / n_shards
    load = np.zeros(n_shards)
    out = np.full(len(cells), -1, np.int64)
    # cells with the most to lose from a second choice go first; heavy ones before light ones on ties
    prefs = np.argsort(dist, axis=1)
    regret = np.take_along_axis(dist, prefs[:, 1:2], 1)[:, 0] - np.take_along_axis(dist, prefs[:, :1], 1)[:, 0]
    for c in np.lexsort((-weight, -regret)):
        room = [s for s in prefs[c] if load[s] + weight[c] <= capacity]
        s = room[0] if room else int(np.argmin(load))
        out[c], load[s] = s, load[s] + weight[c]
    for s in np.flatnonzero(np.bincount(out, minlength=n_shards) == 0):  # an empty shard takes a cell
        donor = int(np.argmax(np.bincount(out, minlength=n_shards)))
        out[np.flatnonzero(out == donor)[0]] = s
    return out
