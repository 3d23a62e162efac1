"""A PySpark streaming data source that reads Kafka with confluent-kafka (no JVM connector needed).

Usage mirrors Spark's own Kafka source, so switching is one format name::

    spark.dataSource.register(KafkaDataSource)
    df = (spark.readStream.format("ckafka")            # or "kafka" with spark-sql-kafka on the classpath
          .option("kafka.bootstrap.servers", "host:9092").option("subscribe", "queries")
          .option("startingOffsets", "earliest").option("maxOffsetsPerTrigger", 1000).load())

Rows have Spark's Kafka columns: ``key`` and ``value`` (binary), ``topic``, ``partition``, ``offset``,
``timestamp``, ``timestampType``. Other ``kafka.*`` options are passed to the consumer (TLS/SASL).

How it reads (see ``docs/kafka.md`` for why): a :class:`SimpleDataSourceStreamReader`, so the driver
reads each micro-batch and offsets come from records actually read. Each read ``assign()``\\ s the
partitions at explicit offsets (no consumer group, no rebalance wait) and reads to end-of-partition
(``enable.partition.eof``) rather than to the reported high watermark, which Tansu gets wrong. When
nothing is waiting it long-polls up to ``idleWaitMs`` so an idle stream does not spin.

Offsets are ``{"topic": {"partition": next_offset, ..., "@id": topic_id, "@epoch": n}}``; a partition
first seen is read from its beginning. A topic that was deleted and recreated (a broker that keeps
topics in memory restarted, or an operator recreated it) has a new topic id: reading then restarts at
the new log's beginning, ``@epoch`` counts the restart and a warning says so. (Without that check a
stale position past the new log's end is silently waited for on Tansu, skipping the new log's start;
a position equal to where the new log happens to end looks like "no progress" to Spark.) A log that
moved backwards without a new id (truncation, or a broker without topic ids) is noticed from the
records read and handled the same way. While the broker is unreachable a read returns nothing, so
the query idles instead of failing; a replay of a logged batch after a restart (``readBetweenOffsets``)
waits for the broker, and if that batch's records no longer exist (the topic was recreated) it says
so in an error log and replays what is left.

No record can stop the source: whatever its key, value, headers or timestamp, every record becomes a
row (headers are not read; a timestamp outside what Spark's ``timestamp`` column can hold, years
1-9999 less a day at each end, becomes null with its type kept, and the record is answered like any
other), and a record of any size the broker accepted can be fetched (``receive.message.max.bytes``
at librdkafka's maximum: at its default a record over 100 MB wedged the partition for good, every
fetch failing). Bounding what a record may hold is the decoder's job, downstream, where it earns an
error reply.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from pyspark.sql.datasource import DataSource, SimpleDataSourceStreamReader
from pyspark.sql.types import StructType

from streaming.errors import SourceConfigError

logger = logging.getLogger(__name__)

NAME: Final[str] = "ckafka"
SCHEMA: Final[str] = ("key binary, value binary, topic string, partition int, offset long, "
                      "timestamp timestamp, timestampType int")
ID_KEY: Final[str] = "@id"        # offsets: the topic id the positions belong to
EPOCH_KEY: Final[str] = "@epoch"  # offsets: how many times this topic's log restarted under the query
REPEAT_LOG_S: Final[float] = 30.0  # the same warning is logged at most this often
MAX_KEY_BYTES: Final[int] = 64 << 10  # of a record's key, passed on
Offsets = dict[str, dict[str, Any]]
TP = tuple[str, int]
Row = tuple[bytes | None, bytes | None, str, int, int, datetime | None, int]
_NO_META: Final[tuple[str | None, int]] = (None, 0)
# the timestamps a row carries: Spark's range (years 1-9999) less a day at each end, so that the batch
# shown in any session time zone (UTC-12 .. UTC+14) still falls inside it
_MIN_TS_MS: Final[int] = -62135596800000 + 86_400_000   # 0001-01-02T00:00:00Z
_MAX_TS_MS: Final[int] = 253402300799999 - 86_400_000   # 9999-12-30T23:59:59.999Z



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
    max_read_ms: int = 300                 # maxReadMs: a read holding records ends after this, EOF or not
    quiet_ms: int = 50                     # quietMs: ... or once no record arrived for this long (0: at EOF)
    max_record_bytes: int | None = None    # maxRecordBytes: a longer value reaches Spark cut to this + 1 bytes
    client: Mapping[str, str] = field(default_factory=dict, repr=False)  # other kafka.* options (secrets)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> SourceOptions:
        opts = {str(k).lower(): str(v) for k, v in options.items()}  # Spark's options are case-insensitive
        bootstrap = opts.get("kafka.bootstrap.servers")
        topics = tuple(t.strip() for t in opts.get("subscribe", "").split(",") if t.strip())
        if not bootstrap or not topics:
            raise SourceConfigError("the ckafka source needs options kafka.bootstrap.servers and subscribe")
        starting = opts.get("startingoffsets", "earliest")
        if starting not in ("earliest", "latest"):
            raise SourceConfigError(f"startingOffsets must be 'earliest' or 'latest', got {starting!r}")
        client = {k.removeprefix("kafka."): v for k, v in opts.items()
                  if k.startswith("kafka.") and k != "kafka.bootstrap.servers"}
        ints = {name: int(opts[key]) for key, name in (("maxoffsetspertrigger", "max_per_trigger"),
                                                       ("maxbytespertrigger", "max_bytes_per_trigger"),
                                                       ("idlewaitms", "idle_wait_ms"),
                                                       ("readtimeoutms", "read_timeout_ms"),
                                                       ("maxreadms", "max_read_ms"),
                                                       ("quietms", "quiet_ms"),
                                                       ("maxrecordbytes", "max_record_bytes")) if key in opts}
        for name, value in ints.items():
            if value < (0 if name in ("idle_wait_ms", "quiet_ms") else 1):
                raise SourceConfigError(f"source option {name} must be positive, got {value}")
        return cls(bootstrap, topics, starting, client=client, **ints)


@dataclass(frozen=True)
class TopicState:
    """What the broker says about a subscribed topic now."""

    id: str | None  # None where the broker has no topic ids
    partitions: tuple[int, ...]


@dataclass
class _Fetched:
    rows: list[Row] = field(default_factory=list)
    ends: dict[TP, int] = field(default_factory=dict)    # per partition: the offset after its last row
    firsts: dict[TP, int] = field(default_factory=dict)  # per partition: the offset of its first row
    eof: dict[TP, int] = field(default_factory=dict)     # partitions at end-of-partition: that offset
    done: set[TP] = field(default_factory=set)           # at end-of-partition, or at stop_at


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
    """Reads micro-batches on the driver; the Kafka clients are made lazily where the reader runs."""

    def __init__(self, opts: SourceOptions) -> None:
        self.opts = opts
        self._consumer: Consumer | None = None
        self._admin: AdminClient | None = None
        self._topic_ids = True  # False once the broker turned out not to know topic ids
        self._logged: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:  # clients cannot be pickled; make new ones on arrival
        return {**self.__dict__, "_consumer": None, "_admin": None}

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = self._client(Consumer, {
                "group.id": "ecg-streaming-source", "enable.auto.commit": False, "enable.partition.eof": True,
                "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10, "fetch.message.max.bytes": 8 << 20,
                "receive.message.max.bytes": 2_147_483_647})
        return self._consumer

    @property
    def admin(self) -> AdminClient:
        if self._admin is None:
            self._admin = self._client(AdminClient, {})
        return self._admin

    def _client(self, kind: type[Any], defaults: dict[str, Any]) -> Any:
        """A Kafka client with the user's settings on top; settings librdkafka rejects fail the query."""
        _worker_logging(self.opts.client)
        try:
            return kind({"bootstrap.servers": self.opts.bootstrap, **defaults,
                         "logger": logging.getLogger("streaming.kafka_source.librdkafka"), **self.opts.client})
        except KafkaException as e:  # not chained: librdkafka may echo a rejected value, which may be a secret
            raise SourceConfigError(f"the ckafka source cannot create its Kafka {kind.__name__}: "
                                    f"{_redact(str(e.args[0]), self.opts.client)}") from None

    # ---- SimpleDataSourceStreamReader --------------------------------------------------------------
    def initialOffset(self) -> Offsets:
        if self.opts.starting == "earliest":
            return {t: {} for t in self.opts.topics}  # every partition from its beginning
        state = self._topics(strict=True) or {}
        tps = [TopicPartition(t, p, OFFSET_END) for t, s in state.items() for p in s.partitions]
        got = self._consume(tps, limit=None, stop_at=None, idle_wait=0.0, keep=False)
        return _offsets_json(self.opts.topics, got.ends, {t: (s.id, 0) for t, s in state.items()})

    def read(self, start: Offsets) -> tuple[Iterator[Row], Offsets]:
        positions, meta = _positions(start), _meta(start)
        state = self._topics()
        if not state:  # broker unreachable (already waited) or no subscribed topic exists yet
            time.sleep(self.opts.idle_wait_ms / 1000)
            return iter(()), start
        tps = []
        for t, ts in state.items():
            old_id, epoch = meta.get(t, _NO_META)
            if old_id is not None and ts.id is not None and ts.id != old_id:
                old = {p: o for (tt, p), o in positions.items() if tt == t}
                logger.warning("topic %s was recreated (topic id %s -> %s; e.g. a broker that keeps topics in "
                               "memory restarted): its old log is gone; reading the new log from its beginning "
                               "(positions were %s)", t, old_id, ts.id, old)
                positions = {tp: o for tp, o in positions.items() if tp[0] != t}
                epoch += 1
            meta[t] = (ts.id or old_id, epoch)
            tps.extend(TopicPartition(t, p, positions.get((t, p), OFFSET_BEGINNING)) for p in ts.partitions)
        got = self._consume(tps, limit=self.opts.max_per_trigger, stop_at=None,
                            idle_wait=self.opts.idle_wait_ms / 1000, max_bytes=self.opts.max_bytes_per_trigger,
                            max_read=self.opts.max_read_ms / 1000, quiet=self.opts.quiet_ms / 1000)
        if len(got.done) < len(tps) and not got.rows:
            self._warn_every("no-eof", "no end-of-partition from %s within %d ms; trying again next trigger",
                             sorted(tp for tp in ((x.topic, x.partition) for x in tps) if tp not in got.done),
                             self.opts.read_timeout_ms)
        backwards = {tp: (positions[tp], first) for tp, first in got.firsts.items()
                     if tp in positions and first < positions[tp]}
        for t in sorted({tp[0] for tp in backwards}):
            moved = {p: f"{a}->{b}" for (tt, p), (a, b) in backwards.items() if tt == t}
            logger.warning("topic %s: offsets moved backwards %s (log truncated or topic recreated); reading the "
                           "log from where it now starts", t, moved)
            tid, epoch = meta.get(t, _NO_META)
            meta[t] = (tid, epoch + 1)
        return iter(got.rows), _offsets_json(self.opts.topics, {**positions, **got.ends}, meta)

    def readBetweenOffsets(self, start: Offsets, end: Offsets) -> Iterator[Row]:
        """Re-read a logged batch after a restart (called with the checkpoint's offset log).

        Waits while the broker is unreachable (a replay must be complete, or the batch would differ);
        records that no longer exist (topic recreated, log truncated) are reported and skipped.
        """
        begin, stop = _positions(start), _positions(end)
        m0, m1 = _meta(start), _meta(end)
        pending: dict[TP, int] = {}
        for tp, e in stop.items():
            b = begin.get(tp) if m0.get(tp[0], _NO_META) == m1.get(tp[0], _NO_META) else None
            if e > (b or 0):
                pending[tp] = OFFSET_BEGINNING if b is None else b
        rows: list[Row] = []
        t0 = time.monotonic()
        while pending:
            state = self._topics()
            if state is None:
                self._warn_every("replay-wait", "re-reading batch %s..%s: broker unreachable, waiting (%.0f s so far)",
                                 start, end, time.monotonic() - t0)
                time.sleep(1.0)
                continue
            for t in sorted({tp[0] for tp in pending}):
                ts, want = state.get(t), m1.get(t, _NO_META)[0]
                if ts is None or (want is not None and ts.id is not None and ts.id != want):
                    lost = {tp[1]: f"{o if o >= 0 else 0}..{stop[tp] - 1}" for tp, o in pending.items() if tp[0] == t}
                    logger.error("cannot re-read topic %s partitions %s for a batch being replayed: the topic %s; "
                                 "the queries in those records are lost with the broker's log", t, lost,
                                 "no longer exists" if ts is None else f"was recreated (id {want} -> {ts.id})")
                    pending = {tp: o for tp, o in pending.items() if tp[0] != t}
            if not pending:
                break
            got = self._consume([TopicPartition(t, p, o) for (t, p), o in pending.items()], limit=None,
                                stop_at=stop, idle_wait=0.0)
            rows.extend(got.rows)
            for tp in list(pending):
                if tp in got.done:
                    if tp in got.eof and got.eof[tp] < stop[tp]:
                        logger.error("cannot re-read %s[%d] offsets %d..%d for a batch being replayed: the log now "
                                     "ends at %d (truncated); those queries are lost", tp[0], tp[1],
                                     got.ends.get(tp, max(pending[tp], 0)), stop[tp] - 1, got.eof[tp])
                    del pending[tp]
                elif tp in got.ends:
                    pending[tp] = got.ends[tp]
            if pending:
                self._warn_every("replay-slow", "re-reading batch %s..%s: still waiting for %s (%.0f s so far)",
                                 start, end, sorted(pending), time.monotonic() - t0)
        return iter(rows)

    def commit(self, end: Offsets) -> None:
        logger.debug("committed through %s", end)

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self._admin = None

    # ---- reading ------------------------------------------------------------------------------------
    def _warn_every(self, key: str, msg: str, *args: object) -> None:
        """Log a warning that may repeat every trigger at most once per ``REPEAT_LOG_S``."""
        now = time.monotonic()
        if now - self._logged.get(key, -REPEAT_LOG_S) >= REPEAT_LOG_S:
            self._logged[key] = now
            logger.warning(msg, *args)

    def _topics(self, *, strict: bool = False) -> dict[str, TopicState] | None:
        """The subscribed topics that exist now, with their ids; None while the broker is unreachable.

        A missing topic is left out (with a warning); ``strict`` raises instead of returning None.
        """
        timeout = self.opts.read_timeout_ms / 1000
        if not self._topic_ids:
            return self._listed_topics(strict=strict)
        out: dict[str, TopicState] = {}
        admin = self.admin  # outside the try: invalid settings are not an outage
        try:
            futures = admin.describe_topics(TopicCollection(list(self.opts.topics)), request_timeout=timeout)
            for t, fut in futures.items():
                try:
                    d = fut.result(timeout + 1.0)
                except KafkaException as e:
                    err = e.args[0]
                    if isinstance(err, KafkaError) and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        self._warn_every(f"missing-{t}", "topic %s does not exist (yet); reading nothing from it", t)
                        continue
                    if isinstance(err, KafkaError) and err.code() in (KafkaError._UNSUPPORTED_FEATURE,
                                                                       KafkaError.UNSUPPORTED_VERSION):
                        logger.info("the broker cannot describe topics (%s): recreated topics are noticed only "
                                    "when offsets move backwards", err)
                        self._topic_ids = False
                        return self._listed_topics(strict=strict)
                    raise
                tid = d.topic_id
                known = tid is not None and (tid.get_most_significant_bits() or tid.get_least_significant_bits())
                out[t] = TopicState(str(tid) if known else None, tuple(sorted(p.id for p in d.partitions)))
        except (KafkaException, concurrent.futures.TimeoutError) as e:
            if strict:
                raise
            why = e.args[0] if isinstance(e, KafkaException) and e.args else "timed out"
            self._warn_every("unreachable", "broker unreachable (%s); no new queries until it answers", why)
            return None
        return out

    def _listed_topics(self, *, strict: bool) -> dict[str, TopicState] | None:
        """Like :meth:`_topics` for brokers without topic ids (plain metadata)."""
        consumer = self.consumer
        try:
            md = consumer.list_topics(timeout=self.opts.read_timeout_ms / 1000)
        except KafkaException as e:
            if strict:
                raise
            self._warn_every("unreachable", "broker unreachable (%s); no new queries until it answers", e.args[0])
            return None
        out = {}
        for t in self.opts.topics:
            meta = md.topics.get(t)
            if meta is None or meta.error is not None:
                self._warn_every(f"missing-{t}", "topic %s is not available (yet): %s", t,
                                 None if meta is None else meta.error)
                continue
            out[t] = TopicState(None, tuple(sorted(meta.partitions)))
        return out

    def _consume(self, tps: list[TopicPartition], *, limit: int | None, stop_at: dict[TP, int] | None,
                 idle_wait: float, keep: bool = True, max_bytes: int | None = None, max_read: float | None = None,
                 quiet: float = 0.0) -> _Fetched:
        """Read ``tps`` from their offsets to end-of-partition (or to ``stop_at``), at most ``limit`` rows
        (and ``max_bytes`` of values, past which the batch ends early), for at most ``readTimeoutMs``.

        ``max_read`` (s) ends a read that holds rows even before end-of-partition: under a steady
        stream of queries the end is seldom observed (measured at 100 queries/s on Tansu: reads ran for
        5 s and batches of ~500 queries waited that long), and latency is what a micro-batch is for.
        ``quiet`` (s, 0 = off): a read that holds rows ends once none arrived for that long, whether or
        not end-of-partition was seen, and not at end-of-partition before. A trickle is answered at
        once (10 queries/s: one query per batch, read for ``quiet`` instead of ``max_read``), queries
        sent together are answered together (a 1,000-query burst took ~0.25 s to send here; cut at
        ``max_read`` = 100 ms or at the consumer's first catch-up, its tail waited for the head's answers).

        Rows are kept only with ``keep``; without it, ``ends`` holds each end-of-partition offset.
        """
        got = _Fetched()
        if not tps:
            time.sleep(idle_wait)
            return got
        c = self.consumer
        c.assign(tps)
        wanted = {(tp.topic, tp.partition) for tp in tps}
        reported: set[int] = set()  # error codes already logged in this call
        size = 0
        t0 = first_row = last_row = time.monotonic()
        while (limit is None or len(got.rows) < limit) and (max_bytes is None or size < max_bytes):
            now = time.monotonic()
            elapsed = now - t0
            if got.rows and stop_at is None:
                if quiet and now - last_row >= quiet:
                    break  # the senders paused
                if not quiet and got.done >= wanted:
                    break
                if max_read is not None and now - first_row >= max_read:
                    break  # counted from the first row: a read may have long-polled an idle topic before it
            elif got.done >= wanted and (stop_at is not None or elapsed >= idle_wait):
                break
            if elapsed > self.opts.read_timeout_ms / 1000:
                break  # the caller decides: a read ends its batch, a replay waits and tries again
            n = 500 if limit is None else min(500, limit - len(got.rows))
            for m in c.consume(n, timeout=0.005):
                tp = (m.topic(), m.partition())
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        got.done.add(tp)
                        got.eof[tp] = m.offset()
                        if not keep:
                            got.ends[tp] = m.offset()
                    elif err.fatal():
                        raise KafkaException(err)
                    elif err.code() not in reported:
                        reported.add(err.code())
                        logger.warning("reading %s[%s]: %s", m.topic(), m.partition(), err)
                    continue
                off = m.offset()
                if stop_at is not None and (tp in got.done or off >= stop_at.get(tp, 0)):
                    got.done.add(tp)
                    continue
                got.done.discard(tp)
                got.eof.pop(tp, None)
                got.firsts.setdefault(tp, off)
                got.ends[tp] = off + 1
                last_row = time.monotonic()
                if not got.rows:
                    first_row = last_row
                if keep:
                    size += len(m.value() or b"") + len(m.key() or b"")
                    got.rows.append(_row(m, self.opts.max_record_bytes))
                    if max_bytes is not None and size >= max_bytes:
                        break  # the rest of this fetch is read again by the next micro-batch
                if stop_at is not None and off + 1 >= stop_at.get(tp, 0):
                    got.done.add(tp)
        return got


