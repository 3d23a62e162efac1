"""Sending queries and collecting their replies (used by the CLI, the tests and the benchmarks).

Replies are matched by correlation id; the first reply per id wins (delivery is at-least-once, so a
duplicate carries the same answer). The reply consumer is positioned at the true end of the reply
topic *before* any query is sent, so no reply can slip past it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

import numpy.typing as npt
from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Producer, TopicPartition

import schemas
from batch_index.errors import EcgSearchError
from streaming.codec import Result, decode_result, encode_query

logger = logging.getLogger(__name__)


class ClientError(EcgSearchError):
    """The broker or the reply topic cannot be reached."""


@dataclass(frozen=True)
class Reply:
    result: Result
    latency_ms: float  # this client's clock: produce call -> reply read


class StreamClient:
    """Produces queries to ``queries_topic`` and reads replies from ``replies_topic``."""

    def __init__(self, bootstrap: str, queries_topic: str = "ecg-queries", replies_topic: str = "ecg-replies",
                 client_config: Mapping[str, str] | None = None, *, timeout: float = 15.0) -> None:
        self.queries_topic = queries_topic
        self.replies_topic = replies_topic
        conf = {"bootstrap.servers": bootstrap, "logger": logging.getLogger("streaming.client.librdkafka"),
                **(client_config or {})}
        self._producer = Producer({**conf, "linger.ms": 1, "enable.idempotence": True,
                                   "message.max.bytes": 8 << 20})
        self._consumer = Consumer({**conf, "group.id": f"ecg-client-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "enable.partition.eof": True,
                                   "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})
        self._sent: dict[str, float] = {}
        self.replies: dict[str, Reply] = {}
        self.duplicates = 0
        self._seek_to_end(timeout)
        self._warm_up(timeout)

    def _seek_to_end(self, timeout: float) -> None:
        """Assign every reply partition at its end and wait until the end is known (read, not reported)."""
        try:
            md = self._consumer.list_topics(self.replies_topic, timeout=timeout)
        except KafkaException as e:
            raise ClientError(f"cannot reach the broker: {e.args[0]}") from e
        meta = md.topics.get(self.replies_topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ClientError(f"reply topic {self.replies_topic!r} does not exist "
                              f"({None if meta is None else meta.error}); is the service running?")
        parts = sorted(meta.partitions)
        self._consumer.assign([TopicPartition(self.replies_topic, p, OFFSET_END) for p in parts])
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(parts):
            if time.monotonic() > deadline:
                raise ClientError(f"reply topic {self.replies_topic!r} did not answer within {timeout:.0f} s")
            for m in self._consumer.consume(500, 0.01):
                if m.error() is not None and m.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(m.partition())
                elif m.error() is None:
                    self._take(m.key(), m.value())  # replies already on the way (Tansu's end can lag)

    def _warm_up(self, timeout: float) -> None:
        """Connect the producer now (an idempotent producer's first send otherwise waits ~0.5 s)."""
        try:
            md = self._producer.list_topics(self.queries_topic, timeout=timeout)
        except KafkaException as e:
            raise ClientError(f"cannot reach the broker: {e.args[0]}") from e
        meta = md.topics.get(self.queries_topic)
        if meta is None or meta.error is not None:
            logger.warning("queries topic %s is not available yet (%s)", self.queries_topic,
                           None if meta is None else meta.error)

    def send(self, sample: npt.ArrayLike, metric: str, *, k: int = 10, mode: str = "hkmeans",
             threshold: float | None = None, correlation_id: str | None = None,
             reply_topic: str | None = None) -> str:
        """Produce one query (asynchronously; :meth:`collect` flushes) and return its correlation id."""
        cid = correlation_id or uuid.uuid4().hex
        raw = encode_query(cid, sample, metric, k=k, mode=mode, threshold=threshold, reply_topic=reply_topic)
        return self.send_raw(raw, cid)

    def send_raw(self, raw: bytes, correlation_id: str) -> str:
        """Produce already-encoded bytes keyed by ``correlation_id`` (tests use it for broken messages)."""
        self._sent.setdefault(correlation_id, time.monotonic())
        while True:
            try:
                self._producer.produce(self.queries_topic, raw, correlation_id.encode())
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)
        return correlation_id

    def flush(self, timeout: float = 30.0) -> None:
        if self._producer.flush(timeout) > 0:
            raise ClientError(f"queries not acknowledged by the broker within {timeout:.0f} s")

    def collect(self, ids: Collection[str], timeout: float) -> dict[str, Reply]:
        """Wait up to ``timeout`` s for a reply to each of ``ids``; returns those that came."""
        self.flush(timeout)
        want = set(ids)
        deadline = time.monotonic() + timeout
        while not want <= self.replies.keys() and time.monotonic() < deadline:
            for m in self._consumer.consume(500, 0.05):
                if m.error() is None:
                    self._take(m.key(), m.value())
        return {i: self.replies[i] for i in want if i in self.replies}

    def _take(self, key: bytes | None, value: bytes | None) -> None:
        try:
            res = decode_result(value or b"")
        except schemas.WireFormatError as e:
            logger.warning("skipping a reply that does not decode (key %r): %s", key, e)
            return
        sent = self._sent.get(res.correlation_id)
        if sent is None:
            return  # someone else's reply
        if res.correlation_id in self.replies:
            self.duplicates += 1
            return
        self.replies[res.correlation_id] = Reply(res, (time.monotonic() - sent) * 1000)

    def close(self) -> None:
        self._producer.flush(5)
        self._consumer.close()

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tail(bootstrap: str, topic: str, *, from_beginning: bool = False, client_config: Mapping[str, str] | None = None,
         idle_timeout: float | None = None) -> Iterator[tuple[bytes | None, Result | Exception]]:
    """Yield (key, result or decode error) for each reply on ``topic`` until ``idle_timeout`` s of quiet."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ecg-tail-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest", **(client_config or {})})
    try:
        md = c.list_topics(topic, timeout=15)
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None:
            raise ClientError(f"topic {topic!r} does not exist")
        start = 0 if from_beginning else OFFSET_END
        c.assign([TopicPartition(topic, p, start) for p in sorted(meta.partitions)])
        last = time.monotonic()
        while idle_timeout is None or time.monotonic() - last < idle_timeout:
            m = c.poll(0.2)
            if m is None or m.error() is not None:
                continue
            last = time.monotonic()
            try:
                yield m.key(), decode_result(m.value() or b"")
            except schemas.WireFormatError as e:
                yield m.key(), e
    finally:
        c.close()
