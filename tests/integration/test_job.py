"""The streaming job end to end: real broker, real local Spark, real index."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition

from batch_index.engine.metrics import scores, top_k
from batch_index.search import SearchIndex
from streaming.client import StreamClient
from streaming.codec import decode_dead_letter, encode_query
from streaming.config import ServeConfig
from streaming.errors import ConfigError
from streaming.handler import BatchHandler
from streaming.job import start_query, stop_gracefully

REPLY_TIMEOUT = 90.0  # generous: the first micro-batch of a session includes Python worker start-up


@pytest.fixture
def cfg(kafka_bootstrap: str, make_topic: Callable[..., str], index_dir: Path, tmp_path: Path) -> ServeConfig:
    return ServeConfig(bootstrap=kafka_bootstrap, index=str(index_dir), queries_topic=make_topic("q", 2),
                       replies_topic=make_topic("r", 2), dead_letter_topic=make_topic("dlq"),
                       checkpoint=str(tmp_path / "checkpoint"), max_k=100)


@pytest.fixture
def client(cfg: ServeConfig) -> Iterator[StreamClient]:
    with StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as c:
        yield c


@contextlib.contextmanager
def running(spark: object, cfg: ServeConfig) -> Iterator[BatchHandler]:
    handler = BatchHandler(cfg)
    query = start_query(spark, cfg, handler)  # type: ignore[arg-type]
    try:
        yield handler
    finally:
        stop_gracefully(query)


def brute_force(signals: np.ndarray, ids: list[str], q: np.ndarray, metric: str, k: int) -> list[tuple[str, float]]:
    s = scores(q, signals, metric)
    return [(ids[i], float(s[i])) for i in top_k(s, k)]


def test_a_query_in_each_mode_gets_a_correct_reply(spark: object, cfg: ServeConfig, client: StreamClient,
                                                    corpus: tuple[list[str], np.ndarray]) -> None:
    ids, signals = corpus
    rng = np.random.default_rng(3)
    cases = [(mode, metric, int(row)) for mode in ("exact", "transform", "hkmeans")
             for metric, row in zip(("cosine", "euclidean", "manhattan", "dot"), rng.integers(0, len(ids), 4))]
    noisy = {row: signals[row] + rng.normal(0, 0.05, signals.shape[1]).astype(np.float32) for _, _, row in cases}
    version = SearchIndex.load(cfg.index).version
    with running(spark, cfg):
        sent = {client.send(noisy[row], metric, k=5, mode=mode): (mode, metric, row) for mode, metric, row in cases}
        replies = client.collect(sent, REPLY_TIMEOUT)
    assert replies.keys() == sent.keys()
    for cid, (mode, metric, row) in sent.items():
        res = replies[cid].result
        assert res.ok, res
        assert (res.metric, res.mode, res.k, res.index_version) == (metric, mode, 5, version)
        assert [r for _, _, r in res.matches] == [1, 2, 3, 4, 5]
        truth = brute_force(signals, ids, noisy[row], metric, 5)
        if mode == "exact":
            assert [m[0] for m in res.matches] == [t[0] for t in truth]
            np.testing.assert_allclose([m[1] for m in res.matches], [t[1] for t in truth], rtol=1e-9)
        else:  # approximate: scores are exact for the ids found, and the best match is found
            exact_of = {i: float(s) for i, s in zip(ids, scores(noisy[row], signals, metric))}
            np.testing.assert_allclose([m[1] for m in res.matches], [exact_of[m[0]] for m in res.matches],
                                       rtol=1e-9)
            if metric != "dot":  # dot favours large norms, not the query's own row
                assert res.matches[0][0] == ids[row]


def _dead_letters(bootstrap: str, topic: str, n: int, timeout: float = 30.0) -> list[dict]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "t", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        m = c.poll(0.2)
        if m is not None and m.error() is None:
            out.append(decode_dead_letter(m.value()))
    c.close()
    return out


@pytest.mark.parametrize("where", ["driver", "executors"])
def test_mixed_batch_answers_the_valid_and_contains_the_broken(
        spark: object, cfg: ServeConfig, client: StreamClient, corpus: tuple[list[str], np.ndarray], where: str
) -> None:
    cfg = replace(cfg, executor_min_batch=0 if where == "driver" else 2)
    ids, signals = corpus
    good = {client.send(signals[i], "cosine", k=3, mode="exact"): i for i in (0, 10, 20)}
    nan = signals[1].copy()
    nan[7] = np.nan
    broken = {
        "short": (encode_query("short", signals[2][:100], "cosine"), "BAD_LENGTH"),
        "nan": (encode_query("nan", nan, "cosine"), "NON_FINITE"),
        "metric": (encode_query("metric", signals[3], "hamming"), "UNKNOWN_METRIC"),
        "mode": (encode_query("mode", signals[3], "cosine", mode="lsh"), "UNKNOWN_MODE"),
        "k": (encode_query("k", signals[3], "cosine", k=0), "BAD_K"),
        "bigk": (encode_query("bigk", signals[3], "cosine", k=101), "BAD_K"),
        "garbage": (b"\x00not avro at all", "UNDECODABLE"),
        "truncated": (encode_query("truncated", signals[4], "cosine")[:500], "UNDECODABLE"),
    }
    for cid, (raw, _) in broken.items():
        client.send_raw(raw, cid)
    client.flush()  # all produced before the job starts: they share its first micro-batch
    with running(spark, cfg) as handler:
        replies = client.collect(set(good) | set(broken), REPLY_TIMEOUT)
        dead = _dead_letters(cfg.bootstrap, cfg.dead_letter_topic, len(broken))
    assert replies.keys() == set(good) | set(broken)
    for cid, row in good.items():
        res = replies[cid].result
        assert res.ok and res.matches[0][0] == ids[row]
        assert [m[0] for m in res.matches] == [t[0] for t in brute_force(signals, ids, signals[row], "cosine", 3)]
    for cid, (_, code) in broken.items():
        res = replies[cid].result
        assert (res.status, res.error_code, res.matches) == ("error", code, []), res
        assert res.error_message
    assert sorted(d["error_code"] for d in dead) == sorted(code for _, code in broken.values())
    by_id = {d["correlation_id"]: d for d in dead}
    assert by_id["garbage"]["value"] == b"\x00not avro at all"
    assert by_id["short"]["topic"] == cfg.queries_topic and by_id["short"]["offset"] >= 0
    assert handler.totals["ok"] == 3 and handler.totals["errors"] == len(broken)
    assert (handler.totals["executor_batches"] > 0) == (where == "executors")


class CrashingHandler(BatchHandler):
    """Dies inside its first micro-batch, after Spark logged the batch's offsets, before any reply."""

    def __call__(self, df: object, batch_id: int) -> None:
        raise RuntimeError(f"simulated crash in batch {batch_id}")


