"""Sending queries and collecting their replies (used by the CLI, the tests and the benchmarks).

Replies are matched by correlation id; the first reply per id wins (delivery is at-least-once, so a
duplicate carries the same answer; one that does not is counted in :attr:`StreamClient.conflicts`).
The reply consumer is positioned at the true end of the reply topic *before* any query is sent, so no
reply can slip past it.

While the broker is away, queries wait in the producer and are retried until ``message.timeout.ms``
(default 300 s); a query the broker never acknowledged is reported (:attr:`StreamClient.undelivered`,
or :class:`ClientError` from :meth:`StreamClient.flush` naming librdkafka's last error), never silently
dropped. The producer is not idempotent by default (a duplicate query only earns a duplicate reply,
and an idempotent producer does not survive a restart of a broker that keeps its state in memory).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

import numpy.typing as npt
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

import schemas
from streaming.codec import Result, decode_result, encode_query
from streaming.errors import ClientError
from streaming.redaction import redact

logger = logging.getLogger(__name__)



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
        self._config = dict(client_config or {})
        self._errors: list[str] = []  # librdkafka's recent error events: the cause behind a timeout
        conf = {"bootstrap.servers": bootstrap, "logger": logging.getLogger("streaming.client.librdkafka"),
                "error_cb": self._on_error}
        self._sent: dict[str, float] = {}
        self._reply_topic_id: str | None = None
        self._checked_at = time.monotonic()
        self.replies: dict[str, Reply] = {}
        self.duplicates = 0
        self.conflicts: list[str] = []  # ids answered twice with different answers (should stay empty)
        self.undelivered: dict[str, str] = {}  # id -> why the broker never acknowledged the query
        try:
            self._producer = Producer({**conf, "linger.ms": 1, "enable.idempotence": False,
                                       "message.max.bytes": 8 << 20, **self._config})
            self._consumer = Consumer({**conf, "group.id": f"ecg-client-{uuid.uuid4().hex}",
                                       "enable.auto.commit": False, "enable.partition.eof": True,
                                       "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10, **self._config})
            self._admin = AdminClient({**conf, **self._config})
        except KafkaException as e:  # not chained: librdkafka may echo a rejected value, maybe a secret
            raise ClientError(f"invalid Kafka client settings: {redact(str(e.args[0]), self._config)}") from None
        self._seek_to_end(bootstrap, timeout)
        self._warm_up(timeout)

    def _on_error(self, err: KafkaError) -> None:
        self._errors = [*self._errors[-4:], redact(err.str(), self._config)]

    def _why(self) -> str:
        self._producer.poll(0.1)  # error events (e.g. "SSL handshake failed") are delivered by polling
        for m in self._consumer.consume(500, 0.1):
            if m.error() is None:
                self._take(m.key(), m.value())
        proto = self._config.get("security.protocol", "plaintext")
        return f" (security.protocol={proto}" + (f"; last client error: {self._errors[-1]})" if self._errors else ")")

    def _seek_to_end(self, bootstrap: str, timeout: float) -> None:
        """Assign every reply partition at its end and wait until the end is known (read, not reported)."""
        try:
            md = self._consumer.list_topics(self.replies_topic, timeout=timeout)
        except KafkaException as e:
            raise ClientError(f"cannot reach the broker at {bootstrap} within {timeout:g} s: {e.args[0]}"
                              f"{self._why()}") from e
        meta = md.topics.get(self.replies_topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ClientError(f"reply topic {self.replies_topic!r} does not exist "
                              f"({None if meta is None else meta.error}); is the service running?")
        parts = sorted(meta.partitions)
        self._reply_topic_id = self._topic_id()
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

    def _topic_id(self) -> str | None:
        """The reply topic's id now (None if unknown: broker away, or a broker without topic ids)."""
        try:
            desc = self._admin.describe_topics(TopicCollection([self.replies_topic]), request_timeout=2.0)
            tid = desc[self.replies_topic].result(3.0).topic_id
        except Exception:  # any failure only means "unknown now"; the next check asks again
            return None
        return str(tid) if tid is not None and (tid.get_most_significant_bits() or tid.get_least_significant_bits()) \
            else None

    def _follow_recreated_reply_topic(self) -> None:
        """If the reply topic was recreated (e.g. Tansu restarted), read the new one from its beginning.

        Without this the consumer would keep its old position, which on the new log means waiting
        silently until the new log grows past it and missing every reply before that.
        """
        if time.monotonic() - self._checked_at < 2.0:
            return
        self._checked_at = time.monotonic()
        tid = self._topic_id()
        if tid is None or tid == self._reply_topic_id:
            return
        try:
            md = self._consumer.list_topics(self.replies_topic, timeout=5)
        except KafkaException:
            return
        meta = md.topics.get(self.replies_topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return
        logger.warning("reply topic %s was recreated (id %s -> %s); reading it from its beginning",
                       self.replies_topic, self._reply_topic_id, tid)
        self._reply_topic_id = tid
        parts = sorted(meta.partitions)
        self._consumer.assign([TopicPartition(self.replies_topic, p, OFFSET_BEGINNING) for p in parts])

    def _warm_up(self, timeout: float) -> None:
        """Connect the producer now (an idempotent producer's first send otherwise waits ~0.5 s)."""
        try:
            md = self._producer.list_topics(self.queries_topic, timeout=timeout)
        except KafkaException as e:
            raise ClientError(f"cannot reach the broker: {e.args[0]}{self._why()}") from e
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

    def track(self, correlation_id: str) -> None:
        """Collect the reply to a query that was produced by someone else (tests, replays)."""
        self._sent.setdefault(correlation_id, time.monotonic())

    def send_raw(self, raw: bytes, correlation_id: str) -> str:
        """Produce already-encoded bytes keyed by ``correlation_id`` (tests use it for broken messages)."""
        self._sent.setdefault(correlation_id, time.monotonic())

        def on_delivery(err: KafkaError | None, _msg: object) -> None:
            if err is not None:
                self.undelivered[correlation_id] = redact(err.str(), self._config)
                logger.warning("query %s was not acknowledged by the broker: %s", correlation_id, err.str())

        while True:
            try:
                self._producer.produce(self.queries_topic, raw, correlation_id.encode(), on_delivery=on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)
        return correlation_id

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the broker acknowledged (or refused) every query sent; raises after ``timeout`` s."""
        left = self._producer.flush(timeout)
        if left > 0:
            raise ClientError(f"{left} queries not acknowledged by the broker within {timeout:.0f} s; is it "
                              f"reachable?{self._why()}")

    def collect(self, ids: Collection[str], timeout: float) -> dict[str, Reply]:
        """Wait up to ``timeout`` s for a reply to each of ``ids``; returns those that came.

        Ids in :attr:`undelivered` never reached the broker and are not waited for.
        """
        self.flush(timeout)
        want = set(ids) - self.undelivered.keys()
        deadline = time.monotonic() + timeout
        while not want <= self.replies.keys() and time.monotonic() < deadline:
            self.poll(0.05)
        return {i: self.replies[i] for i in want if i in self.replies}

    def poll(self, timeout: float = 0.05) -> int:
        """Read the replies that have arrived (waiting up to ``timeout`` s); returns how many were read."""
        n = 0
        self._follow_recreated_reply_topic()
        for m in self._consumer.consume(500, timeout):
            if m.error() is None:
                self._take(m.key(), m.value())
                n += 1
        self._producer.poll(0)
        return n

    def _take(self, key: bytes | None, value: bytes | None) -> None:
        try:
            res = decode_result(value or b"")
        except schemas.WireFormatError as e:
            logger.warning("skipping a reply that does not decode (key %r): %s", key, e)
            return
        sent = self._sent.get(res.correlation_id)
        if sent is None:
            return  # someone else's reply
        first = self.replies.get(res.correlation_id)
        if first is not None:
            self.duplicates += 1
            if _answer(first.result) != _answer(res):
                self.conflicts.append(res.correlation_id)
                logger.error("query %s answered twice with different answers: %s vs %s", res.correlation_id,
                             _answer(first.result), _answer(res))
            return
        self.replies[res.correlation_id] = Reply(res, (time.monotonic() - sent) * 1000)

    def close(self) -> None:
        self._producer.flush(5)
        self._consumer.close()

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _answer(r: Result) -> tuple[object, ...]:
    """What must be identical between duplicate replies (not their timestamps)."""
    return (r.status, r.error_code, r.metric, r.mode, r.k, r.index_version, tuple(r.matches))


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
