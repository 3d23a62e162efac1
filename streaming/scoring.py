"""Answer one micro-batch: raw Kafka records in, reply and dead-letter messages out (pure, no Spark).

Valid queries are grouped by (metric, mode, k, threshold) and each group is scored with one
``index.search`` call; invalid ones become an error reply (when their sender can be named) plus a
dead letter. Nothing here raises, for bad input or otherwise: each record is processed under its own
guard, so whatever one record does (a decoder bug, an encoding failure) it becomes that record's
``INTERNAL`` error reply and dead letter, and the rest of the batch is answered.
:func:`substitute` gives the bounded stand-in for a message its topic refused.
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
    MAX_DEAD_KEY,
    DecodeError,
    ErrorCode,
    Limits,
    Query,
    decode_dead_letter,
    decode_query,
    decode_result,
    encode_dead_letter,
    encode_result,
    id_from_key,
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


class Origin(NamedTuple):
    """Where the query behind an outgoing message was read (its dead letter's coordinates)."""

    topic: str
    partition: int
    offset: int
    timestamp: datetime | None = None

    @classmethod
    def of(cls, rec: Record) -> Origin:
        return cls(rec.topic, rec.partition, rec.offset, rec.timestamp)


class Outgoing(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes
    kind: str  # "reply" | "dead_letter"
    origin: Origin | None = None


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
    origins: dict[int, Origin] = {}  # id(query) -> where it was read
    for rec in records:
        try:
            q = decode_query(rec.value, index, limits, key=rec.key)
        except Exception as e:  # a bug, not bad input (the decoder never raises for input): contain it
            logger.exception("decoding %s[%d]@%d failed", rec.topic, rec.partition, rec.offset)
            q = DecodeError(ErrorCode.INTERNAL, f"the service could not process this record: {type(e).__name__}",
                            id_from_key(rec.key))
        if isinstance(q, Query):
            groups[q.group].append(q)
            origins[id(q)] = Origin.of(rec)
        else:
            _reject(q, rec, out, stats, index.version, replies_topic, dead_letter_topic, received_at, limits)
    stats.decode_ms = (time.perf_counter() - t0) * 1000

    t0 = time.perf_counter()
    for (metric, mode, k, threshold), queries in groups.items():
        stats.groups += 1
        try:
            matches = index.answer(np.stack([q.sample for q in queries]), metric, mode, k, threshold,
                                   SearchParams.for_metric(metric, **(params or {})), threads)
        except Exception as e:  # a bug, not bad input: answer INTERNAL, keep serving
            logger.exception("scoring %d %s/%s queries failed with index %s", len(queries), metric, mode,
                             index.version)
            for q in queries:
                err = DecodeError(ErrorCode.INTERNAL, f"scoring failed: {type(e).__name__}", q.correlation_id,
                                  q.reply_topic, metric, mode, k, q.sent_at)
                out.append(_reply(q.correlation_id, q.reply_topic or replies_topic, encode_result(
                    q.correlation_id, error=err, index_version=index.version, received_at=received_at,
                    scored_at=datetime.now(timezone.utc)), origins[id(q)]))
                stats.errors[ErrorCode.INTERNAL.value] = stats.errors.get(ErrorCode.INTERNAL.value, 0) + 1
            continue
        scored_at = datetime.now(timezone.utc)
        for q, m in zip(queries, matches):
            try:
                value = encode_result(q.correlation_id, matches=m, metric=metric, mode=mode, k=k,
                                      index_version=index.version, sent_at=q.sent_at, received_at=received_at,
                                      scored_at=scored_at)
            except Exception as e:  # e.g. an id the index holds that Avro cannot carry: this query only
                logger.exception("encoding the reply to %r failed", q.correlation_id)
                err = DecodeError(ErrorCode.INTERNAL, f"encoding the reply failed: {type(e).__name__}",
                                  q.correlation_id, q.reply_topic, metric, mode, k, q.sent_at)
                value = encode_result(q.correlation_id, error=err, index_version=index.version,
                                      received_at=received_at, scored_at=scored_at)
                stats.errors[ErrorCode.INTERNAL.value] = stats.errors.get(ErrorCode.INTERNAL.value, 0) + 1
            else:
                stats.ok += 1
            out.append(_reply(q.correlation_id, q.reply_topic or replies_topic, value, origins[id(q)]))
            if q.sent_at is not None:
                age = (scored_at - q.sent_at).total_seconds() * 1000
                stats.age_ms_max = age if stats.age_ms_max is None else max(stats.age_ms_max, age)
    stats.score_ms = (time.perf_counter() - t0) * 1000
    return out, stats


def _reject(err: DecodeError, rec: Record, out: list[Outgoing], stats: BatchStats, version: str,
            replies_topic: str, dead_letter_topic: str, received_at: datetime, limits: Limits) -> None:
    now = datetime.now(timezone.utc)
    origin = Origin.of(rec)
    stats.errors[err.code.value] = stats.errors.get(err.code.value, 0) + 1
    if err.correlation_id is not None:
        try:
            out.append(_reply(err.correlation_id, err.reply_topic or replies_topic, encode_result(
                err.correlation_id, error=err, index_version=version, received_at=received_at, scored_at=now),
                origin))
        except Exception:  # the dead letter below still records it
            logger.exception("encoding the error reply to %r failed", err.correlation_id)
    out.append(dead_letter(dead_letter_topic, origin, rec.key, rec.value, err, max_bytes=limits.max_bytes))
    stats.dead_letters += 1
    logger.debug("rejected %s[%d]@%d: %s %s", rec.topic, rec.partition, rec.offset, err.code.value, err.message)


def dead_letter(topic: str, origin: Origin, key: bytes | None, value: bytes | None, err: DecodeError, *,
                max_bytes: int) -> Outgoing:
    """The dead letter of the record at ``origin``; value-less if even a bounded one cannot be encoded."""
    now = datetime.now(timezone.utc)
    fields = dict(key=key, topic=origin.topic, partition=origin.partition, offset=origin.offset,
                  timestamp=origin.timestamp, error=err, failed_at=now, max_bytes=max_bytes)
    try:
        raw = encode_dead_letter(value=value, **fields)
    except Exception as e:
        logger.exception("encoding the dead letter of %s[%d]@%d failed; sending it without its value",
                         origin.topic, origin.partition, origin.offset)
        fields.update(timestamp=None, error=DecodeError(err.code, f"{err.message} (dead letter without its "
                                                        f"value and timestamp: {type(e).__name__})",
                                                        err.correlation_id))
        raw = encode_dead_letter(value=None, **fields)
    # the Kafka key: the correlation id when known, else the record's key, bounded like the field
    kafka_key = err.correlation_id.encode("utf-8") if err.correlation_id else (key or b"")[:MAX_DEAD_KEY] or None
    return Outgoing(topic, kafka_key, raw, "dead_letter", origin)


def substitute(m: Outgoing, why: str, *, sender_topic: bool, dead_letter_topic: str, index_version: str,
               max_bytes: int) -> Outgoing:
    """The bounded stand-in for ``m``, which the broker refused for good (too large, topic not writable).

    - a reply to the service's reply topic: a small ``REPLY_TOO_LARGE`` error reply to the same id;
    - a reply to a sender's own reply topic (``sender_topic``): a value-less ``UNDELIVERABLE_REPLY``
      dead letter naming the query's coordinates (its answer is not lost silently);
    - a dead letter: the same dead letter without the raw value.
    Each stand-in is a few kilobytes at most, whatever ``m`` was.
    """
    now = datetime.now(timezone.utc)
    origin = m.origin or Origin("", -1, -1)
    if m.kind == "dead_letter":
        d = decode_dead_letter(m.value)
        code = ErrorCode(d["error_code"]) if d["error_code"] in ErrorCode._value2member_map_ else ErrorCode.INTERNAL
        err = DecodeError(code, f"[raw value of {len(d['value'] or b'')} bytes left out: {why}] {d['reason']}",
                          d["correlation_id"])
        return dead_letter(m.topic, Origin(d["topic"], d["partition"], d["offset"], d["timestamp"]), d["key"], None,
                           err, max_bytes=max_bytes)
    res = decode_result(m.value)
    if sender_topic:  # the sender's own topic refused it: record that in a dead letter
        err = DecodeError(ErrorCode.UNDELIVERABLE_REPLY, f"the reply to {res.correlation_id!r} could not be "
                          f"written to {m.topic!r}: {why}", res.correlation_id)
        return dead_letter(dead_letter_topic, origin, m.key, None, err, max_bytes=max_bytes)
    err = DecodeError(ErrorCode.REPLY_TOO_LARGE, f"the reply ({len(m.value)} bytes, {len(res.matches)} matches) "
                      f"was refused by {m.topic!r}: {why}; ask for a smaller k", res.correlation_id,
                      None, res.metric, res.mode, res.k, res.sent_at)
    return Outgoing(m.topic, m.key, encode_result(res.correlation_id, error=err, index_version=index_version,
                                                  received_at=res.received_at or now, scored_at=now), "reply",
                    m.origin)


def _reply(correlation_id: str, topic: str, value: bytes, origin: Origin | None = None) -> Outgoing:
    return Outgoing(topic, correlation_id.encode("utf-8"), value, "reply", origin)


def _offset_ranges(records: Sequence[Record]) -> dict[str, dict[str, list[int]]]:
    ranges: dict[str, dict[str, list[int]]] = {}
    for r in records:
        span = ranges.setdefault(r.topic, {}).setdefault(str(r.partition), [r.offset, r.offset])
        span[0], span[1] = min(span[0], r.offset), max(span[1], r.offset)
    return ranges
