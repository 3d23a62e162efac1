"""The Structured Streaming job's lifecycle: session, query wiring, graceful stop, ``serve``.

Queries topic -> decode, validate, score -> replies (+ dead letters). Layers: :mod:`streaming.scoring`
answers a batch of records with plain numpy; :class:`streaming.handler.BatchHandler` adapts it to
``foreachBatch``; :func:`start_query` wires the DataFrames; :func:`serve` runs it until a signal.

Delivery is at-least-once: a batch's replies are acknowledged by the broker before ``foreachBatch``
returns, and only then does Spark commit the batch; a crash in between replays the batch from the
checkpoint, which can duplicate replies (same correlation id, same answer) but never lose one.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException

from streaming.admin import create_topics
from streaming.config import ServeConfig
from streaming.errors import BrokerError, ConfigError
from streaming.executor_scoring import warm_up
from streaming.handler import BatchHandler
from streaming.index_cache import holder_for
from streaming.redaction import SecretFilter, redact
from streaming.topic_keeper import TopicKeeper

if TYPE_CHECKING:
    from pyspark.sql import SparkSession
    from pyspark.sql.streaming import StreamingQuery

logger = logging.getLogger(__name__)


def spark_session(app: str = "ecg-streaming", master: str = "local[2]",
                  conf: Mapping[str, str] | None = None) -> SparkSession:
    """The project's SparkSession tuned for low-latency micro-batches, with the ``ckafka`` source registered."""
    from batch_index.build.spark_job import spark_session as base_session
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
                  .option("maxReadMs", cfg.max_read_ms).option("quietMs", cfg.read_quiet_ms)
                  .option("maxRecordBytes", cfg.max_message_bytes))
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
