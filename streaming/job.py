"""The Structured Streaming job: queries topic -> decode, validate, score -> replies (+ dead letters).

Layers: :mod:`streaming.scoring` answers a batch of records with plain numpy; :class:`BatchHandler`
adapts it to ``foreachBatch``; :func:`start_query` wires the DataFrames.

Where scoring runs, and why: in the driver's Python process, inside ``foreachBatch``. The source is a
driver-side reader anyway (see :mod:`streaming.kafka_source`), a micro-batch is small (at most
``max_queries_per_batch`` queries of ~10 KB), and the index is memory-mapped and loaded once per
version in this long-lived process (:mod:`streaming.index_cache`), so there is nothing to broadcast
and no per-batch task launch, Python worker round trip or index (re)load on the latency path. For
indexes too large for one machine the shard layout allows scoring shard by shard on executors
(``mapInArrow`` over shards, merge top-k on the driver); that is the next step, not this one.

Delivery is at-least-once: a batch's replies are acknowledged by the broker before ``foreachBatch``
returns, and only then does Spark commit the batch; a crash in between replays the batch from the
checkpoint, which can duplicate replies (same correlation id, same answer) but never lose one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from batch_index.errors import EcgSearchError
from batch_index.search import SearchParams
from streaming.codec import DEFAULT_MAX_BYTES, TOPIC_NAME, Limits
from streaming.index_cache import IndexHolder, holder_for
from streaming.scoring import Record, answer_batch
from streaming.sink import deliver, producer_for

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

logger = logging.getLogger(__name__)
metrics_logger = logging.getLogger("streaming.metrics")

SOURCES: Final[tuple[str, ...]] = ("ckafka", "kafka")
_SECRET_KEY = re.compile(r"password|secret|token|jaas|key\b|\.key$", re.IGNORECASE)


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
    checkpoint: str | None = None          # default: <tmp>/ecg-streaming/<queries topic>@<bootstrap>
    source: str = "ckafka"                 # ckafka (Python, confluent-kafka) | kafka (Spark's JVM connector)
    starting_offsets: str = "earliest"     # for a fresh checkpoint; a restart resumes from the checkpoint
    max_queries_per_batch: int = 2000      # rate control: records per micro-batch
    max_batch_bytes: int = 64 << 20        # ckafka: memory bound per micro-batch (values + keys)
    trigger_ms: int = 0                    # 0 = start the next micro-batch as soon as one ends
    idle_wait_ms: int = 200                # ckafka: long-poll this long when no query is waiting
    max_k: int = 1000
    max_message_bytes: int = DEFAULT_MAX_BYTES
    reply_topic_pattern: str = TOPIC_NAME.pattern  # which per-query reply topics are allowed (fullmatch)
    n_probe: int = 16
    rerank: int = 256
    master: str = "local[2]"
    create_topics: bool = True             # create missing queries/replies/dead-letter topics at start
    query_partitions: int = 1
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
        for name in ("max_queries_per_batch", "max_batch_bytes", "max_k", "max_message_bytes", "n_probe", "rerank",
                     "query_partitions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.trigger_ms < 0 or self.idle_wait_ms < 0:
            raise ConfigError("trigger and idle wait must be >= 0 ms")
        try:
            re.compile(self.reply_topic_pattern)
        except re.error as e:
            raise ConfigError(f"reply topic pattern {self.reply_topic_pattern!r} is not a regex: {e}") from e

    @property
    def checkpoint_dir(self) -> str:
        if self.checkpoint:
            return self.checkpoint
        where = re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.queries_topic}@{self.bootstrap}")
        return str(Path(tempfile.gettempdir()) / "ecg-streaming" / where)

    @property
    def limits(self) -> Limits:
        return Limits(self.max_message_bytes, self.max_k, re.compile(self.reply_topic_pattern))

    @property
    def client_config(self) -> dict[str, str]:
        return dict(self.kafka_options)

    def redacted(self) -> dict[str, Any]:
        """The settings for logs: secrets in Kafka options are masked."""
        d = asdict(self)
        d["kafka_options"] = {k: "***" if _SECRET_KEY.search(k) else v for k, v in self.kafka_options}
        d["checkpoint"] = self.checkpoint_dir
        return d


def spark_session(app: str = "ecg-streaming", master: str = "local[2]",
                  conf: Mapping[str, str] | None = None) -> SparkSession:
    """A SparkSession tuned for low-latency micro-batches, with the ``ckafka`` source registered."""
    from pyspark.sql import SparkSession

    from streaming.kafka_source import KafkaDataSource

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers must import this package
    builder = (SparkSession.builder.appName(app).master(master)
               .config("spark.ui.enabled", "false")
               .config("spark.python.worker.reuse", "true")  # off: ~5 s per batch (KAFKA.md)
               .config("spark.sql.shuffle.partitions", "2")
               .config("spark.sql.streaming.stopGracefullyOnShutdown", "true"))
    for k, v in (conf or {}).items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    spark.dataSource.register(KafkaDataSource)
    return spark


class BatchHandler:
    """The ``foreachBatch`` function: answer the batch, publish, wait for acks, log metrics."""

    def __init__(self, cfg: ServeConfig, holder: IndexHolder | None = None) -> None:
        self.cfg = cfg
        self.holder = holder or holder_for(cfg.index)
        self.params = SearchParams(n_probe=cfg.n_probe, rerank=cfg.rerank)
        self.limits = cfg.limits
        self.totals = {"batches": 0, "records": 0, "ok": 0, "errors": 0, "dead_letters": 0}
        self.last: dict[str, Any] = {}

    def __call__(self, df: DataFrame, batch_id: int) -> None:
        t0 = time.perf_counter()
        received_at = datetime.now(timezone.utc)
        index = self.holder.current()  # a newly published version is swapped in here, between batches
        table = df.select("key", "value", "topic", "partition", "offset", "timestamp").toArrow()
        if table.num_rows == 0:
            return
        records = [Record(*row) for row in zip(*(table.column(c).to_pylist() for c in table.column_names))]
        fetch_ms = (time.perf_counter() - t0) * 1000
        out, stats = answer_batch(records, index, replies_topic=self.cfg.replies_topic,
                                  dead_letter_topic=self.cfg.dead_letter_topic, limits=self.limits,
                                  params=self.params, received_at=received_at)
        t1 = time.perf_counter()
        report = deliver(producer_for(self.cfg.bootstrap, self.cfg.client_config), out)
        metrics = {"batch_id": batch_id, **stats.as_dict(), "fetch_ms": round(fetch_ms, 2),
                   "replies": sum(m.kind == "reply" for m in out),
                   "undeliverable": report.undeliverable, "deliver_ms": round((time.perf_counter() - t1) * 1000, 2),
                   "batch_ms": round((time.perf_counter() - t0) * 1000, 2),
                   "index_reloads": self.holder.reloads, "index_refused": self.holder.refused}
        self._account(metrics)

    def _account(self, metrics: dict[str, Any]) -> None:
        self.last = metrics
        self.totals["batches"] += 1
        for k in ("records", "ok", "errors", "dead_letters"):
            self.totals[k] += metrics[k]
        line = json.dumps(metrics, separators=(",", ":"))
        metrics_logger.info("batch %s", line)
        if self.cfg.metrics_file:
            with open(self.cfg.metrics_file, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def start_query(spark: SparkSession, cfg: ServeConfig, handler: BatchHandler | None = None) -> StreamingQuery:
    """Start the streaming query (the index must load first: fail fast rather than mid-stream)."""
    handler = handler or BatchHandler(cfg)
    index = handler.holder.current()
    producer_for(cfg.bootstrap, cfg.client_config).list_topics(cfg.replies_topic, timeout=30)  # connect now
    reader = (spark.readStream.format(cfg.source)
              .option("kafka.bootstrap.servers", cfg.bootstrap)
              .option("subscribe", cfg.queries_topic)
              .option("startingOffsets", cfg.starting_offsets)
              .option("maxOffsetsPerTrigger", cfg.max_queries_per_batch))
    if cfg.source == "ckafka":
        reader = reader.option("idleWaitMs", cfg.idle_wait_ms).option("maxBytesPerTrigger", cfg.max_batch_bytes)
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


def stop_gracefully(query: StreamingQuery, timeout_s: float = 30.0) -> None:
    """Let the running micro-batch finish (its replies acknowledged), then stop the query."""
    deadline = time.monotonic() + timeout_s
    while query.isActive and query.status.get("isTriggerActive") and time.monotonic() < deadline:
        time.sleep(0.05)
    query.stop()


def serve(cfg: ServeConfig) -> int:
    """Run the job until SIGINT/SIGTERM (exit 0) or until the query fails (exit 1)."""
    from streaming.broker import create_topics

    logger.info("serve settings: %s", json.dumps(cfg.redacted()))
    holder = holder_for(cfg.index)
    holder.load_initial()
    if cfg.create_topics:
        create_topics(cfg.bootstrap, [cfg.queries_topic], partitions=cfg.query_partitions,
                      client_config=cfg.client_config)
        create_topics(cfg.bootstrap, [cfg.replies_topic, cfg.dead_letter_topic], client_config=cfg.client_config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s: stopping after the current micro-batch", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    spark = spark_session(master=cfg.master, conf=dict(cfg.spark_conf))
    handler = BatchHandler(cfg, holder)
    try:
        query = start_query(spark, cfg, handler)
        while query.isActive and not stop.is_set():
            stop.wait(1.0)
        failure = query.exception()
        if failure is not None:
            logger.error("streaming query failed: %s", failure)
            return 1
        stop_gracefully(query)
        logger.info("stopped cleanly; totals %s", json.dumps(handler.totals))
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        spark.stop()