def test_restart_mid_stream_answers_every_accepted_query(
        spark: object, cfg: ServeConfig, client: StreamClient, corpus: tuple[list[str], np.ndarray]) -> None:
    _, signals = corpus

    def wave(rows: range) -> list[str]:
        return [client.send(signals[i], "euclidean", k=2, mode="hkmeans") for i in rows]

    first = wave(range(20))
    client.flush()
    crashed = start_query(spark, cfg, CrashingHandler(cfg))  # type: ignore[arg-type]
    with pytest.raises(Exception, match="simulated crash in batch 0"):
        crashed.awaitTermination(REPLY_TIMEOUT)
    ckpt = Path(cfg.checkpoint_dir)
    assert (ckpt / "offsets" / "0").exists() and not (ckpt / "commits" / "0").exists()  # batch 0 left open

    with running(spark, cfg):  # replays batch 0 from the checkpoint, then carries on
        assert len(client.collect(first, REPLY_TIMEOUT)) == len(first)
        second = wave(range(20, 60))
        client.flush()
    third = wave(range(60, 80))  # sent while the job is down
    client.flush()
    with running(spark, cfg):
        replies = client.collect(first + second + third, REPLY_TIMEOUT)
    missing = set(first + second + third) - replies.keys()
    assert not missing, f"{len(missing)} accepted queries never answered"
    assert all(r.result.ok for r in replies.values())


def test_jvm_kafka_source_without_its_connector_is_a_clear_config_error(spark: object, cfg: ServeConfig) -> None:
    with pytest.raises(ConfigError, match=r"spark\.jars\.packages=org\.apache\.spark:spark-sql-kafka-0-10"):
        start_query(spark, replace(cfg, source="kafka"))  # type: ignore[arg-type]


def test_shape_queries_get_shift_invariant_replies_over_the_broker(
        spark: object, cfg: ServeConfig, client: StreamClient, corpus: tuple[list[str], np.ndarray],
        tmp_path: Path) -> None:
    """A window cut 0.8 s later than a corpus window (and rescaled) finds it under ``shape``, in every mode."""
    from batch_index.build.shards import BuildConfig, build_index

    ids, signals = corpus
    index = build_index(ids, signals, tmp_path / "shape-index" / "v1",
                        BuildConfig(metrics=("cosine", "shape", "zeuclidean"), n_references=16, shape_rank=16,
                                    seed=1), sampling_rate=250.0)
    cfg = replace(cfg, index=str(index))
    rows = [3, 17, 40]
    moved = {r: (3.0 * np.concatenate([signals[r], signals[r + 1]])[200:2700] - 1.0).astype(np.float32) for r in rows}
    cases = [(mode, metric, r) for mode in ("exact", "hkmeans") for metric in ("shape", "zeuclidean") for r in rows]
    with running(spark, cfg):
        sent = {client.send(moved[r], metric, k=3, mode=mode): (mode, metric, r) for mode, metric, r in cases}
        replies = client.collect(sent, REPLY_TIMEOUT)
    assert replies.keys() == sent.keys()
    for cid, (mode, metric, r) in sent.items():
        res = replies[cid].result
        assert res.ok, res
        assert (res.metric, res.mode) == (metric, mode)
        exact_of = dict(zip(ids, scores(moved[r], signals, metric, max_lag=375)))
        np.testing.assert_allclose([m[1] for m in res.matches], [exact_of[m[0]] for m in res.matches], rtol=1e-9)
        if metric == "shape":  # its source is found first, at a score near the 90% they share
            assert res.matches[0][0] == ids[r] and res.matches[0][1] > 0.8
