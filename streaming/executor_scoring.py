"""Large micro-batches are answered on Spark's executors, small ones on the driver.

Answering a query (decode, validate, hkmeans search, encode) is pure Python and numpy work of a few
milliseconds; on the driver it runs on one core, which caps a burst at a few hundred queries per
second. A batch of at least ``ServeConfig.executor_min_batch`` records is therefore split into one
partition per core and each partition is answered by :func:`streaming.scoring.answer_batch` in a Spark
Python worker; the driver only publishes the replies. Below that size the Spark job's own cost (task
launch, Arrow transfer: ~0.1 s) outweighs the gain, and the driver answers at once.

The index is not pickled into tasks: executors memory-map the same version directory the driver
serves (``batch_index.spark_job.cached_index``), loaded once per Python worker and version, which is
what a broadcast would give without copying gigabytes of raw signals through the driver.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batch_index.search import SearchIndex
from streaming.codec import Limits
from streaming.scoring import BatchStats, Outgoing, Record, answer_batch

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

logger = logging.getLogger(__name__)

RECORD_COLUMNS = ("key", "value", "topic", "partition", "offset", "timestamp")
_OUT_DDL = "topic string, key binary, value binary, kind string, stats string"
_OUT_SCHEMA = pa.schema([("topic", pa.string()), ("key", pa.binary()), ("value", pa.binary()),
                         ("kind", pa.string()), ("stats", pa.string())])


def records_of(table: pa.Table) -> list[Record]:
    """The Kafka records of an Arrow table with :data:`RECORD_COLUMNS`."""
    return [Record(*row) for row in zip(*(table.column(c).to_pylist() for c in RECORD_COLUMNS))]


def _answer_partition(index_path: str, version: str, replies_topic: str, dead_letter_topic: str, limits: Limits,
                      params: Mapping[str, Any], received_at: datetime):
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from batch_index.spark_job import cached_index

        records = [r for b in batches for r in records_of(pa.Table.from_batches([b]))]
        if not records:
            return
        out, stats = answer_batch(records, cached_index(index_path, version), replies_topic=replies_topic,
                                  dead_letter_topic=dead_letter_topic, limits=limits, params=params,
                                  received_at=received_at)
        rows = [{"topic": m.topic, "key": m.key, "value": m.value, "kind": m.kind, "stats": None} for m in out]
        rows.append({"topic": None, "key": None, "value": None, "kind": "stats", "stats": json.dumps(asdict(stats))})
        yield pa.RecordBatch.from_pylist(rows, schema=_OUT_SCHEMA)

    return run


def answer_on_executors(spark: SparkSession, table: pa.Table, index: SearchIndex, *, replies_topic: str,
                        dead_letter_topic: str, limits: Limits, params: Mapping[str, Any], received_at: datetime
                        ) -> tuple[list[Outgoing], BatchStats]:
    """Answer the records of ``table`` in one Spark job, one partition per core; same result as the driver's."""
    parts = max(1, min(table.num_rows, spark.sparkContext.defaultParallelism))
    # one Arrow record batch per partition (createDataFrame keeps them apart), not repartition(), which
    # shuffled every query through local disk for nothing
    chunk = -(-table.num_rows // parts)
    table = pa.Table.from_batches(table.select(list(RECORD_COLUMNS)).combine_chunks().to_batches(max_chunksize=chunk))
    df = spark.createDataFrame(table)
    fn = _answer_partition(str(index.path), index.version, replies_topic, dead_letter_topic, limits, dict(params),
                           received_at)
    got = df.mapInArrow(fn, _OUT_DDL).toArrow()
    out: list[Outgoing] = []
    stats = BatchStats(index_version=index.version)
    for topic, key, value, kind, s in zip(*(got.column(c).to_pylist() for c in _OUT_SCHEMA.names)):
        if kind == "stats":
            stats.merge(BatchStats(**json.loads(s)))
        else:
            out.append(Outgoing(topic, key, value, kind))
    return out, stats


def warm_up(spark: SparkSession, index: SearchIndex) -> None:
    """Load the index in the executors' Python workers now, so the first large batch does not pay for it."""
    path, version = str(index.path), index.version

    def load(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from batch_index.spark_job import cached_index

        for _ in batches:
            pass
        yield pa.RecordBatch.from_pylist([{"size": cached_index(path, version).size}])

    n = spark.sparkContext.defaultParallelism
    spark.range(0, n, numPartitions=n).mapInArrow(load, "size long").collect()
    logger.info("index %s loaded in %d executor task(s)", version, n)
