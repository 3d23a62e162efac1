"""``python -m streaming``: the parser, input loading, and serve/send/send-one as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from batch_index.corpus.files import write_corpus
from batch_index.engine.metrics import scores, top_k
from streaming.cli import build_parser, load_sample, main

REPO = Path(__file__).resolve().parents[2]


def test_parser_env_defaults_and_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "h:1")
    monkeypatch.setenv("ECG_MAX_QUERIES_PER_BATCH", "77")
    args = build_parser().parse_args(["serve", "--index", "ix"])
    assert (args.bootstrap, args.max_queries_per_batch, args.queries_topic) == ("h:1", 77, "ecg-queries")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    assert "KAFKA_BOOTSTRAP" in capsys.readouterr().out


def test_where_batches_are_answered_follows_the_master() -> None:
    from streaming.config import ConfigError, ServeConfig

    local = ServeConfig(bootstrap="h:1", index="ix")
    assert local.executor_threshold == 0 and local.driver_threads >= 1  # executors are the driver's own cores
    assert ServeConfig(bootstrap="h:1", index="ix", master="spark://m:7077").executor_threshold == 128
    assert ServeConfig(bootstrap="h:1", index="ix", executor_min_batch=5).executor_threshold == 5
    assert ServeConfig(bootstrap="h:1", index="ix", search_threads=3).driver_threads == 3
    with pytest.raises(ConfigError, match="search threads"):
        ServeConfig(bootstrap="h:1", index="ix", search_threads=0)
    args = build_parser().parse_args(["serve", "--bootstrap", "h:1", "--index", "ix", "--search-threads", "2"])
    assert (args.search_threads, args.executor_min_batch) == (2, None)


def test_gc_pauses_are_counted() -> None:
    import gc

    from streaming.probes import GcPauses

    pauses = GcPauses()
    try:
        junk = [[i] for i in range(200_000)]
        gc.collect()
        assert pauses.total_ms > 0
        del junk
    finally:
        pauses.close()
    before = pauses.total_ms
    gc.collect()
    assert pauses.total_ms == before  # closed: no longer counting


def test_usage_errors_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["send", "--queries", "q.parquet", "--metric", "cosine", "--output", "o.parquet"])
    assert e.value.code == 2 and "--bootstrap is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["send", "--bootstrap", "h:1", "--queries", "q", "--metric", "hamming", "--output", "o"])
    assert e.value.code == 2


def test_user_errors_are_one_clean_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["send", "--bootstrap", "127.0.0.1:1", "--queries", str(tmp_path / "missing.parquet"),
               "--metric", "cosine", "--output", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "does not exist" in err and "Traceback" not in err


def test_load_sample_formats(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "one.npy", x[0])
    np.save(tmp_path / "many.npy", x)
    np.savetxt(tmp_path / "one.csv", x[1][None, :], delimiter=",")
    write_corpus(tmp_path / "c.parquet", ["a", "b", "c"], x)
    assert load_sample(tmp_path / "one.npy")[1].tolist() == x[0].tolist()
    assert load_sample(tmp_path / "many.npy", row=2)[1].tolist() == x[2].tolist()
    assert load_sample(tmp_path / "one.csv")[1].tolist() == x[1].tolist()
    assert load_sample(tmp_path / "c.parquet", record_id="b") == ("b", pytest.approx(x[1]))
    with pytest.raises(Exception, match="outside"):
        load_sample(tmp_path / "many.npy", row=5)


def test_load_sample_from_wfdb(wfdb_dir: Path) -> None:
    label, sample = load_sample(wfdb_dir / "100.hea", start_s=20)
    assert sample.shape == (2500,) and label.startswith("100-") and np.isfinite(sample).all()


def _wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


def test_serve_send_and_stop(kafka_bootstrap: str, make_topic: Callable[..., str], index_dir: Path,
                             corpus: tuple[list[str], np.ndarray], tmp_path: Path) -> None:
    ids, signals = corpus
    queries, replies = make_topic("q"), make_topic("r")
    rows = [5, 50, 150]
    qfile = write_corpus(tmp_path / "queries.parquet", [f"q{i}" for i in rows], signals[rows])
    np.save(tmp_path / "one.npy", signals[7])
    env = {**os.environ, "KAFKA_BOOTSTRAP": kafka_bootstrap, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "streaming", "serve", "--index", str(index_dir), "--queries-topic", queries,
         "--replies-topic", replies, "--dead-letter-topic", make_topic("dlq"), "--checkpoint", str(tmp_path / "ck")],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        out = tmp_path / "results.parquet"
        send = subprocess.run(
            [sys.executable, "-m", "streaming", "send", "--queries", str(qfile), "--metric", "manhattan",
             "--mode", "exact", "--k", "4", "--output", str(out), "--timeout", "120",
             "--queries-topic", queries, "--replies-topic", replies],
            check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert send.returncode == 0, send.stderr + (tmp_path / "serve.log").read_text()[-3000:]
        table = pq.read_table(out).to_pylist()
        assert [r["query_id"] for r in table] == [f"q{i}" for i in rows for _ in range(4)]
        for i in rows:
            got = [(r["id"], r["rank"]) for r in table if r["query_id"] == f"q{i}"]
            want = top_k(scores(signals[i], signals, "manhattan"), 4)
            assert got == [(ids[j], n + 1) for n, j in enumerate(want)]
        assert all(r["error"] is None and r["latency_ms"] > 0 for r in table)

        one = subprocess.run([sys.executable, "-m", "streaming", "send-one", str(tmp_path / "one.npy"), "--k", "2",
                              "--mode", "exact", "--queries-topic", queries, "--replies-topic", replies],
                             check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert one.returncode == 0, one.stderr
        assert ids[7] in one.stdout.splitlines()[2]  # first match row: the query's own signal
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            rc = serve.wait(60)
        finally:
            if serve.poll() is None:
                serve.kill()
            log.close()
    text = (tmp_path / "serve.log").read_text()
    assert rc == 0, text[-3000:]
    assert "stopped cleanly" in text and '"ok":' in text


def test_send_reports_missing_replies(kafka_bootstrap: str, make_topic: Callable[..., str],
                                      corpus: tuple[list[str], np.ndarray], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, signals = corpus
    qfile = write_corpus(tmp_path / "q.parquet", ["a", "b"], signals[:2])
    out = tmp_path / "o.parquet"
    rc = main(["send", "--bootstrap", kafka_bootstrap, "--queries", str(qfile), "--metric", "cosine",
               "--output", str(out), "--timeout", "1", "--queries-topic", make_topic("q"),
               "--replies-topic", make_topic("r")])  # nobody serves these topics
    assert rc == 1 and "2 of 2 queries got no reply" in capsys.readouterr().err
    assert [r["error"].split(":")[0] for r in pq.read_table(out).to_pylist()] == ["NO_REPLY", "NO_REPLY"]


def test_demo_runs_everything_embedded(tmp_path: Path) -> None:
    demo = subprocess.run([sys.executable, "-m", "streaming", "demo", "--size", "300", "--workdir", str(tmp_path)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert demo.returncode == 0, demo.stdout + demo.stderr[-3000:]
    assert "12/12 answered; stopped cleanly" in demo.stdout
    assert (tmp_path / "index" / "CURRENT").read_text().strip() == "v1"
