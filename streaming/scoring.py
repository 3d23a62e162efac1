"""Answer one micro-batch: raw Kafka records in, reply and dead-letter messages out (pure, no Spark).

Valid queries are grouped by (metric, mode, k, threshold) and each group is scored with one
``index.search`` call; invalid ones become an error reply (when their sender can be named) plus a
dead letter. Nothing here raises for bad input, so one bad message never silences a good one.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

import numpy as np

from batch_index.search import SearchIndex, SearchParams
from streaming.codec import (
    DEFAULT_LIMITS,
    DecodeError,
    ErrorCode,
    Limits,
    Query,
    decode_query,
    encode_dead_letter,
    encode_result,
)

logger = logging.getLogger(__name__)


class Record(NamedTuple):
    """One consumed Kafka record (the columns of Spark's Kafka source that we use)."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: datetime | None = None


class Outgoing(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes
    kind: str  # "reply" | "dead_letter"


@dataclass
class BatchStats:
    """What an operator reads per micro-batch (logged as one JSON line)."""

    records: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    groups: int = 0
    index_version: str = ""
    offsets: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # topic -> partition -> [first, last]
    decode_ms: float = 0.0
    score_ms: float = 0.0
    age_ms_max: float | None = None  # now - sent_at of the oldest query: queueing + batch latency

    def merge(self, other: BatchStats) -> None:
        """Add the stats of another part of the same micro-batch (times add up: they are task times)."""
        self.records += other.records
        self.ok += other.ok
        self.dead_letters += other.dead_letters
        self.groups += other.groups
        self.decode_ms += other.decode_ms
        self.score_ms += other.score_ms
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        for topic, parts in other.offsets.items():
            for p, (lo, hi) in parts.items():
                span = self.offsets.setdefault(topic, {}).setdefault(p, [lo, hi])
                span[0], span[1] = min(span[0], lo), max(span[1], hi)
        if other.age_ms_max is not None:
            self.age_ms_max = other.age_ms_max if self.age_ms_max is None else max(self.age_ms_max, other.age_ms_max)

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "ok": self.ok, "errors": sum(self.errors.values()),
                "error_codes": self.errors, "dead_letters": self.dead_letters, "groups": self.groups,
                "index_version": self.index_version, "offsets": self.offsets,
                "decode_ms": round(self.decode_ms, 2), "score_ms": round(self.score_ms, 2),
                "age_ms_max": None if self.age_ms_max is None else round(self.age_ms_max, 1)}


def answer_batch(records: Sequence[Record], index: SearchIndex, *, replies_topic: str, dead_letter_topic: str,
                 limits: Limits = DEFAULT_LIMITS, params: Mapping[str, Any] | None = None,
                 received_at: datetime | None = None, threads: int = 1) -> tuple[list[Outgoing], BatchStats]:
    """Decode, validate and score ``records``; returns the messages to publish and the batch's stats.

    ``threads``: how many threads each group's search may use (the process's share of the cores).
    """
    received_at = received_at or datetime.now(timezone.utc)
    stats = BatchStats(records=len(records), index_version=index.version, offsets=_offset_ranges(records))
    out: list[Outgoing] = []
    groups: dict[tuple[str, str, int, float | None], list[Query]] = defaultdict(list)

    t0 = time.perf_counter()
    for rec in records:
        q = decode_query(rec.value, index, limits, key=rec.key)
        if isinstance(q, Query):
            groups[q.group].append(q)
        else:
            _reject(q, rec, out, stats, index.version, replies_topic, dead_letter_topic, received_at, limits)
    stats.decode_ms = (time.perf_counter() - t0) * 1000

    t0 = time.perf_counter()
    for (metric, mode, k, threshold), queries in groups.items():
        stats.groups += 1
        try:
            matches = index.search(np.stack([q.sample for q in queries]), metric, mode, k, threshold,
                                   SearchParams.for_metric(metric, **(params or {})), threads)
        except Exception as e:  # a bug, not bad input: answer INTERNAL, keep serving
            logger.exception("scoring %d %s/%s queries failed with index %s", len(queries), metric, mode,
                             index.version)
            for q in queries:
                err = DecodeError(ErrorCode.INTERNAL, f"scoring failed: {type(e).__name__}", q.correlation_id,
                                  q.reply_topic, metric, mode, k, q.sent_at)
                out.append(_reply(q.correlation_id, q.reply_topic or replies_topic, encode_result(
                    q.correlation_id, error=err, index_version=index.version, received_at=received_at,
                    scored_at=datetime.now(timezone.utc))))
                stats.errors[ErrorCode.INTERNAL.value] = stats.errors.get(ErrorCode.INTERNAL.value, 0) + 1
            continue
        scored_at = datetime.now(timezone.utc)
        for q, m in zip(queries, matches):
            out.append(_reply(q.correlation_id, q.reply_topic or replies_topic, encode_result(
                q.correlation_id, matches=m, metric=metric, mode=mode, k=k, index_version=index.version,
                sent_at=q.sent_at, received_at=received_at, scored_at=scored_at)))
            stats.ok += 1
            if q.sent_at is not None:
                age = (scored_at - q.sent_at).total_seconds() * 1000
                stats.age_ms_max = age if stats.age_ms_max is None else max(stats.age_ms_max, age)
    stats.score_ms = (time.perf_counter() - t0) * 1000
    return out, stats


def _reject(err: DecodeError, rec: Record, out: list[Outgoing], stats: BatchStats, version: str,
            replies_topic: str, dead_letter_topic: str, received_at: datetime, limits: Limits) -> None:
    now = datetime.now(timezone.utc)
    stats.errors[err.code.value] = stats.errors.get(err.code.value, 0) + 1
    if err.correlation_id is not None:
        out.append(_reply(err.correlation_id, err.reply_topic or replies_topic, encode_result(
            err.correlation_id, error=err, index_version=version, received_at=received_at, scored_at=now)))
    out.append(Outgoing(dead_letter_topic, rec.key, encode_dead_letter(
        value=rec.value, key=rec.key, topic=rec.topic, partition=rec.partition, offset=rec.offset,
        timestamp=rec.timestamp, error=err, failed_at=now, max_bytes=limits.max_bytes), "dead_letter"))
    stats.dead_letters += 1
    logger.debug("rejected %s[%d]@%d: %s %s", rec.topic, rec.partition, rec.offset, err.code.value, err.message)


def _reply(correlation_id: str, topic: str, value: bytes) -> Outgoing:
    return Outgoing(topic, correlation_id.encode("utf-8"), value, "reply")


def _offset_ranges(records: Sequence[Record]) -> dict[str, dict[str, list[int]]]:
    ranges: dict[str, dict[str, list[int]]] = {}
    for r in records:
        span = ranges.setdefault(r.topic, {}).setdefault(str(r.partition), [r.offset, r.offset])
        span[0], span[1] = min(span[0], r.offset), max(span[1], r.offset)
    return ranges
