"""Hierarchical k-means tree over one shard's points, stored as plain arrays.

Each internal node is split by k-means (``branching`` clusters); every node is represented by the
*real point* nearest its centroid, not by the centroid, so the tree stores only integer point ids and
scores nodes with the same coordinates it scores points with. Leaves own contiguous slices of
``order``. The tree is a frozen dataclass of numpy arrays: pickles, saves and broadcasts as-is.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np
import numpy.typing as npt
from sklearn.cluster import KMeans, MiniBatchKMeans

from batch_index.errors import IndexFormatError, InvalidInputError

logger = logging.getLogger(__name__)

I32 = npt.NDArray[np.int32]
F32 = npt.NDArray[np.float32]
KMEANS_KINDS = ("minibatch", "lloyd")


@dataclass(frozen=True)
class KMeansTree:
    """Arrays of one tree.

    Attributes
    ----------
    rep : (n_nodes,) local index of the real point representing each node (root: nearest the mean)
    child_start, child_count : (n_nodes,) children of a node are ``child_start .. +child_count``
    leaf_start, leaf_count : (n_nodes,) slice of ``order`` owned by a leaf (count 0 for internal nodes)
    order : (n_points,) local point indices, grouped leaf by leaf
    centroid : (n_nodes, w) float32 k-means centroid of each node, for centroid routing
    """

    rep: I32
    child_start: I32
    child_count: I32
    leaf_start: I32
    leaf_count: I32
    order: I32
    centroid: F32

    @property
    def n_nodes(self) -> int:
        return int(self.rep.shape[0])

    @property
    def n_leaves(self) -> int:
        return int(np.count_nonzero(self.child_count == 0))

    def to_bytes(self) -> bytes:
        """Compact serialisation (an uncompressed ``.npz`` of int32 arrays)."""
        buf = io.BytesIO()
        np.savez(buf, **{f.name: getattr(self, f.name) for f in fields(self)})
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> KMeansTree:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return cls(**{f.name: np.asarray(z[f.name], dtype=np.float32 if f.name == "centroid" else np.int32)
                              for f in fields(cls)})
        except (KeyError, ValueError, OSError) as e:
            raise IndexFormatError(f"tree data is not a valid tree: {e}") from e

    def search(self, points: F32, query: F32, n_probe: int, route: str = "centroid", beam: int = 0) -> I32:
        """Beam search: local ids of the points in the ``n_probe`` best leaves for one query.

        The frontier starts at the root's children; each step replaces every internal node by its
        children and keeps the ``beam`` (default ``4 * n_probe``) nodes nearest (L2) to ``query``,
        by centroid or by representative point; the last step keeps ``n_probe`` leaves.
        """
        if self.child_count[0] == 0:
            return self.order
        beam = max(beam or 4 * n_probe, n_probe)
        frontier = np.arange(self.child_start[0], self.child_start[0] + self.child_count[0], dtype=np.int32)
        while True:
            internal = self.child_count[frontier] > 0
            if internal.any():
                inner = frontier[internal]
                kids = _ranges(self.child_start[inner], self.child_count[inner])
                frontier = np.concatenate([frontier[~internal], kids])
                internal = self.child_count[frontier] > 0
            width = beam if internal.any() else n_probe
            if frontier.size > width:
                if route == "representative":
                    diff = points[self.rep[frontier]] - query
                    d = np.einsum("ij,ij->i", diff, diff)
                else:  # ranked by |c|^2 - 2 <c, q>: one GEMV, no difference array
                    d = self._centroid_sq[frontier] - 2.0 * (self.centroid[frontier] @ query)
                frontier = frontier[np.argpartition(d, width - 1)[:width]]
            if not internal.any():
                break
        return self.order[_ranges(self.leaf_start[frontier], self.leaf_count[frontier])]

    @cached_property
    def _centroid_sq(self) -> F32:
        return np.einsum("ij,ij->i", self.centroid, self.centroid)


def _ranges(starts: I32, counts: I32) -> npt.NDArray[np.int64]:
    """``starts[i] .. starts[i] + counts[i] - 1`` for every i, concatenated (without a Python loop)."""
    ends = np.cumsum(counts, dtype=np.int64)
    return np.arange(int(ends[-1]) if ends.size else 0, dtype=np.int64) + np.repeat(starts - (ends - counts), counts)


def _nearest_member(points: F32, members: I32, center: npt.NDArray) -> int:
    diff = points[members] - center
    return int(members[np.argmin(np.einsum("ij,ij->i", diff, diff))])


def build_tree(points: F32, *, branching: int = 16, leaf_size: int = 64, max_depth: int = 12,
               kmeans: str = "minibatch", seed: int = 0) -> KMeansTree:
    """Build a tree over ``points`` (shape (n, w)) breadth-first; deterministic for a given seed."""
    n = points.shape[0]
    if n == 0:
        raise InvalidInputError("cannot build a tree over zero points")
    if branching < 2 or leaf_size < 1:
        raise InvalidInputError(f"need branching >= 2 and leaf_size >= 1, got {branching} and {leaf_size}")
    if kmeans not in KMEANS_KINDS:
        raise InvalidInputError(f"unknown kmeans {kmeans!r}; expected one of {KMEANS_KINDS}")
    rep: list[int] = [_nearest_member(points, np.arange(n, dtype=np.int32), points.mean(axis=0))]
    cent: list[npt.NDArray] = [points.mean(axis=0)]
    child_start, child_count, leaf_start, leaf_count = [0], [0], [0], [0]
    order: list[I32] = []
    placed = 0  # members already in leaves (a running total: summing ``order`` each time is quadratic)
    queue: deque[tuple[int, I32, int]] = deque([(0, np.arange(n, dtype=np.int32), 0)])
    rng = np.random.default_rng(seed)
    while queue:
        node, members, depth = queue.popleft()
        groups = None
        if members.size > leaf_size and depth < max_depth:
            groups = _split(points, members, branching, kmeans, int(rng.integers(2**31 - 1)))
        if groups is None:
            leaf_start[node] = placed
            leaf_count[node] = members.size
            order.append(members)
            placed += members.size
            continue
        child_start[node] = len(rep)
        child_count[node] = len(groups)
        for members_c, center in groups:
            queue.append((len(rep), members_c, depth + 1))
            rep.append(_nearest_member(points, members_c, center))
            cent.append(center)
            child_start.append(0)
            child_count.append(0)
            leaf_start.append(0)
            leaf_count.append(0)
    def as32(v: list[int]) -> I32:
        return np.asarray(v, dtype=np.int32)

    return KMeansTree(rep=as32(rep), child_start=as32(child_start), child_count=as32(child_count),
                      leaf_start=as32(leaf_start), leaf_count=as32(leaf_count),
                      order=np.concatenate(order).astype(np.int32),
                      centroid=np.asarray(cent, dtype=np.float32))


def _split(points: F32, members: I32, branching: int, kmeans: str, seed: int
           ) -> list[tuple[I32, npt.NDArray]] | None:
    """k-means split of ``members``; None when the points cannot be separated (e.g. duplicates)."""
    k = min(branching, members.size)
    x = points[members]
    if kmeans == "lloyd" or members.size <= 4 * 1024:
        km: KMeans | MiniBatchKMeans = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=50)
    else:
        km = MiniBatchKMeans(n_clusters=k, n_init=3, random_state=seed, batch_size=2048)
    labels = km.fit_predict(x)
    groups = [(members[labels == c], km.cluster_centers_[c]) for c in range(k)]
    groups = [g for g in groups if g[0].size]
    return groups if len(groups) > 1 else None
