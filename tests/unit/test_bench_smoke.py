"""The benchmark harness on tiny sizes, so it does not rot; the real studies run on demand (``python -m bench``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from bench import distributed, e2e, recall, report, scaling
from bench.cli import build_parser, main
from bench.data import Perturb, real_records, synthetic
from bench.measure import recall_at_k
from bench.peers import PeerSweep
from bench.systems import PEERS, Sweep

TINY_SWEEP = Sweep(ef=(16, 64), n_probe=(1,), rerank=(16, 64), ivf_nprobe=(1, 4), hnsw_ef=(16, 64), hnsw_m=8)
TINY_PEERS = PeerSweep(pca_dims=(32,), hnsw_ef=(16, 64), k_factor=(4,), ivf_nprobe=(8,), scann_leaves=(4,),
                       scann_reorder=(50,), graph_ef=(16, 64), graph_m=8, ef_construction=32)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


# ---- pieces with hand-worked answers --------------------------------------------------------------------
def test_recall_counts_answers_scoring_at_least_the_kth_true_score():
    truth = np.array([[0.9, 0.8, 0.7], [0.5, 0.5, 0.5]])
    got = np.array([[0.9, 0.7, 0.1], [0.5, -np.inf, 0.5]])  # tie with the 3rd best counts; missing (-inf) not
    assert recall_at_k(got, truth).tolist() == pytest.approx([2 / 3, 2 / 3])


def test_pareto_keeps_only_undominated_points():
    rows = [{"recall": r, "q": q, "id": i} for i, (r, q) in enumerate([(0.5, 100), (0.9, 50), (0.8, 40), (1.0, 10)])]
    assert [r["id"] for r in report.pareto(rows, "q")] == [0, 1, 3]


def test_fit_exponent_recovers_a_power_law():
    assert report.fit_exponent([1e3, 1e4, 1e5], [2.0, 2.0 * 10**0.5, 20.0]) == pytest.approx(0.5)


def test_recommend_takes_the_smallest_ef_good_on_every_query_set():
    rows = [{"system": "hkmeans", "params": f"n_probe=1,ef={ef}", "query_set": qs, "recall": r}
            for ef, qs, r in [(16, "a", 0.99), (16, "b", 0.90), (32, "a", 0.98), (32, "b", 0.97), (64, "a", 1.0),
                              (64, "b", 0.99)]]
    assert report.recommend(rows, "hkmeans", ("ef", "n_probe"), 0.97)["params"] == "n_probe=1,ef=32"
    assert report.recommend(rows, "hkmeans", ("ef", "n_probe"), 0.999) is None


def test_perturb_is_deterministic_and_only_shifts_scales_and_adds_noise():
    x = synthetic(20, 4).corpus
    y = Perturb().apply(x, seed=3)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(y, Perturb().apply(x, seed=3))
    np.testing.assert_array_equal(Perturb(max_shift=0, gain=(1, 1), noise=0).apply(x, seed=3), x)
    shifted = Perturb(max_shift=2, gain=(1, 1), noise=0).apply(x, seed=3)
    assert all(any(np.array_equal(s[2:-2], r[2 - d:len(r) - 2 - d]) for d in range(-2, 3)) for s, r in zip(shifted, x))


def test_real_record_queries_share_no_sample_with_the_corpus(wfdb_dir):
    ds = real_records(wfdb_dir, 10, stride_s=2.0, records=("a103l",))
    starts = np.array([int(i.rsplit("-", 1)[1]) for i in ds.ids])
    assert len(ds.corpus) == len(ds.ids) and ds.queries["unseen"].shape == (10, 2500)
    last_end = starts.max() + 2500
    assert all(not np.array_equal(q, c) for q in ds.queries["unseen"] for c in ds.corpus[starts + 2500 == last_end])


def test_cli_parses_and_rejects():
    args = build_parser().parse_args(["recall", "--cells", "1:single,2:batch", "--ef", "8,16"])
    assert args.cells == ((1, "single"), (2, "batch")) and args.ef == (8, 16)
    assert build_parser().parse_args(["scaling", "--sizes", "1e4,1e5"]).sizes == (10_000, 100_000)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["recall", "--cells", "1:sometimes"])
    with pytest.raises(SystemExit):
        main(["recall", "--datasets", "imaginary"])


# ---- each study end to end, tiny ------------------------------------------------------------------------
def test_recall_study_writes_csv_markdown_and_plots(tmp_path):
    cfg = recall.RecallConfig(n=300, n_queries=6, datasets=("synthetic",), metrics=("euclidean", "manhattan"),
                              sweep=TINY_SWEEP, peer_sweep=TINY_PEERS, repeats=1, min_time=0.001,
                              workdir=tmp_path / "w", out=tmp_path / "out")
    path = recall.run(cfg, "pytest")
    rows = read_csv(tmp_path / "out" / "results.csv")
    systems = {r["system"] for r in rows}
    assert {"exact", "transform", "hkmeans", "numpy", "faiss-flat", "faiss-ivf", "faiss-hnsw"} <= systems
    # every peer answers euclidean; none of them but FAISS's flat/IVF/HNSW has L1
    assert set(PEERS) <= {r["system"] for r in rows if r["metric"] == "euclidean"}
    assert not set(PEERS) & {r["system"] for r in rows if r["metric"] == "manhattan"}
    best_peer = max(float(r["recall"]) for r in rows if r["system"] in PEERS)
    assert best_peer > 0.9  # they are built and searched right, not just listed
    for r in rows:
        if r["system"] in ("exact", "numpy", "faiss-flat"):
            assert float(r["recall"]) == pytest.approx(1.0), r
        assert float(r["qps_1t_single"]) > 0
    text = path.read_text()
    assert "Recommended hkmeans defaults" in text and "Pareto frontier" in text and "best peer" in text
    assert (tmp_path / "out" / "synthetic-300-qps_1t_single.png").stat().st_size > 1000


def test_scaling_study_builds_in_subprocesses(tmp_path):
    cfg = scaling.ScalingConfig(sizes=(200, 400), n_queries=5, metrics=("cosine",), efs=(16, 64), repeats=1,
                                min_time=0.001, workdir=tmp_path / "w", out=tmp_path / "out")
    scaling.run(cfg, "pytest")
    builds = read_csv(tmp_path / "out" / "build.csv")
    assert [int(b["n"]) for b in builds] == [200, 400]
    assert all(float(b["peak_rss_mb"]) >= float(b["rss_after_load_mb"]) > 0 for b in builds)
    assert "Growth with N" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.spark
def test_e2e_study_serves_through_a_real_broker(tmp_path):
    from batch_index.build.shards import BuildConfig, build_index
    from batch_index.corpus.synthetic import SynthConfig, generate

    ids, _, x = generate(0, 300, SynthConfig(seed=0))
    index = build_index(list(ids), x, tmp_path / "index", BuildConfig(n_references=16))
    cfg = e2e.E2EConfig(n=300, index=Path(index), rates=(20.0,), rate_seconds=1.0, burst=30, bursts=2,
                        sustained=(("hkmeans", 30), ("exact", 5)), sustained_metrics=("dot",), distinct_queries=10,
                        serve_args=("--executor-min-batch", "8"), reply_timeout=120, workdir=tmp_path / "w",
                        out=tmp_path / "out")
    e2e.run(cfg, "pytest")
    rows = {r["phase"]: r for r in read_csv(tmp_path / "out" / "results.csv")}
    assert list(rows) == ["steady 20 q/s", "burst of 30 #1", "burst of 30 #2", "sustained hkmeans", "sustained exact",
                          "sustained hkmeans dot"]
    assert rows["sustained hkmeans dot"]["metric"] == "dot"
    assert all(r["missing"] == "0" and float(r["p50_ms"]) > 0 for r in rows.values())
    text = (tmp_path / "out" / "README.md").read_text()
    assert "Start-up" in text and "| executors |" in text  # the burst went to the executors
    assert "every burst of 30 answered within 2 s" in text and "(each: " in text


@pytest.mark.spark
def test_distributed_study_compares_masters(tmp_path):
    cfg = distributed.DistributedConfig(n=300, partitions=2, repeats=1, workdir=tmp_path / "w", out=tmp_path / "out")
    distributed.run(cfg, "pytest")
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [r["master"] for r in rows] == ["local[1]", "local[2]"]
    assert all(float(r["shards_s"]) > 0 for r in rows)


def _ucr_fixture(root: Path, name: str, rng: np.random.Generator) -> None:
    """Two classes of pulse trains (narrow vs wide pulses) at random phase: shift decides nothing."""
    (root / name).mkdir(parents=True)
    t = np.arange(120)
    for split, n in (("TRAIN", 20), ("TEST", 30)):
        lines = []
        for i in range(n):
            label = i % 2 + 1
            width = 2.0 if label == 1 else 6.0
            phase = rng.uniform(0, 40)
            x = sum(np.exp(-0.5 * ((t - phase - c) / width) ** 2) for c in (0, 40, 80, 120))
            x = x + rng.normal(0, 0.05, t.size)
            lines.append("\t".join([str(label), *(f"{v:.5f}" for v in x)]))
        (root / name / f"{name}_{split}.tsv").write_text("\n".join(lines) + "\n")


def test_ucr_study_reads_the_tsv_layout_and_shape_sees_through_phase(tmp_path):
    from bench.cli import main

    _ucr_fixture(tmp_path / "ucr", "ToyPulses", np.random.default_rng(0))
    assert main(["ucr", "--ucr-dir", str(tmp_path / "ucr"), "--datasets", "ToyPulses", "--out",
                 str(tmp_path / "out")]) == 0
    row = json.loads((tmp_path / "out" / "ucr.json").read_text())["rows"][0]
    assert (row["train"], row["test"], row["length"]) == (20, 30, 120)
    assert row["shape"] < row["euclidean"] and row["shape"] <= 0.1
    assert "ToyPulses" in (tmp_path / "out" / "UCR.md").read_text()
    assert main(["ucr", "--ucr-dir", str(tmp_path / "ucr"), "--datasets", "ECG200", "--out",
                 str(tmp_path / "out")]) == 1  # missing set: one clear error line, no traceback


def test_routing_study_writes_its_table(tmp_path):
    from bench import routing

    cfg = routing.RoutingConfig(n=900, shards=2, cells_per_shard=4, n_queries=6, metrics=("cosine", "dot"),
                                workdir=tmp_path / "w", out=tmp_path / "out")
    out = routing.run(cfg, "pytest")
    rows = (out / "routing.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # header, then every probe count of every metric
    md = (out / "README.md").read_text()
    assert "| cosine | 2 |" in md and "time vs all shards" in md


def test_routing_growth_probes_up_to_the_target(tmp_path):
    from bench import routing

    cfg = routing.RoutingConfig(cells_per_shard=4, n_queries=6, metrics=("euclidean",), workdir=tmp_path / "w",
                                out=tmp_path / "out", growth_sizes=(600, 1200), shard_rows=300)
    out = routing.run_growth(cfg, "pytest")
    rows = list(csv.DictReader((out / "growth.csv").open()))
    assert [(int(r["n"]), int(r["shards"])) for r in rows] == [(600, 2), (1200, 4)]
    for r in rows:  # the probe found reaches the target, or is every shard
        assert float(r["recall"]) >= cfg.target or int(r["probe_for_target"]) == int(r["shards"])
        assert 1 <= int(r["probe_for_target"]) <= int(r["shards"])
    assert "probe / shards" in (out / "GROWTH.md").read_text()
