"""The Structured Streaming job: queries topic -> decode, validate, score -> replies (+ dead letters).

Layers: :mod:`streaming.scoring` answers a batch of records with plain numpy; :class:`BatchHandler`
adapts it to ``foreachBatch``; :func:`start_query` wires the DataFrames.

Where queries are answered, and why: in the driver's Python process inside ``foreachBatch``: the
source is a driver-side reader anyway (see :mod:`streaming.kafka_source`), the index is memory-mapped
and loaded once per version in this long-lived process (:mod:`streaming.index_cache`), and no task
launch or Python worker round trip sits on the latency path. The search runs in
``ServeConfig.driver_threads`` threads (its compiled stages release the GIL), so on a local master,
whose executors are the driver's own cores, the driver answers every batch. On a cluster, micro-batches
of ``executor_threshold`` records or more (bursts, backlogs) are answered on the executors, one slice
per core (:mod:`streaming.executor_scoring`), each Python worker holding the same index version
memory-mapped: that is where more cores than the driver's are. For indexes too large for one machine
the shard layout allows scoring shard by shard (``mapInArrow`` over shards, merge top-k on the
driver, as the batch search does).

Delivery is at-least-once: a batch's replies are acknowledged by the broker before ``foreachBatch``
returns, and only then does Spark commit the batch; a crash in between replays the batch from the
checkpoint, which can duplicate replies (same correlation id, same answer) but never lose one.

No record can fail a batch: :func:`streaming.scoring.answer_batch` contains each record's failure,
and should the batch as a whole still raise, :class:`BatchHandler` answers its records one at a time,
each failing one becoming an ``INTERNAL`` dead letter with its coordinates. Offsets the batch skipped
(retention, compaction, transaction markers) are counted (``skipped_offsets``) and logged.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from confluent_kafka import KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from batch_index.errors import EcgSearchError
from streaming.broker import (
    BrokerError,
    SecretFilter,
    admin_client,
    create_topics,
    is_secret_key,
    missing_topics,
    redact,
)
from streaming.codec import DEFAULT_MAX_BYTES, TOPIC_NAME, DecodeError, ErrorCode, Limits
from streaming.executor_scoring import RECORD_COLUMNS, answer_on_executors, records_of, warm_up
from streaming.index_cache import IndexHolder, holder_for
from streaming.offset_gaps import OffsetGaps
from streaming.scoring import BatchStats, Origin, Outgoing, Record, answer_batch, dead_letter, substitute
from streaming.sink import DeliveryReport, Publisher, deliver, forced_conflicts, publisher_for

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

logger = logging.getLogger(__name__)
metrics_logger = logging.getLogger("streaming.metrics")

SOURCES: Final[tuple[str, ...]] = ("ckafka", "kafka")


class ConfigError(EcgSearchError, ValueError):
    """A serve setting is missing or out of range."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``python -m streaming serve`` takes (each flag also has an environment variable)."""

    bootstrap: str
    index: str
    queries_topic: str = "ecg-queries"
    replies_topic: str = "ecg-replies"
    dead_letter_topic: str = "ecg-dead-letters"
    checkpoint: str | None = None          # default: a private per-user state dir (see checkpoint_dir)
    source: str = "ckafka"                 # ckafka (Python, confluent-kafka) | kafka (Spark's JVM connector)
    starting_offsets: str = "earliest"     # for a fresh checkpoint; a restart resumes from the checkpoint
    max_queries_per_batch: int = 2000      # rate control: records per micro-batch
    max_batch_bytes: int = 64 << 20        # ckafka: memory bound per micro-batch (values + keys)
    trigger_ms: int = 0                    # 0 = start the next micro-batch as soon as one ends
    idle_wait_ms: int = 200                # ckafka: long-poll this long when no query is waiting
    max_read_ms: int = 300                 # ckafka: a micro-batch stops reading this long after its first query
    read_quiet_ms: int = 50                # ckafka: at the end of the topic, wait this long for more queries
    max_k: int = 1000
    max_message_bytes: int = DEFAULT_MAX_BYTES
    reply_topic_pattern: str | None = None  # per-query reply topics allowed (fullmatch); None: none
    n_probe: int | None = None             # hkmeans search knobs; None = the per-metric recommended
    ef: int | None = None                  # settings (batch_index.search.DEFAULT_PARAMS)
    rerank: int | None = None
    master: str = "local[2]"
    executor_min_batch: int | None = None  # batches this large are answered on executors; 0 = driver only;
                                           # None: 0 on a local master (same cores), 128 on a cluster
    search_threads: int | None = None      # threads the driver's search uses; None: the driver's cores
    create_topics: bool = True             # create missing queries/replies/dead-letter topics at start
    query_partitions: int = 1
    replication_factor: int = -1           # of the topics the service creates; -1: the broker's default
    metrics_file: str | None = None        # append each batch's metrics as a JSON line
    kafka_options: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # TLS/SASL, passed through
    spark_conf: tuple[tuple[str, str], ...] = ()  # e.g. spark.jars.packages for --source kafka

    def __post_init__(self) -> None:
        if not self.bootstrap:
            raise ConfigError("no broker: pass --bootstrap HOST:PORT or set KAFKA_BOOTSTRAP")
        if not self.index:
            raise ConfigError("no index: pass --index INDEX_DIR or set ECG_INDEX")
        if self.source not in SOURCES:
            raise ConfigError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.starting_offsets not in ("earliest", "latest"):
            raise ConfigError(f"starting offsets must be earliest or latest, got {self.starting_offsets!r}")
        for name in ("queries_topic", "replies_topic", "dead_letter_topic"):
            if not TOPIC_NAME.fullmatch(getattr(self, name)):
                raise ConfigError(f"{name.replace('_', ' ')} {getattr(self, name)!r} is not a valid topic name")
        for name in ("max_queries_per_batch", "max_batch_bytes", "max_k", "max_message_bytes", "n_probe", "ef",
                     "rerank", "query_partitions"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.executor_min_batch is not None and self.executor_min_batch < 0:
            raise ConfigError(f"executor min batch must be >= 0, got {self.executor_min_batch}")
        if self.search_threads is not None and self.search_threads < 1:
            raise ConfigError(f"search threads must be >= 1, got {self.search_threads}")
        if self.max_read_ms < 1:
            raise ConfigError(f"max read ms must be >= 1, got {self.max_read_ms}")
        if self.read_quiet_ms < 0:
            raise ConfigError(f"read quiet ms must be >= 0, got {self.read_quiet_ms}")
        if self.trigger_ms < 0 or self.idle_wait_ms < 0:
            raise ConfigError("trigger and idle wait must be >= 0 ms")
        if self.replication_factor == 0 or self.replication_factor < -1:
            raise ConfigError(f"replication factor must be >= 1, or -1 for the broker's default, got "
                              f"{self.replication_factor}")
        if self.reply_topic_pattern is not None:
            try:
                re.compile(self.reply_topic_pattern)
            except re.error as e:
                raise ConfigError(f"reply topic pattern {self.reply_topic_pattern!r} is not a regex: {e}") from e
        weakened = forced_conflicts(dict(self.kafka_options))
        if weakened:
            raise ConfigError(f"Kafka option(s) {', '.join(weakened)} would weaken delivery: the service always "
                              "produces with acks=all, idempotence on and topic auto-creation off; remove them")

    @property
    def checkpoint_dir(self) -> str:
        """``--checkpoint``, else a directory private to this user that survives reboots.

        Not the shared temp dir: other users could read or rewrite the offsets there, and a reboot that
        empties it would restart the stream from ``--starting-offsets``. Production gives
        ``--checkpoint`` on durable storage (the compose file does).
        """
        if self.checkpoint:
            return self.checkpoint
        where = re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.queries_topic}@{self.bootstrap}")
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return str(Path(state) / "ecg-similarity" / "checkpoints" / where)

    @property
    def executor_threshold(self) -> int:
        """Records from which a micro-batch goes to the executors (0: never).

        On a local master the executors are the driver's own cores, and the driver's threaded search
        answers a batch without a Spark job (measured with 1,000 queries at 10^5: 0.95 s in the driver
        with 2 threads, 1.2-1.3 s on the 2 executors, which pay ~0.25 s to ship the records).
        """
        if self.executor_min_batch is not None:
            return self.executor_min_batch
        return 0 if self.master.strip().startswith("local") else 128

    @property
    def driver_threads(self) -> int:
        if self.search_threads:
            return self.search_threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    @property
    def search_overrides(self) -> dict[str, int]:
        """Search knobs set explicitly; the rest come from each metric's recommended settings."""
        return {k: v for k, v in (("n_probe", self.n_probe), ("ef", self.ef), ("rerank", self.rerank))
                if v is not None}

    @property
    def limits(self) -> Limits:
        # a query may not have its reply written into the service's own input or dead-letter topic
        pattern = None if self.reply_topic_pattern is None else re.compile(self.reply_topic_pattern)
        return Limits(self.max_message_bytes, self.max_k, pattern,
                      frozenset((self.queries_topic, self.dead_letter_topic)), self.replies_topic)

    @property
    def service_topics(self) -> tuple[str, str, str]:
        return (self.queries_topic, self.replies_topic, self.dead_letter_topic)

    @property
    def client_config(self) -> dict[str, str]:
        return dict(self.kafka_options)

    @property
    def secrets(self) -> dict[str, str]:
        """Every setting whose value must never be logged (Kafka options and Spark settings alike)."""
        return {k: v for k, v in (*self.kafka_options, *self.spark_conf) if is_secret_key(k)}

    def redacted(self) -> dict[str, Any]:
        """The settings for logs: secret-looking Kafka options and Spark settings are masked."""
        d = asdict(self)
        d["kafka_options"] = {k: "***" if is_secret_key(k) else v for k, v in self.kafka_options}
        d["spark_conf"] = {k: "***" if is_secret_key(k) else v for k, v in self.spark_conf}
        d["checkpoint"] = self.checkpoint_dir
        return d


