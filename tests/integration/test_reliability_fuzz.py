"""Promise 3, bad input is contained: hostile messages interleaved with valid queries.

Every hostile message earns a dead letter (raw bytes, topic, partition, offset, reason) and, when it
names a correlation id, an error reply to it; every valid query in the same batches is answered
correctly; the job stays up. ``tools/fault_injection.py --only fuzz`` runs the 10,000-message version.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from confluent_kafka.admin import AdminClient

from devtools.hostile import HOSTILE_KINDS, HOSTILE_TIMESTAMPS, hostile_messages
from streaming.client import StreamClient
from streaming.codec import decode_dead_letter, decode_result, encode_query
from streaming.config import ServeConfig
from streaming.index_cache import IndexHolder
from streaming.scoring import Record, answer_batch

from .reliability import REPLY_TIMEOUT, brute_force, produce, read_topic, running

METRICS = ("cosine", "euclidean", "manhattan", "dot")


def _valid(signals: np.ndarray, n: int, seed: int) -> dict[str, tuple[bytes, int, str]]:
    """``n`` valid exact-mode queries: correlation id -> (message, corpus row, metric)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        row, metric = int(rng.integers(len(signals))), METRICS[i % len(METRICS)]
        cid = f"valid-{seed}-{i}"
        out[cid] = (encode_query(cid, signals[row], metric, k=3, mode="exact"), row, metric)
    return out


def test_every_kind_of_hostile_message_is_contained_by_answer_batch(
        index_dir: Path, corpus: tuple[list[str], np.ndarray]) -> None:
    """2,500 hostile messages (100 of each kind) among 250 valid ones, in batches, without a broker."""
    ids, signals = corpus
    cfg = ServeConfig(bootstrap="unused:1", index=str(index_dir), queries_topic="q", max_message_bytes=32 << 10,
                      max_k=50)
    index = IndexHolder(index_dir).current()
    hostile = hostile_messages(2500, dim=index.dim, max_bytes=cfg.max_message_bytes, max_k=cfg.max_k,
                               queries_topic=cfg.queries_topic, seed=11)
    valid = _valid(signals, 250, seed=12)
    order = np.random.default_rng(13).permutation(len(hostile) + len(valid))
    items = [*hostile, *valid.items()]
    records = [Record(h.key, h.value, "q", 0, off) if not isinstance(h, tuple) else
               Record(h[0].encode(), h[1][0], "q", 0, off) for off, h in enumerate(items[i] for i in order)]
    outgoing = []
    for start in range(0, len(records), 300):
        out, _ = answer_batch(records[start:start + 300], index, replies_topic="r", dead_letter_topic="dlq",
                              limits=cfg.limits)
        outgoing.extend(out)
    replies = {}
    for m in outgoing:
        if m.kind == "reply":
            res = decode_result(m.value)
            assert res.correlation_id not in replies
            replies[res.correlation_id] = res
    dead = [decode_dead_letter(m.value) for m in outgoing if m.kind == "dead_letter"]
    assert len(dead) == len(hostile)
    for h in hostile:
        if h.reply_id is None:
            continue
        res = replies[h.reply_id]
        assert res.status == "error" and res.error_code in h.codes and res.error_message, (h.kind, res)
    assert Counter(d["error_code"] for d in dead) == Counter(next(iter(h.codes)) for h in hostile)
    for cid, (_, row, metric) in valid.items():
        res = replies[cid]
        assert res.ok and [m[0] for m in res.matches] == brute_force(signals, ids, signals[row], metric, 3)
    assert len(replies) == len(valid) + sum(h.reply_id is not None for h in hostile)


def test_fuzz_through_broker_and_spark_keeps_the_job_up_and_answers_the_valid(
        spark: object, kafka_bootstrap: str, make_topic: Callable[..., str], index_dir: Path,
        corpus: tuple[list[str], np.ndarray], tmp_path: Path) -> None:
    ids, signals = corpus
    cfg = ServeConfig(bootstrap=kafka_bootstrap, index=str(index_dir), queries_topic=make_topic("q", 2),
                      replies_topic=make_topic("r"), dead_letter_topic=make_topic("dlq"),
                      checkpoint=str(tmp_path / "ck"), max_message_bytes=32 << 10, max_k=50,
                      max_queries_per_batch=100, metrics_file=str(tmp_path / "metrics.jsonl"))
    hostile = hostile_messages(10 * len(HOSTILE_KINDS), dim=signals.shape[1], max_bytes=cfg.max_message_bytes,
                               max_k=cfg.max_k, queries_topic=cfg.queries_topic, seed=21)
    valid = _valid(signals, 60, seed=22)
    order = np.random.default_rng(23).permutation(len(hostile) + len(valid))
    items = [(h.key, h.value) for h in hostile] + [(cid.encode(), v[0]) for cid, v in valid.items()]
    meta = [h.produce_kwargs for h in hostile] + [{"timestamp": HOSTILE_TIMESTAMPS[i % len(HOSTILE_TIMESTAMPS)]}
                                                 for i in range(len(valid))]  # valid queries, hostile metadata
    before = set(AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics)
    where = produce(kafka_bootstrap, cfg.queries_topic, [items[i] for i in order], [meta[i] for i in order])
    hostile_at = {where[j]: hostile[i] for j, i in enumerate(order) if i < len(hostile)}

    with StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as client:
        for cid in [*valid, *(h.reply_id for h in hostile if h.reply_id)]:
            client.track(cid)
        with running(spark, cfg) as (handler, query):  # the whole fuzz batch is waiting when the job starts
            replies = client.collect([*valid, *(h.reply_id for h in hostile if h.reply_id)], REPLY_TIMEOUT)
            dead = read_topic(kafka_bootstrap, cfg.dead_letter_topic, n=len(hostile), timeout=REPLY_TIMEOUT)
            late = client.send(signals[7], "cosine", k=1, mode="exact")  # still serving after the fuzz
            assert client.collect([late], REPLY_TIMEOUT)[late].result.matches[0][0] == ids[7]
            assert query.isActive and query.exception() is None

    for cid, (_, row, metric) in valid.items():
        res = replies[cid].result
        assert res.ok and [m[0] for m in res.matches] == brute_force(signals, ids, signals[row], metric, 3), res
    for h in hostile:
        if h.reply_id is not None:
            res = replies[h.reply_id].result
            assert res.status == "error" and res.error_code in h.codes, (h.kind, res)
    letters = [decode_dead_letter(v) for _, _, _, v in dead]
    assert len(letters) == len(hostile)
    by_offset = {(d["partition"], d["offset"]): d for d in letters}
    assert by_offset.keys() == hostile_at.keys()  # one dead letter per hostile message, none for a valid one
    for at, d in by_offset.items():
        h = hostile_at[at]
        assert d["topic"] == cfg.queries_topic and d["error_code"] in h.codes and d["reason"]
        if h.value is not None and len(h.value) <= cfg.max_message_bytes:
            assert d["value"] == h.value  # the raw bytes, untouched
    assert handler.totals["errors"] == len(hostile) and handler.totals["ok"] == len(valid) + 1
    assert handler.totals["undeliverable"] == 0
    assert set(AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics) == before
