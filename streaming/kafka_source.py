"""A PySpark streaming data source that reads Kafka with confluent-kafka (no JVM connector needed).

Usage mirrors Spark's own Kafka source, so switching is one format name::

    spark.dataSource.register(KafkaDataSource)
    df = (spark.readStream.format("ckafka")            # or "kafka" with spark-sql-kafka on the classpath
          .option("kafka.bootstrap.servers", "host:9092").option("subscribe", "queries")
          .option("startingOffsets", "earliest").option("maxOffsetsPerTrigger", 1000).load())

Rows have Spark's Kafka columns: ``key`` and ``value`` (binary), ``topic``, ``partition``, ``offset``,
``timestamp``, ``timestampType``. Other ``kafka.*`` options are passed to the consumer (TLS/SASL).

How it reads (see ``shared/KAFKA.md`` for why): a :class:`SimpleDataSourceStreamReader`, so the driver
reads each micro-batch and offsets come from records actually read. Each read ``assign()``\\ s the
partitions at explicit offsets (no consumer group, no rebalance wait) and reads to end-of-partition
(``enable.partition.eof``) rather than to the reported high watermark, which Tansu gets wrong. When
nothing is waiting it long-polls up to ``idleWaitMs`` so an idle stream does not spin. Offsets are
``{"topic": {"partition": next_offset}}``; a partition first seen is read from its beginning. If a
partition's log moved backwards (topic recreated), reading resumes at its new beginning and a
warning says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition
from pyspark.sql.datasource import DataSource, SimpleDataSourceStreamReader
from pyspark.sql.types import StructType

logger = logging.getLogger(__name__)

NAME: Final[str] = "ckafka"
SCHEMA: Final[str] = ("key binary, value binary, topic string, partition int, offset long, "
                      "timestamp timestamp, timestampType int")
Offsets = dict[str, dict[str, int]]
Row = tuple[bytes | None, bytes | None, str, int, int, datetime | None, int]


@dataclass(frozen=True)
class SourceOptions:
    """The source's options (Spark Kafka names where one exists)."""

    bootstrap: str
    topics: tuple[str, ...]
    starting: str = "earliest"             # startingOffsets: earliest | latest
    max_per_trigger: int = 10_000          # maxOffsetsPerTrigger: rate limit, records per micro-batch
    max_bytes_per_trigger: int = 64 << 20  # maxBytesPerTrigger: memory bound (the batch ends past it)
    idle_wait_ms: int = 200                # idleWaitMs: long-poll when nothing is waiting
    read_timeout_ms: int = 10_000          # readTimeoutMs: give up reading to end-of-partition after this
    client: Mapping[str, str] = field(default_factory=dict)  # other kafka.* options, prefix removed

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> SourceOptions:
        opts = {str(k).lower(): str(v) for k, v in options.items()}  # Spark's options are case-insensitive
        bootstrap = opts.get("kafka.bootstrap.servers")
        topics = tuple(t.strip() for t in opts.get("subscribe", "").split(",") if t.strip())
        if not bootstrap or not topics:
            raise ValueError("the ckafka source needs options kafka.bootstrap.servers and subscribe")
        starting = opts.get("startingoffsets", "earliest")
        if starting not in ("earliest", "latest"):
            raise ValueError(f"startingOffsets must be 'earliest' or 'latest', got {starting!r}")
        client = {k.removeprefix("kafka."): v for k, v in opts.items()
                  if k.startswith("kafka.") and k != "kafka.bootstrap.servers"}
        ints = {name: int(opts[key]) for key, name in (("maxoffsetspertrigger", "max_per_trigger"),
                                                       ("maxbytespertrigger", "max_bytes_per_trigger"),
                                                       ("idlewaitms", "idle_wait_ms"),
                                                       ("readtimeoutms", "read_timeout_ms")) if key in opts}
        for name, value in ints.items():
            if value < (0 if name == "idle_wait_ms" else 1):
                raise ValueError(f"source option {name} must be positive, got {value}")
        return cls(bootstrap, topics, starting, client=client, **ints)


class KafkaDataSource(DataSource):
    """``spark.readStream.format("ckafka")``: Kafka via confluent-kafka; see the module docstring."""

    @classmethod
    def name(cls) -> str:
        return NAME

    def schema(self) -> str:
        return SCHEMA

    def simpleStreamReader(self, schema: StructType) -> KafkaStreamReader:
        return KafkaStreamReader(SourceOptions.from_options(self.options))