def spark_session(app: str = "ecg-streaming", master: str = "local[2]",
                  conf: Mapping[str, str] | None = None) -> SparkSession:
    """The project's SparkSession tuned for low-latency micro-batches, with the ``ckafka`` source registered."""
    from batch_index.spark_job import spark_session as base_session
    from streaming.kafka_source import KafkaDataSource

    spark = base_session(master, app_name=app, conf={
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "2",
        "spark.sql.streaming.stopGracefullyOnShutdown": "true",
        **(conf or {}),
    })
    spark.sparkContext.setLogLevel("WARN")
    spark.dataSource.register(KafkaDataSource)
    return spark


class BatchHandler:
    """The ``foreachBatch`` function: answer the batch, publish, wait for acks, log metrics."""

    def __init__(self, cfg: ServeConfig, holder: IndexHolder | None = None) -> None:
        self.cfg = cfg
        self.holder = holder or holder_for(cfg.index)
        self.params = cfg.search_overrides
        self.limits = cfg.limits
        self.publisher: Publisher = publisher_for(cfg.bootstrap, cfg.client_config)
        self.lag = LagProbe(cfg.bootstrap, cfg.queries_topic, cfg.client_config)
        self.abort = threading.Event()  # set by a shutdown that cannot wait for the broker any longer
        self.gaps = OffsetGaps(cfg.checkpoint_dir)
        self.totals = {"batches": 0, "executor_batches": 0, "records": 0, "ok": 0, "errors": 0, "dead_letters": 0,
                       "undeliverable": 0, "replaced": 0, "skipped_offsets": 0, "isolated_batches": 0}
        self.last: dict[str, Any] = {}
        self.gc = gc_pauses()

    def __call__(self, df: DataFrame, batch_id: int) -> None:
        t0 = time.perf_counter()
        gc0 = self.gc.total_ms
        received_at = datetime.now(timezone.utc)
        index = self.holder.current()  # a newly published version is swapped in here, between batches
        table = df.select(*RECORD_COLUMNS).toArrow()
        if table.num_rows == 0:
            return
        fetch_ms = (time.perf_counter() - t0) * 1000
        answer = dict(replies_topic=self.cfg.replies_topic, dead_letter_topic=self.cfg.dead_letter_topic,
                      limits=self.limits, params=self.params, received_at=received_at)
        records = records_of(table)
        skipped = self.gaps.observe(batch_id, records)
        where = "driver"
        if self.cfg.executor_threshold and table.num_rows >= self.cfg.executor_threshold:
            try:
                out, stats = answer_on_executors(df.sparkSession, table, index, **answer)
                where = "executors"
            except Exception:  # a lost worker must not lose the batch: answer it here instead
                logger.exception("answering batch %d on the executors failed; answering it on the driver", batch_id)
        if where == "driver":
            try:
                out, stats = answer_batch(records, index, **answer, threads=self.cfg.driver_threads)
            except Exception:  # a bug past answer_batch's own guards: no record may take the batch down
                logger.exception("answering batch %d failed as a whole; answering its %d records one by one",
                                 batch_id, len(records))
                out, stats = self._one_by_one(records, index, answer)
                where = "driver, record by record"
        t1 = time.perf_counter()
        report = self._deliver(out, index.version)
        deliver_ms = (time.perf_counter() - t1) * 1000
        self.lag.advance(stats.offsets)
        metrics = {"batch_id": batch_id, **stats.as_dict(), "answered_on": where, "fetch_ms": round(fetch_ms, 2),
                   "replies": sum(m.kind == "reply" for m in out), "skipped_offsets": skipped,
                   "undeliverable": report.undeliverable, "replaced": report.replaced,
                   "deliver_attempts": report.attempts,
                   "deliver_ms": round(deliver_ms, 2), "batch_ms": round((time.perf_counter() - t0) * 1000, 2),
                   "gc_ms": round(self.gc.total_ms - gc0, 2),
                   "lag": self.lag.measure(), "index_reloads": self.holder.reloads,
                   "index_refused": self.holder.refused}
        self._account(metrics)

    def _one_by_one(self, records: list[Record], index: Any, answer: dict[str, Any]
                    ) -> tuple[list[Outgoing], BatchStats]:
        """Answer each record on its own; one that still fails becomes an ``INTERNAL`` dead letter."""
        out: list[Outgoing] = []
        stats = BatchStats(index_version=index.version)
        for rec in records:
            try:
                part, part_stats = answer_batch([rec], index, **answer, threads=1)
            except Exception as e:
                logger.exception("record %s[%d]@%d cannot be answered; dead-lettering it", rec.topic, rec.partition,
                                 rec.offset)
                err = DecodeError(ErrorCode.INTERNAL, f"the service could not process this record: "
                                  f"{type(e).__name__}")
                origin = Origin(rec.topic, rec.partition, rec.offset, rec.timestamp)
                part = [dead_letter(self.cfg.dead_letter_topic, origin, rec.key, rec.value, err,
                                    max_bytes=self.limits.max_bytes)]
                part_stats = BatchStats(records=1, errors={ErrorCode.INTERNAL.value: 1}, dead_letters=1,
                                        offsets={rec.topic: {str(rec.partition): [rec.offset, rec.offset]}})
            out.extend(part)
            stats.merge(part_stats)
        return out, stats

    def _deliver(self, out: list[Outgoing], version: str) -> DeliveryReport:
        """Publish a batch's messages; returns once every one (or its stand-in) is acknowledged."""
        return deliver(self.publisher, out, service_topics=(self.cfg.replies_topic, self.cfg.dead_letter_topic),
                       substitute=functools.partial(self._substitute, version), abort=self.abort)

    def _substitute(self, version: str, m: Outgoing, why: str, sender_topic: bool) -> Outgoing:
        return substitute(m, why, sender_topic=sender_topic, dead_letter_topic=self.cfg.dead_letter_topic,
                          index_version=version, max_bytes=self.limits.max_bytes)

    def _account(self, metrics: dict[str, Any]) -> None:
        self.last = metrics
        self.totals["batches"] += 1
        self.totals["executor_batches"] += metrics["answered_on"] == "executors"
        self.totals["isolated_batches"] += metrics["answered_on"] == "driver, record by record"
        for k in ("records", "ok", "errors", "dead_letters", "undeliverable", "replaced", "skipped_offsets"):
            self.totals[k] += metrics[k]
        line = json.dumps(metrics, separators=(",", ":"))
        metrics_logger.info("batch %s", line)
        if self.cfg.metrics_file:
            with open(self.cfg.metrics_file, "a", encoding="utf-8") as f:
                f.write(line + "\n")


