"""The ``foreachBatch`` function: answer a micro-batch, publish its replies, wait for the acks, log metrics.

Where queries are answered, and why: in the driver's Python process inside ``foreachBatch``: the
source is a driver-side reader anyway (see :mod:`streaming.kafka_source`), the index is memory-mapped
and loaded once per version in this long-lived process (:mod:`streaming.index_cache`), and no task
launch or Python worker round trip sits on the latency path. The search runs in
``ServeConfig.driver_threads`` threads (its compiled stages release the GIL), so on a local master,
whose executors are the driver's own cores, the driver answers every batch. On a cluster, micro-batches
of ``executor_threshold`` records or more (bursts, backlogs) are answered on the executors, one slice
per core (:mod:`streaming.executor_scoring`), each Python worker holding the same index version
memory-mapped: that is where more cores than the driver's are.

No record can fail a batch: :func:`streaming.scoring.answer_batch` contains each record's failure,
and should the batch as a whole still raise, :class:`BatchHandler` answers its records one at a time,
each failing one becoming an ``INTERNAL`` dead letter with its coordinates. Offsets the batch skipped
(retention, compaction, transaction markers) are counted (``skipped_offsets``) and logged.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from streaming.codec import DecodeError, ErrorCode
from streaming.config import ServeConfig
from streaming.executor_scoring import RECORD_COLUMNS, answer_on_executors, records_of
from streaming.index_cache import IndexHolder, holder_for
from streaming.offset_gaps import OffsetGaps
from streaming.scoring import BatchStats, Origin, Outgoing, Record, answer_batch, dead_letter, substitute
from streaming.sink import DeliveryReport, Publisher, deliver, publisher_for

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

from streaming.probes import LagProbe, gc_pauses

logger = logging.getLogger(__name__)
metrics_logger = logging.getLogger("streaming.metrics")


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
                out, stats = answer_on_executors(df.sparkSession, records, index, **answer)
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
                part = [dead_letter(self.cfg.dead_letter_topic, Origin.of(rec), rec.key, rec.value, err,
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
