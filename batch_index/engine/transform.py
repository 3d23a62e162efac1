"""The reference transform: every signal described by its relation to N real reference signals.

The references are real corpus members (chosen by k-means on a sample, each the member nearest its
centroid, or farthest-first). A signal's relation to them is its vector of dot products with the
references, whitened into coordinates in the orthonormal basis the references span (a fixed linear map
of those dot products), plus one more coordinate: the norm of the part the references cannot explain.

Why this and not raw similarities to the references: with orthonormal coordinates ``z = [Q^T x, |r_x|]``

    |z_q - z_x|  <=  |q - x|          (a lower bound, tight when the references explain the signals)
    <q, x>      <=  <Q^T q, Q^T x> + |r_q| |r_x|

so euclidean, cosine (on unit vectors) and dot product each become an L2 problem in a small space
("metric spaces" below) whose candidates can then be re-ranked exactly on the raw signals. Manhattan
uses the euclidean space (|d|_1 >= |d|_2) and relies on re-ranking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from sklearn.cluster import MiniBatchKMeans

from batch_index.engine.metrics import check_metric
from batch_index.errors import InvalidInputError

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
REFERENCE_METHODS: Final[tuple[str, ...]] = ("sample", "kmeans", "farthest")

#: which L2 space serves which metric
SPACE_OF_METRIC: Final[dict[str, str]] = {
    "euclidean": "euclidean", "manhattan": "euclidean", "cosine": "cosine", "dot": "dot"}


def spaces_for(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """The distinct reference spaces (and so trees per shard) that an index for ``metrics`` needs; the
    shape metrics have spaces of their own (``shape_index``)."""
    return tuple(dict.fromkeys(SPACE_OF_METRIC[m] for m in metrics if check_metric(m) in SPACE_OF_METRIC))


def choose_references(sample: F32, n_references: int, method: str = "kmeans", seed: int = 0
                      ) -> npt.NDArray[np.int64]:
    """Pick ``n_references`` rows of ``sample`` (shape (s, d)) to serve as references.

    ``kmeans`` clusters the sample and keeps, for each centroid, the real member nearest to it, so the
    references cover the corpus the way its mass lies; ``farthest`` is the original design's
    farthest-first traversal (covers the extremes, including artefacts).
    """
    s = sample.shape[0]
    if s == 0:
        raise InvalidInputError("cannot choose references from an empty sample")
    n = min(n_references, s)
    rng = np.random.default_rng(seed)
    if method == "sample":
        return np.sort(rng.choice(s, size=n, replace=False)).astype(np.int64)
    if method == "farthest":
        chosen = [int(rng.integers(s))]
        dist = np.linalg.norm(sample - sample[chosen[0]], axis=1)
        for _ in range(n - 1):
            nxt = int(np.argmax(dist))
            chosen.append(nxt)
            dist = np.minimum(dist, np.linalg.norm(sample - sample[nxt], axis=1))
        return np.asarray(chosen, dtype=np.int64)
    if method != "kmeans":
        raise InvalidInputError(f"unknown reference method {method!r}; expected one of {REFERENCE_METHODS}")
    km = MiniBatchKMeans(n_clusters=n, random_state=seed, n_init=3, batch_size=max(1024, 4 * n))
    labels = km.fit_predict(sample)
    chosen_set: dict[int, None] = {}
    for c in range(n):
        members = np.flatnonzero(labels == c)
        if members.size == 0:
            continue
        d = np.einsum("ij,ij->i", sample[members] - km.cluster_centers_[c], sample[members] - km.cluster_centers_[c])
        chosen_set[int(members[np.argmin(d)])] = None
    return np.asarray(list(chosen_set), dtype=np.int64)


@dataclass(frozen=True)
class ReferenceTransform:
    """Plain arrays, cheap to broadcast: the references and the orthonormal basis they span.

    Attributes
    ----------
    references : array of shape (n_references, d), the real reference signals
    basis : array of shape (d, r), orthonormal columns spanning the references (r <= n_references)
    """

    references: F32
    basis: F32

    @classmethod
    def fit(cls, references: F32, rank: int | None = None) -> ReferenceTransform:
        """Whiten the references' span: its ``rank`` leading right singular vectors.

        The coordinates ``x @ basis`` equal ``(references @ x) @ U_r / s_r``, a fixed linear map of the
        signal's dot products with the references, keeping the directions the references vary most
        in. ``rank=None`` keeps the whole span (the plain orthonormalised references); measured on ECG,
        keeping the leading directions of many references beats the whole span of few (see README).
        """
        refs = np.asarray(references, dtype=np.float64)
        _, sing, vt = np.linalg.svd(refs, full_matrices=False)
        keep = sing > 1e-6 * max(float(sing.max(initial=0.0)), 1e-30)
        if not keep.any():
            raise InvalidInputError("references are all zero; cannot build a transform")
        vt = vt[keep]
        if rank is not None:
            vt = vt[:rank]
        return cls(references=np.asarray(references, dtype=np.float32),
                   basis=np.ascontiguousarray(vt.T, dtype=np.float32))

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @property
    def width(self) -> int:
        """Number of coordinates per signal: the basis size plus the residual norm."""
        return int(self.basis.shape[1]) + 1

    def apply(self, signals: npt.ArrayLike) -> tuple[F32, F32]:
        """Map signals of shape (n, d) to (z of shape (n, r + 1), norms of shape (n,))."""
        x = np.asarray(signals, dtype=np.float32)
        proj = x @ self.basis
        sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
        resid = np.sqrt(np.maximum(sq - np.einsum("ij,ij->i", proj, proj, dtype=np.float64), 0.0))
        z = np.empty((x.shape[0], self.width), dtype=np.float32)
        z[:, :-1] = proj
        z[:, -1] = resid
        return z, np.sqrt(sq).astype(np.float32)


def space_points(z: F32, norms: F32, space: str, max_norm: float) -> F32:
    """Corpus-side coordinates in the L2 ``space`` serving a metric (see module docstring)."""
    if space == "euclidean":
        return z
    if space == "cosine":
        return (z / np.maximum(norms, 1e-12)[:, None]).astype(np.float32)
    if space == "dot":
        extra = np.sqrt(np.maximum(np.float64(max_norm) ** 2 - norms.astype(np.float64) ** 2, 0.0))
        return np.hstack([z, extra[:, None].astype(np.float32)])
    raise InvalidInputError(f"unknown space {space!r}")


def space_queries(z: F32, norms: F32, space: str) -> F32:
    """Query-side coordinates: like :func:`space_points` but a zero in the dot space's extra axis."""
    if space == "dot":
        return np.hstack([z, np.zeros((z.shape[0], 1), dtype=np.float32)])
    return space_points(z, norms, space, 0.0)