def _row(m: Any, max_value: int | None) -> Row:
    """The row of one record; never raises (see the module docstring).

    A value over ``max_value`` bytes is cut to ``max_value + 1``: the decoder refuses it as oversize
    all the same, and the rest of it need not be copied through Spark (a 600 MB value compressed into
    a few kilobytes is a record like any other). Keys are cut at :data:`MAX_KEY_BYTES` (an id is 256
    characters at most; a dead letter keeps 1 KiB of a key).
    """
    ts_type, ts = m.timestamp()
    try:
        when = (datetime.fromtimestamp(ts / 1000, timezone.utc)
                if ts_type and _MIN_TS_MS <= ts <= _MAX_TS_MS else None)
    except (OverflowError, OSError, ValueError):  # platforms differ at the edges of the range
        when = None
    key, value = m.key(), m.value()
    if key is not None and len(key) > MAX_KEY_BYTES:
        key = key[:MAX_KEY_BYTES]
    if max_value is not None and value is not None and len(value) > max_value:
        value = value[:max_value + 1]
    return (key, value, m.topic(), m.partition(), m.offset(), when, ts_type)


def _redact(text: str, client: Mapping[str, str]) -> str:
    from streaming.redaction import redact  # here: not needed by readers otherwise

    return redact(text, client)