class KafkaStreamReader(SimpleDataSourceStreamReader):
    """Reads micro-batches on the driver; the consumer is made lazily where the reader runs."""

    def __init__(self, opts: SourceOptions) -> None:
        self.opts = opts
        self._consumer: Consumer | None = None

    def __getstate__(self) -> dict[str, Any]:  # a Consumer cannot be pickled; make a new one on arrival
        return {**self.__dict__, "_consumer": None}

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer({
                "bootstrap.servers": self.opts.bootstrap, "group.id": "ecg-streaming-source",
                "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 10, "fetch.message.max.bytes": 8 << 20,
                "logger": logging.getLogger("streaming.kafka_source.librdkafka"), **self.opts.client})
        return self._consumer

    # ---- SimpleDataSourceStreamReader --------------------------------------------------------------
    def initialOffset(self) -> Offsets:
        if self.opts.starting == "earliest":
            return {t: {} for t in self.opts.topics}  # every partition from its beginning
        tps = [TopicPartition(t, p, OFFSET_END) for t, p in self._partitions(strict=True)]
        _, ends = self._consume(tps, limit=None, stop_at=None, idle_wait=0.0, keep=False)
        return _offsets_json(self.opts.topics, ends)

    def read(self, start: Offsets) -> tuple[Iterator[Row], Offsets]:
        positions = _positions(start)
        tps = [TopicPartition(t, p, positions.get((t, p), OFFSET_BEGINNING)) for t, p in self._partitions()]
        rows, ends = self._consume(tps, limit=self.opts.max_per_trigger, stop_at=None,
                                   idle_wait=self.opts.idle_wait_ms / 1000, max_bytes=self.opts.max_bytes_per_trigger)
        for (t, p), off in ends.items():
            if (t, p) in positions and off < positions[(t, p)]:
                logger.warning("%s[%d]: offsets moved backwards from %d to %d (topic recreated?); reading "
                               "from its new beginning", t, p, positions[(t, p)], off)
        return iter(rows), _offsets_json(self.opts.topics, {**positions, **ends})

    def readBetweenOffsets(self, start: Offsets, end: Offsets) -> Iterator[Row]:
        """Re-read a batch deterministically after a restart (called from the checkpoint's offset log)."""
        begin, stop = _positions(start), _positions(end)
        tps = [TopicPartition(t, p, begin.get((t, p), OFFSET_BEGINNING)) for (t, p), e in stop.items()
               if begin.get((t, p)) != e]
        rows, _ = self._consume(tps, limit=None, stop_at=stop, idle_wait=0.0)
        return iter(rows)

    def commit(self, end: Offsets) -> None:
        logger.debug("committed through %s", end)

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    # ---- reading ------------------------------------------------------------------------------------
    def _partitions(self, *, strict: bool = False) -> list[tuple[str, int]]:
        """Partitions of the subscribed topics; none (with a warning) while the broker is unreachable."""
        try:
            md = self.consumer.list_topics(timeout=self.opts.read_timeout_ms / 1000)
        except KafkaException as e:
            if strict:
                raise
            logger.warning("broker unreachable (%s); no new queries this trigger", e.args[0])
            return []
        out = []
        for t in self.opts.topics:
            meta = md.topics.get(t)
            if meta is None or meta.error is not None:
                logger.warning("topic %s is not available yet (%s)", t, None if meta is None else meta.error)
                continue
            out.extend((t, p) for p in sorted(meta.partitions))
        return out

    def _consume(self, tps: list[TopicPartition], *, limit: int | None, stop_at: dict[tuple[str, int], int] | None,
                 idle_wait: float, keep: bool = True, max_bytes: int | None = None
                 ) -> tuple[list[Row], dict[tuple[str, int], int]]:
        """Read ``tps`` from their offsets to end-of-partition (or to ``stop_at``), at most ``limit`` rows
        (and ``max_bytes`` of values, past which the batch ends early).

        Returns the rows (none unless ``keep``) and, per partition, the offset after its last row (or,
        when not keeping rows, the end-of-partition offset).
        """
        rows: list[Row] = []
        ends: dict[tuple[str, int], int] = {}
        if not tps:
            time.sleep(idle_wait)
            return rows, ends
        c = self.consumer
        c.assign(tps)
        wanted = {(tp.topic, tp.partition) for tp in tps}
        done: set[tuple[str, int]] = set()  # at end-of-partition (or past stop_at) since its last row
        reported: set[int] = set()  # error codes already logged in this call
        size = 0
        t0 = time.monotonic()
        while (limit is None or len(rows) < limit) and (max_bytes is None or size < max_bytes):
            elapsed = time.monotonic() - t0
            if done >= wanted and (rows or stop_at is not None or elapsed >= idle_wait):
                break
            if elapsed > self.opts.read_timeout_ms / 1000:
                if stop_at is not None:  # a replay must be complete, or the batch would differ
                    raise TimeoutError(f"could not re-read {sorted(wanted - done)} up to {stop_at} "
                                       f"within {self.opts.read_timeout_ms} ms")
                logger.warning("no end-of-partition from %s within %d ms; ending the batch early",
                               sorted(wanted - done), self.opts.read_timeout_ms)
                break
            n = 500 if limit is None else min(500, limit - len(rows))
            for m in c.consume(n, timeout=0.005):
                tp = (m.topic(), m.partition())
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        done.add(tp)
                        if not keep:
                            ends[tp] = m.offset()
                    elif err.fatal():
                        raise KafkaException(err)
                    elif err.code() not in reported:
                        reported.add(err.code())
                        logger.warning("reading %s[%s]: %s", m.topic(), m.partition(), err)
                    continue
                off = m.offset()
                if tp in done and stop_at is not None:
                    continue
                if stop_at is not None and off >= stop_at.get(tp, 0):
                    done.add(tp)
                    continue
                done.discard(tp)
                ends[tp] = off + 1
                if keep:
                    size += len(m.value() or b"") + len(m.key() or b"")
                    ts_type, ts = m.timestamp()
                    rows.append((m.key(), m.value(), m.topic(), m.partition(), off,
                                 datetime.fromtimestamp(ts / 1000, timezone.utc) if ts_type else None, ts_type))
                    if max_bytes is not None and size >= max_bytes:
                        break  # the rest of this fetch is read again by the next micro-batch
                if stop_at is not None and off + 1 >= stop_at.get(tp, 0):
                    done.add(tp)
        return rows, ends


def _positions(offsets: Offsets) -> dict[tuple[str, int], int]:
    return {(t, int(p)): int(o) for t, parts in offsets.items() for p, o in parts.items()}


def _offsets_json(topics: tuple[str, ...], pos: Mapping[tuple[str, int], int]) -> Offsets:
    """Offsets in a canonical order (Spark compares them as JSON text)."""
    return {t: {str(p): pos[(tt, p)] for tt, p in sorted(pos) if tt == t} for t in topics}
