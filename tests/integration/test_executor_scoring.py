"""Answering a micro-batch on the executors gives what the driver gives: same replies, dead letters, stats."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from devtools.hostile import hostile_messages
from streaming.codec import decode_dead_letter, decode_result, encode_query
from streaming.config import ServeConfig
from streaming.executor_scoring import answer_on_executors, records_of
from streaming.index_cache import IndexHolder
from streaming.scoring import answer_batch


def _table(corpus: tuple[list[str], np.ndarray], index_dim: int, cfg: ServeConfig) -> pa.Table:
    _, signals = corpus
    rng = np.random.default_rng(5)
    valid = [(f"ok-{i}".encode(), encode_query(f"ok-{i}", signals[int(rng.integers(len(signals)))], metric,
                                               k=5, mode=mode))
             for i, (metric, mode) in enumerate((m, md) for m in ("cosine", "euclidean", "manhattan", "dot")
                                                for md in ("exact", "transform", "hkmeans") for _ in range(3))]
    hostile = [(h.key, h.value) for h in hostile_messages(60, dim=index_dim, max_bytes=cfg.max_message_bytes,
                                                          max_k=cfg.max_k, queries_topic=cfg.queries_topic, seed=3)]
    rows = valid + hostile
    order = rng.permutation(len(rows))
    now = datetime.now(timezone.utc)
    return pa.table({"key": pa.array([rows[i][0] for i in order], pa.binary()),
                     "value": pa.array([rows[i][1] for i in order], pa.binary()),
                     "topic": pa.array([cfg.queries_topic] * len(rows)),
                     "partition": pa.array([0] * len(rows), pa.int32()),
                     "offset": pa.array(range(len(rows)), pa.int64()),
                     "timestamp": pa.array([now] * len(rows), pa.timestamp("us", tz="UTC"))})


def _outcome(messages) -> tuple[dict, list]:
    replies = {}
    for m in messages:
        if m.kind == "reply":
            r = decode_result(m.value)
            replies[r.correlation_id] = (r.status, r.error_code, [(i, round(s, 9), k) for i, s, k in r.matches])
    dead = sorted((d["offset"], d["error_code"]) for d in
                  (decode_dead_letter(m.value) for m in messages if m.kind == "dead_letter"))
    return replies, dead


def test_executors_answer_a_mixed_batch_exactly_as_the_driver(spark: object, index_dir: Path,
                                                             corpus: tuple[list[str], np.ndarray]) -> None:
    cfg = ServeConfig(bootstrap="unused:1", index=str(index_dir), queries_topic="q", max_k=50)
    index = IndexHolder(index_dir).current()
    table = _table(corpus, index.dim, cfg)
    kw = dict(replies_topic="r", dead_letter_topic="dlq", limits=cfg.limits, params={},
              received_at=datetime.now(timezone.utc))
    on_driver, driver_stats = answer_batch(records_of(table), index, **kw)
    on_executors, executor_stats = answer_on_executors(spark, records_of(table), index, **kw)  # type: ignore[arg-type]
    assert _outcome(on_executors) == _outcome(on_driver)
    replies, dead = _outcome(on_driver)
    assert sum(s == "ok" for s, _, _ in replies.values()) == 36 and len(dead) == 60
    for key in ("records", "ok", "dead_letters", "errors", "offsets"):
        assert getattr(executor_stats, key) == getattr(driver_stats, key), key