def _worker_logging(client: Mapping[str, str]) -> None:
    """Give this module's logs a format in Spark's Python workers, where no ``main()`` configured logging.

    The driver's ``python -m streaming`` configures the root logger; a worker process started by the
    JVM has none, and Python's last-resort handler would print bare messages. The level follows
    ``$ECG_LOG_LEVEL`` (the CLI exports its ``--log-level``), WARNING by default. Secret values of the
    Kafka settings are masked, as in the driver.
    """
    from streaming.redaction import SecretFilter

    top = logging.getLogger("streaming")
    if logging.getLogger().handlers or top.handlers:  # a process whose main() set logging up (and its filters)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [spark python worker]: %(message)s"))
    handler.addFilter(SecretFilter(client))
    top.addHandler(handler)
    top.setLevel(os.environ.get("ECG_LOG_LEVEL", "WARNING").upper())
    top.propagate = False


def _positions(offsets: Offsets) -> dict[TP, int]:
    return {(t, int(p)): int(o) for t, parts in offsets.items() for p, o in parts.items() if not p.startswith("@")}


def _meta(offsets: Offsets) -> dict[str, tuple[str | None, int]]:
    return {t: (parts.get(ID_KEY), int(parts.get(EPOCH_KEY, 0))) for t, parts in offsets.items()}


def _offsets_json(topics: tuple[str, ...], pos: Mapping[TP, int],
                  meta: Mapping[str, tuple[str | None, int]] | None = None) -> Offsets:
    """Offsets in a canonical order (Spark compares them as JSON text)."""
    out: Offsets = {}
    for t in topics:
        parts: dict[str, Any] = {str(p): pos[(tt, p)] for tt, p in sorted(pos) if tt == t}
        tid, epoch = (meta or {}).get(t, _NO_META)
        if tid is not None:
            parts[ID_KEY] = tid
        if epoch:
            parts[EPOCH_KEY] = epoch
        out[t] = parts
    return out