class GcPauses:
    """Milliseconds this process has spent in Python's cyclic garbage collector (via ``gc.callbacks``).

    The driver holds pyspark, numba and the index: millions of objects that a full collection walks.
    Each batch reports its share (``gc_ms``), so a pause shows up as what it is, not as slow scoring.
    """

    def __init__(self) -> None:
        self.total_ms = 0.0
        self._started: float | None = None
        gc.callbacks.append(self._on)

    def _on(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.total_ms += (time.perf_counter() - self._started) * 1000
            self._started = None

    def close(self) -> None:
        if self._on in gc.callbacks:
            gc.callbacks.remove(self._on)


@functools.cache
def gc_pauses() -> GcPauses:
    """The process's one counter (handlers come and go; a callback each would pile up in ``gc.callbacks``)."""
    return GcPauses()


class LagProbe:
    """Queries still waiting in the queries topic after a batch: the broker's end offsets minus ours.

    Exact on Apache Kafka; on Tansu, whose reported end offset is that of the newest record *batch*,
    it is a lower bound (``age_ms_max`` in the same metrics line is exact on both: how old the oldest
    query of the batch was when scored). None while the broker does not answer within ``timeout``.
    """

    def __init__(self, bootstrap: str, topic: str, client_config: Mapping[str, str] | None = None, *,
                 timeout: float = 2.0, refresh_s: float = 10.0) -> None:
        self.bootstrap, self.topic, self.client_config = bootstrap, topic, dict(client_config or {})
        self.timeout, self.refresh_s = timeout, refresh_s
        self.next: dict[int, int] = {}  # partition -> the offset after the last one answered
        self._admin: AdminClient | None = None
        self._partitions: tuple[int, ...] = ()
        self._listed_at = -float("inf")

    def advance(self, offsets: Mapping[str, Mapping[str, list[int]]]) -> None:
        """Take a batch's offset ranges (``BatchStats.offsets``: topic -> partition -> [first, last])."""
        for p, (_, last) in offsets.get(self.topic, {}).items():
            self.next[int(p)] = last + 1

    def measure(self) -> int | None:
        try:
            admin = self._admin = self._admin or admin_client(self.bootstrap, self.client_config)
            if time.monotonic() - self._listed_at > self.refresh_s:
                desc = admin.describe_topics(TopicCollection([self.topic]), request_timeout=self.timeout)
                self._partitions = tuple(p.id for p in desc[self.topic].result(self.timeout).partitions)
                self._listed_at = time.monotonic()
            ends = admin.list_offsets({TopicPartition(self.topic, p): OffsetSpec.latest() for p in self._partitions},
                                      request_timeout=self.timeout)
            return sum(max(0, f.result(self.timeout).offset - self.next.get(tp.partition, 0))
                       for tp, f in ends.items())
        except (KafkaException, BrokerError, TimeoutError, concurrent.futures.TimeoutError, ValueError) as e:
            # (concurrent.futures.TimeoutError is not the builtin TimeoutError before Python 3.11)
            logger.debug("lag unknown: %s", e)
            return None


class TopicKeeper:
    """Re-creates the service's topics when they vanish (a broker that keeps them in memory restarted).

    Runs beside the query in ``serve`` (``start()``/``stop()``), checking every ``interval_s``; the
    ckafka source then notices the new topic ids and reads the new logs from their beginning.
    """

    def __init__(self, cfg: ServeConfig, interval_s: float = 2.0) -> None:
        self.cfg = cfg
        self.interval_s = interval_s
        self.recreated: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._admin: AdminClient | None = None

    def check(self) -> list[str]:
        """Create whichever service topic is missing now; returns those created."""
        self._admin = self._admin or admin_client(self.cfg.bootstrap, self.cfg.client_config)
        missing = missing_topics(self.cfg.bootstrap, self.cfg.service_topics, admin=self._admin)
        if not missing:
            return []
        logger.warning("topics %s are missing (broker restarted with empty memory, or deleted); re-creating them",
                       missing)
        for t in missing:
            partitions = self.cfg.query_partitions if t == self.cfg.queries_topic else 1
            create_topics(self.cfg.bootstrap, [t], partitions=partitions, replication=self.cfg.replication_factor,
                          client_config=self.cfg.client_config)
        self.recreated.extend(missing)
        return missing

    def start(self) -> TopicKeeper:
        self._thread = threading.Thread(target=self._run, name="topic-keeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except EcgSearchError as e:
                logger.warning("could not re-create topics: %s", e)


def start_query(spark: SparkSession, cfg: ServeConfig, handler: BatchHandler | None = None) -> StreamingQuery:
    """Start the streaming query (the index must load first: fail fast rather than mid-stream)."""
    handler = handler or BatchHandler(cfg)
    index = handler.holder.current()
    if cfg.executor_threshold:
        warm_up(spark, index)
    try:  # connect now, and fail clearly when the broker cannot be reached with these settings
        handler.publisher.producer.list_topics(cfg.replies_topic, timeout=30)
    except KafkaException as e:
        raise BrokerError(f"cannot reach the broker at {cfg.bootstrap}: {redact(str(e.args[0]), cfg.client_config)}"
                          " (check --bootstrap and the security settings)") from None
    reader = (spark.readStream.format(cfg.source)
              .option("kafka.bootstrap.servers", cfg.bootstrap)
              .option("subscribe", cfg.queries_topic)
              .option("startingOffsets", cfg.starting_offsets)
              .option("maxOffsetsPerTrigger", cfg.max_queries_per_batch))
    if cfg.source == "ckafka":
        reader = (reader.option("idleWaitMs", cfg.idle_wait_ms).option("maxBytesPerTrigger", cfg.max_batch_bytes)
                  .option("maxReadMs", cfg.max_read_ms).option("quietMs", cfg.read_quiet_ms))
    else:
        reader = reader.option("failOnDataLoss", "false")
    for k, v in cfg.kafka_options:
        reader = reader.option(f"kafka.{k}", v)
    try:
        df = reader.load()
    except Exception as e:  # pyspark's AnalysisException; pyspark is imported lazily here
        if "KAFKA_DATA_SOURCE_NOT_ENABLED" in str(e):
            raise ConfigError(
                "--source kafka needs Spark's Kafka connector: add --spark-conf spark.jars.packages="
                f"org.apache.spark:spark-sql-kafka-0-10_2.13:{spark.version} (or use spark-submit --packages), "
                "or use --source ckafka") from e
        raise
    query = (df.writeStream
             .foreachBatch(handler)
             .option("checkpointLocation", cfg.checkpoint_dir)
             .trigger(processingTime=f"{cfg.trigger_ms} milliseconds")
             .queryName(f"ecg-serve-{cfg.queries_topic}")
             .start())
    logger.info("streaming query started: %s -> %s (dead letters %s), index %s, checkpoint %s, source %s",
                cfg.queries_topic, cfg.replies_topic, cfg.dead_letter_topic, index.version, cfg.checkpoint_dir,
                cfg.source)
    return query


def stop_gracefully(query: StreamingQuery, timeout_s: float = 30.0, abort: threading.Event | None = None) -> None:
    """Let the running micro-batch finish (its replies acknowledged), then stop the query.

    If it is still running after ``timeout_s`` (replies waiting for an unreachable broker), ``abort``
    is set: the batch gives up uncommitted, and a restart replays it from the checkpoint.
    """
    def busy() -> bool:
        return bool(query.isActive and query.status.get("isTriggerActive"))

    deadline = time.monotonic() + timeout_s
    while busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    if abort is not None and busy():
        logger.warning("the running micro-batch did not finish within %.0f s (broker unreachable?); abandoning "
                       "it uncommitted: a restart replays it from the checkpoint", timeout_s)
        abort.set()
        deadline = time.monotonic() + 15.0
        while busy() and time.monotonic() < deadline:
            time.sleep(0.05)
    query.stop()


def serve(cfg: ServeConfig) -> int:
    """Run the job until SIGINT/SIGTERM (exit 0) or until the query fails (exit 1)."""
    secrets = SecretFilter(cfg.secrets)  # mask secret settings in whatever this process logs
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(secrets)
    try:
        return _serve(cfg)
    finally:
        for h in handlers:
            h.removeFilter(secrets)


def _serve(cfg: ServeConfig) -> int:
    logger.info("serve settings: %s", json.dumps(cfg.redacted()))
    holder = holder_for(cfg.index)
    holder.load_initial()
    if cfg.checkpoint is None:
        Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        logger.warning("no --checkpoint given: positions are kept in %s (private to this user); give --checkpoint "
                       "on durable storage in production", cfg.checkpoint_dir)
    if cfg.create_topics:
        create_topics(cfg.bootstrap, [cfg.queries_topic], partitions=cfg.query_partitions,
                      replication=cfg.replication_factor, client_config=cfg.client_config)
        create_topics(cfg.bootstrap, [cfg.replies_topic, cfg.dead_letter_topic], replication=cfg.replication_factor,
                      client_config=cfg.client_config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s: stopping after the current micro-batch", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    spark = spark_session(master=cfg.master, conf=dict(cfg.spark_conf))
    handler = BatchHandler(cfg, holder)
    keeper = TopicKeeper(cfg).start() if cfg.create_topics else None
    try:
        query = start_query(spark, cfg, handler)
        # what start-up made (pyspark, numba, the index: millions of objects) lives as long as the
        # process: frozen, full collections stop walking it (measured: a 155 ms pause inside a burst)
        gc.collect()
        gc.freeze()
        while query.isActive and not stop.is_set():
            stop.wait(1.0)
        if not stop.is_set():
            failure = query.exception()
            logger.error("streaming query failed: %s", redact(str(failure), cfg.secrets))
            return 1
        stop_gracefully(query, abort=handler.abort)
        logger.info("stopped cleanly; totals %s", json.dumps(handler.totals))
        return 0
    finally:
        if keeper is not None:
            keeper.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        spark.stop()
