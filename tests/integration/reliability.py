"""Helpers of the reliability tests (``test_reliability_*.py``): running jobs, reading topics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from batch_index.engine.metrics import scores, top_k
from streaming.config import ServeConfig
from streaming.handler import BatchHandler
from streaming.job import start_query, stop_gracefully
from streaming.topic_keeper import TopicKeeper

REPLY_TIMEOUT = 120.0  # generous: the machines running CI can be busy


@contextlib.contextmanager
def running(spark: Any, cfg: ServeConfig, handler: BatchHandler | None = None, *,
            keeper_interval_s: float | None = None) -> Iterator[tuple[BatchHandler, Any]]:
    """The job on the session's SparkSession (and a TopicKeeper when asked): (handler, query)."""
    handler = handler or BatchHandler(cfg)
    query = start_query(spark, cfg, handler)
    keeper = TopicKeeper(cfg, keeper_interval_s).start() if keeper_interval_s else None
    try:
        yield handler, query
    finally:
        if keeper is not None:
            keeper.stop()
        stop_gracefully(query)


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def brute_force(signals: np.ndarray, ids: Sequence[str], q: np.ndarray, metric: str, k: int) -> list[str]:
    """Ids of the exact top-k of ``q`` (the ground truth of exact mode)."""
    return [ids[i] for i in top_k(scores(q, signals, metric), k)]


def produce(bootstrap: str, topic: str, messages: Sequence[tuple[bytes | None, bytes | None]],
            metadata: Sequence[dict[str, Any]] | None = None) -> list[tuple[int, int]]:
    """Produce (key, value) pairs in order, each with its ``metadata`` (``Producer.produce`` keyword
    arguments: timestamp, headers) if given; returns each one's (partition, offset)."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 64 << 20})
    where: list[tuple[int, int] | None] = [None] * len(messages)

    def ack(i: int) -> Callable[[KafkaError | None, Any], None]:
        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            assert err is None, err
            where[i] = (msg.partition(), msg.offset())
        return on_delivery

    for i, (key, value) in enumerate(messages):
        while True:
            try:
                p.produce(topic, value, key, on_delivery=ack(i), **(metadata[i] if metadata else {}))
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(60) == 0
    assert all(w is not None for w in where)
    return [w for w in where if w is not None]


def read_topic(bootstrap: str, topic: str, *, n: int | None = None, timeout: float = 30.0
               ) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """Every record of ``topic`` from the beginning: (partition, offset, key, value).

    Reads until ``n`` records (or, without ``n``, until every partition reached its end), at most
    ``timeout`` seconds.
    """
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "reliability-tests", "enable.auto.commit": False,
                  "enable.partition.eof": True, "fetch.message.max.bytes": 8 << 20})
    md = c.list_topics(topic, timeout=10)
    parts = sorted(md.topics[topic].partitions)
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    out: list[tuple[int, int, bytes | None, bytes | None]] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if n is not None and len(out) >= n:
            break
        if n is None and at_end >= set(parts):
            break
        for m in c.consume(500, 0.1):
            if m.error() is None:
                at_end.discard(m.partition())
                out.append((m.partition(), m.offset(), m.key(), m.value()))
            elif m.error().code() == KafkaError._PARTITION_EOF:
                at_end.add(m.partition())
    c.close()
    return out
