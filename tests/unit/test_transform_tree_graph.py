"""Reference transform bounds, tree invariants and graph construction, on plain arrays (no Spark)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from batch_index.engine.graph import build_graph
from batch_index.engine.transform import ReferenceTransform, choose_references, space_points, space_queries
from batch_index.engine.tree import KMeansTree, build_tree
from batch_index.errors import InvalidInputError


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    # low-rank signal + noise, like ECG windows: most energy in a few directions
    basis = rng.normal(size=(12, 200))
    return (rng.normal(size=(800, 12)) @ basis + 0.3 * rng.normal(size=(800, 200))).astype(np.float32)


def test_basis_is_orthonormal_and_rank_capped(data: np.ndarray) -> None:
    t = ReferenceTransform.fit(data[:100], rank=20)
    np.testing.assert_allclose(t.basis.T @ t.basis, np.eye(20), atol=1e-5)
    assert t.width == 21


def test_reference_space_distance_is_a_lower_bound(data: np.ndarray) -> None:
    t = ReferenceTransform.fit(data[:64], rank=16)
    z, norms = t.apply(data)
    np.testing.assert_allclose(norms, np.linalg.norm(data, axis=1), rtol=1e-5)
    lb = np.linalg.norm(z[:1] - z[1:], axis=1)
    true = np.linalg.norm(data[:1] - data[1:], axis=1)
    assert np.all(lb <= true * (1 + 1e-4) + 1e-4)
    # and the dot product is bounded above by <Pq, Px> + |r_q||r_x|
    ub = z[1:, :-1] @ z[0, :-1] + z[1:, -1] * z[0, -1]
    assert np.all(data[1:] @ data[0] <= ub + 1e-2)


def test_dot_space_orders_like_the_upper_bound(data: np.ndarray) -> None:
    t = ReferenceTransform.fit(data[:64], rank=16)
    z, norms = t.apply(data)
    pts = space_points(z, norms, "dot", float(norms.max()))
    q = space_queries(z[:1], norms[:1], "dot")[0]
    by_l2 = np.argsort(((pts - q) ** 2).sum(axis=1), kind="stable")
    ub = z[:, :-1] @ z[0, :-1] + z[:, -1] * z[0, -1]
    assert by_l2[:20].tolist() == np.argsort(-ub, kind="stable")[:20].tolist()


@pytest.mark.parametrize("method", ["sample", "kmeans", "farthest"])
def test_references_are_distinct_real_rows(data: np.ndarray, method: str) -> None:
    idx = choose_references(data, 32, method, seed=1)
    assert len(set(idx.tolist())) == len(idx) <= 32
    assert idx.min() >= 0 and idx.max() < len(data)
    np.testing.assert_array_equal(idx, choose_references(data, 32, method, seed=1))


def test_choose_references_rejects_unknown_method(data: np.ndarray) -> None:
    with pytest.raises(InvalidInputError, match="unknown reference method"):
        choose_references(data, 4, "random-walk")


def _subtree_points(tree: KMeansTree, node: int) -> set[int]:
    if tree.child_count[node] == 0:
        return set(tree.order[tree.leaf_start[node]:tree.leaf_start[node] + tree.leaf_count[node]].tolist())
    out: set[int] = set()
    for c in range(tree.child_start[node], tree.child_start[node] + tree.child_count[node]):
        out |= _subtree_points(tree, c)
    return out


def test_tree_invariants(data: np.ndarray) -> None:
    tree = build_tree(data, branching=4, leaf_size=30, seed=0)
    assert sorted(tree.order.tolist()) == list(range(len(data)))  # every point in exactly one leaf
    leaves = tree.child_count == 0
    assert tree.leaf_count[leaves].max() <= 30 and tree.leaf_count[leaves].min() >= 1
    assert tree.child_count.max() <= 4
    for node in range(tree.n_nodes):  # each node's representative is a real member of its subtree
        assert int(tree.rep[node]) in _subtree_points(tree, node)
    assert _subtree_points(tree, 0) == set(range(len(data)))


def test_tree_representative_is_member_nearest_centroid(data: np.ndarray) -> None:
    tree = build_tree(data, branching=4, leaf_size=30, seed=0)
    for node in range(1, tree.n_nodes):
        members = np.array(sorted(_subtree_points(tree, node)))
        d = ((data[members] - tree.centroid[node]) ** 2).sum(axis=1)
        assert tree.rep[node] == members[np.argmin(d)]


def test_tree_round_trips_and_is_deterministic(data: np.ndarray) -> None:
    a = build_tree(data, branching=4, leaf_size=30, seed=5)
    b = KMeansTree.from_bytes(a.to_bytes())
    c = pickle.loads(pickle.dumps(a))
    for t in (b, c, build_tree(data, branching=4, leaf_size=30, seed=5)):
        for name in ("rep", "child_start", "child_count", "leaf_start", "leaf_count", "order", "centroid"):
            np.testing.assert_array_equal(getattr(a, name), getattr(t, name))


def test_tree_search_probing_every_leaf_returns_every_point(data: np.ndarray) -> None:
    tree = build_tree(data, branching=4, leaf_size=30, seed=0)
    got = tree.search(data, data[0], n_probe=tree.n_leaves)
    assert sorted(got.tolist()) == list(range(len(data)))
    one = tree.search(data, data[0], n_probe=1)
    assert 0 in one.tolist() or len(one) <= 30  # the nearest leaf usually holds the point itself


def test_tree_handles_duplicates_without_recursing_forever() -> None:
    pts = np.ones((100, 5), dtype=np.float32)
    tree = build_tree(pts, branching=4, leaf_size=10)
    assert sorted(tree.order.tolist()) == list(range(100))


def test_graph_forward_neighbours_are_exact_knn(data: np.ndarray) -> None:
    g = build_graph(data, degree=5, block_bytes=4 * 800 * 64)  # several blocks
    assert g.shape == (800, 12)
    d = ((data[:, None, :] - data[None, :50, :]) ** 2).sum(axis=2)  # check the first 50 rows
    for i in range(50):
        dist = ((data - data[i]) ** 2).sum(axis=1)
        dist[i] = np.inf
        truth = set(np.argsort(dist)[:5].tolist())
        assert truth <= set(g[i][g[i] >= 0].tolist())
    assert d.shape == (800, 50)


def test_clustered_graph_keeps_most_exact_neighbours(data: np.ndarray) -> None:
    exact = build_graph(data, degree=8)
    clustered = build_graph(data, degree=8, cluster_size=150, spill=2, seed=3)  # 6 clusters
    assert clustered.shape == exact.shape
    agree = np.mean([len(set(a[:8]) & set(b[:8])) / 8 for a, b in zip(exact, clustered)])
    assert agree >= 0.8
    np.testing.assert_array_equal(clustered, build_graph(data, degree=8, cluster_size=150, spill=2, seed=3))


def test_every_point_is_named_by_some_neighbour_list(data: np.ndarray) -> None:
    scaled = data * np.linspace(0.2, 5.0, len(data), dtype=np.float32)[:, None]  # norms vary: hubs
    for kwargs in ({}, {"inner_product_cols": scaled.shape[1]}):
        g = build_graph(scaled, degree=4, **kwargs)
        named = np.bincount(g[g >= 0], minlength=len(scaled))
        assert (named > 0).mean() >= 0.995, kwargs


def test_inner_product_graph_links_to_largest_inner_products(data: np.ndarray) -> None:
    g = build_graph(data, degree=5, inner_product_cols=data.shape[1])
    for i in range(20):
        ip = data @ data[i]
        ip[i] = -np.inf
        assert set(np.argsort(-ip)[:5].tolist()) <= set(g[i][g[i] >= 0].tolist())
