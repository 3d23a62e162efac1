"""Queries, results and dead letters on the wire; a query is validated once, here, at the door.

The wire format is defined in :mod:`schemas` (Avro single-object encoding: ``C3 01`` + 8-byte schema
fingerprint + Avro binary). :func:`decode_query` turns raw bytes into either a :class:`Query` that
scoring code may trust (length == index dim, finite, metric known and indexed, mode known, k and
threshold in range) or a :class:`DecodeError` with a machine-readable :class:`ErrorCode` and, when
it can be read, the correlation id to address the error reply to.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

import schemas
from batch_index.search import DEFAULT_MAX_K, echo, query_problem

DEFAULT_MAX_BYTES: Final[int] = 1 << 20  # 1 MiB: ~100x a 2,500-sample query
MAX_CORRELATION_ID: Final[int] = 256
MAX_ECHO: Final[int] = 64          # a sender's metric/mode string echoed in an error reply, at most
MAX_REASON: Final[int] = 1024      # characters of an error message or dead-letter reason
MAX_DEAD_KEY: Final[int] = MAX_CORRELATION_ID * 4  # bytes of a record key kept in its dead letter
#: What a dead letter adds to the value it carries, at most: key, reason, correlation id, topic and
#: the fixed fields (so the dead-letter topic needs max.message.bytes >= the query limit + this).
DEAD_LETTER_OVERHEAD: Final[int] = MAX_DEAD_KEY + 4 * MAX_REASON + 4 * MAX_CORRELATION_ID + 4 * 249 + 64
TOPIC_NAME: Final[re.Pattern[str]] = re.compile(r"[A-Za-z0-9._-]{1,249}")
EPOCH: Final[datetime] = datetime(1970, 1, 1, tzinfo=timezone.utc)


class ErrorCode(str, Enum):
    """Why a query got an error reply (the ``error_code`` field of a result)."""

    OVERSIZE = "OVERSIZE"                      # message larger than the service's limit
    UNDECODABLE = "UNDECODABLE"                # no header, truncated or malformed Avro
    UNKNOWN_SCHEMA = "UNKNOWN_SCHEMA"          # header names a schema we do not know / not a query
    BAD_CORRELATION_ID = "BAD_CORRELATION_ID"  # empty or longer than MAX_CORRELATION_ID
    BAD_REPLY_TOPIC = "BAD_REPLY_TOPIC"        # not a legal (or allowed) Kafka topic name
    UNKNOWN_METRIC = "UNKNOWN_METRIC"
    METRIC_NOT_INDEXED = "METRIC_NOT_INDEXED"  # a real metric the serving index was not built for
    UNKNOWN_MODE = "UNKNOWN_MODE"
    BAD_K = "BAD_K"
    BAD_THRESHOLD = "BAD_THRESHOLD"
    BAD_LENGTH = "BAD_LENGTH"                  # sample length != the index's samples per signal
    NON_FINITE = "NON_FINITE"                  # NaN or infinity in the sample
    OUT_OF_RANGE = "OUT_OF_RANGE"              # a finite sample beyond +-MAX_ABS_VALUE
    INTERNAL = "INTERNAL"                      # the service failed to process a record (a bug, not the input)
    REPLY_TOO_LARGE = "REPLY_TOO_LARGE"        # the answer was refused by the reply topic as too large
    UNDELIVERABLE_REPLY = "UNDELIVERABLE_REPLY"  # dead letter: the query's own reply topic refused its reply


class IndexInfo(Protocol):
    """What validation needs from an index (``batch_index.search.SearchIndex`` satisfies it)."""

    @property
    def dim(self) -> int: ...
    @property
    def metrics(self) -> tuple[str, ...]: ...
    @property
    def version(self) -> str: ...
    max_k: int


@dataclass(frozen=True)
class Limits:
    """Service-side limits applied on top of the index's own (``k <= min(max_k, index.max_k)``).

    Reply topics: a query may always name ``replies_topic`` (the service's own, where it is answered
    anyway). Any other topic only when ``reply_topic_pattern`` is set and fullmatches it, and never one
    of ``reserved_topics`` (the service's queries and dead-letter topics) or an internal topic (``__``
    prefix, e.g. ``__consumer_offsets``): a sender must not pick where the service writes.
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_k: int = DEFAULT_MAX_K
    reply_topic_pattern: re.Pattern[str] | None = None  # None: per-query reply topics are refused
    reserved_topics: frozenset[str] = frozenset()  # never a reply topic (the service's queries, dead letters)
    replies_topic: str | None = None

    def reply_topic_refusal(self, topic: str) -> str | None:
        """Why a query may not have its reply written to ``topic``; None when it may."""
        if topic == self.replies_topic:
            return None
        shown = echo(topic, 100)
        if not TOPIC_NAME.fullmatch(topic):
            return f"reply topic {shown!r} is not a legal Kafka topic name"
        if topic in self.reserved_topics or topic.startswith("__"):
            return (f"reply topic {shown!r} is one of the service's own or the broker's internal topics; leave it "
                    "empty to get the reply on the service's reply topic")
        if self.reply_topic_pattern is None:
            return (f"reply topic {shown!r} is not allowed: this service answers on its reply topic only "
                    "(per-query reply topics are enabled with --reply-topic-pattern); leave it empty")
        if not self.reply_topic_pattern.fullmatch(topic):
            return f"reply topic {shown!r} is not allowed (must match {self.reply_topic_pattern.pattern!r})"
        return None


DEFAULT_LIMITS: Final[Limits] = Limits()


@dataclass(frozen=True)
class Query:
    """A validated query; ``sample`` has shape (index.dim,), float32, finite."""

    correlation_id: str
    sample: npt.NDArray[np.float32]
    metric: str
    mode: str = "hkmeans"
    k: int = 10
    threshold: float | None = None
    reply_topic: str | None = None
    sent_at: datetime | None = None

    @property
    def group(self) -> tuple[str, str, int, float | None]:
        """Queries with the same group are scored together in one ``index.search`` call."""
        return (self.metric, self.mode, self.k, self.threshold)


@dataclass(frozen=True)
class DecodeError:
    """A rejected message: ``correlation_id``/``reply_topic`` are set when they could be read."""

    code: ErrorCode
    message: str
    correlation_id: str | None = None
    reply_topic: str | None = None
    metric: str | None = None
    mode: str | None = None
    k: int | None = None
    sent_at: datetime | None = None


@dataclass(frozen=True)
class Result:
    """A decoded reply; ``matches`` are (id, score, rank) best first."""

    correlation_id: str
    status: str
    error_code: str | None = None
    error_message: str | None = None
    metric: str | None = None
    mode: str | None = None
    k: int | None = None
    index_version: str | None = None
    matches: list[tuple[str, float, int]] = field(default_factory=list)
    sent_at: datetime | None = None
    received_at: datetime | None = None
    scored_at: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---- queries ------------------------------------------------------------------------------------
def encode_query(correlation_id: str, sample: npt.ArrayLike, metric: str, *, k: int = 10,
                 mode: str = "hkmeans", threshold: float | None = None, reply_topic: str | None = None,
                 sent_at: datetime | None = None) -> bytes:
    """Encode one query (no validation: the service is the judge; see :func:`decode_query`)."""
    samples = np.asarray(sample, dtype=np.float32).ravel()
    sent_at = sent_at or datetime.now(timezone.utc)
    if _fast_encodable(correlation_id, metric, k, mode, threshold, reply_topic, sent_at):
        return _fast_encode_query(correlation_id, samples, metric, k, mode, threshold, reply_topic, sent_at)
    return schemas.encode("query", {
        "correlation_id": correlation_id, "sample": samples.tolist(), "metric": metric, "k": k, "mode": mode,
        "threshold": threshold, "reply_topic": reply_topic, "sent_at": sent_at,
    })


def decode_query(raw: bytes | None, index: IndexInfo, limits: Limits = DEFAULT_LIMITS, *,
                 key: bytes | None = None) -> Query | DecodeError:
    """Decode and validate one query message against ``index``; never raises for bad input.

    ``key`` (the Kafka message key, by convention the correlation id) addresses the error reply when
    the value itself is unreadable.
    """
    fallback_id = id_from_key(key)
    if raw is None or len(raw) == 0:
        return DecodeError(ErrorCode.UNDECODABLE, "empty message", fallback_id)
    if len(raw) > limits.max_bytes:
        size = "more than " if len(raw) == limits.max_bytes + 1 else ""  # the source cuts what is longer
        return DecodeError(ErrorCode.OVERSIZE, f"message of {size}{len(raw) - bool(size)} bytes exceeds the limit "
                           f"of {limits.max_bytes} bytes", fallback_id)
    try:
        rec = _fast_query(raw) if raw[2:schemas.HEADER_LEN] == _FAST_FP and raw[:2] == schemas.MAGIC \
            else schemas.decode("query", raw)
    except schemas.UnknownSchemaError as e:
        return DecodeError(ErrorCode.UNKNOWN_SCHEMA, str(e), fallback_id)
    except (schemas.UndecodableError, _Malformed) as e:
        cid = fallback_id
        if schemas.writer_family(raw) == "query":  # truncated/garbled query: its first field may survive
            try:
                cid = id_from_key(_read_bytes(raw, schemas.HEADER_LEN)[0]) or fallback_id
            except _Malformed:
                pass
        return DecodeError(ErrorCode.UNDECODABLE, str(e), cid)
    return _validate(rec, index, limits)


def _validate(rec: dict[str, Any], index: IndexInfo, limits: Limits) -> Query | DecodeError:
    cid, metric, mode, k, thr = rec["correlation_id"], rec["metric"], rec["mode"], rec["k"], rec["threshold"]
    reply_topic = rec["reply_topic"]

    def err(code: ErrorCode, msg: str, **kw: Any) -> DecodeError:
        # what a sender wrote is echoed bounded: an error reply must stay small whatever the query held
        ctx = {"correlation_id": cid, "reply_topic": reply_topic, "metric": echo(metric, MAX_ECHO),
               "mode": echo(mode, MAX_ECHO), "k": k, "sent_at": rec["sent_at"], **kw}
        return DecodeError(code, msg, **ctx)

    if not 1 <= len(cid) <= MAX_CORRELATION_ID:
        return err(ErrorCode.BAD_CORRELATION_ID, f"correlation id must have 1..{MAX_CORRELATION_ID} "
                   f"characters, got {len(cid)}", correlation_id=None)
    if reply_topic is not None:
        refusal = limits.reply_topic_refusal(reply_topic)
        if refusal is not None:
            return err(ErrorCode.BAD_REPLY_TOPIC, refusal, reply_topic=None)
    sample = rec["sample"]
    sample = sample if isinstance(sample, np.ndarray) else np.asarray(sample, dtype=np.float32)
    problem = query_problem(index, sample[None, :], metric, mode, k, thr, limits.max_k)  # the one rule set
    if problem is not None:
        return err(ErrorCode(problem.code), problem.message)
    return Query(cid, sample, metric, mode, int(k), None if thr is None else float(thr), reply_topic,
                 rec["sent_at"])


def id_from_key(b: bytes | None) -> str | None:
    """A record key as a correlation id (by convention the key is the id); None if it cannot be one."""
    if not b:
        return None
    try:
        s = bytes(b).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return s if len(s) <= MAX_CORRELATION_ID else None


# ---- fast path for the current query schema -------------------------------------------------------
# fastavro builds a Python list of 2,500 floats per query (0.2 ms); reading the float array straight
# into numpy is ~20x faster, and so is writing it (encode_query). Used only for this exact writer
# schema (tests pin both equal to fastavro); if query.avsc changes, its fingerprint changes and every
# message takes the fastavro path.
_FAST_FP: Final[bytes] = bytes.fromhex("8245a9b2399a41a4")


class _Malformed(ValueError):
    pass


def _fast_encodable(cid: object, metric: object, k: object, mode: object, threshold: object, reply_topic: object,
                    sent_at: datetime) -> bool:
    """Inputs the byte-level writer encodes exactly as fastavro would; anything else takes fastavro's path."""
    return (schemas.fingerprint("query") == _FAST_FP and isinstance(cid, str) and isinstance(metric, str)
            and isinstance(mode, str) and type(k) is int and -(2**31) <= k < 2**31
            and (threshold is None or type(threshold) is float)
            and (reply_topic is None or isinstance(reply_topic, str))
            and isinstance(sent_at, datetime) and sent_at.tzinfo is not None)


def _varint(n: int) -> bytes:
    """Avro's zigzag variable-length long."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _avro_str(text: str) -> bytes:
    b = text.encode("utf-8")
    return _varint(len(b)) + b


def _fast_encode_query(cid: str, sample: npt.NDArray[np.float32], metric: str, k: int, mode: str,
                       threshold: float | None, reply_topic: str | None, sent_at: datetime) -> bytes:
    """The query's bytes without a Python list of 2,500 floats (fastavro's path: 0.3 ms a query, 10x this).

    Client-side, so a sender on the service's machine leaves it the CPU. Tests pin it equal to fastavro.
    """
    delta = sent_at - EPOCH  # fastavro's timestamp-millis: whole days and seconds, then truncated microseconds
    millis = (delta.days * 86400 + delta.seconds) * 1000 + int(delta.microseconds / 1000)
    parts = [schemas.MAGIC, _FAST_FP, _avro_str(cid)]
    if sample.size:
        parts += [_varint(sample.size), sample.astype("<f4", copy=False).tobytes()]
    parts += [b"\x00", _avro_str(metric), _varint(k), _avro_str(mode),
              b"\x00" if threshold is None else b"\x02" + struct.pack("<d", threshold),
              b"\x00" if reply_topic is None else b"\x02" + _avro_str(reply_topic), _varint(millis)]
    return b"".join(parts)


def _read_long(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(pos, min(pos + 10, len(buf))):
        b = buf[i]
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), i + 1
        shift += 7
    raise _Malformed(f"truncated or overlong varint at byte {pos}")


def _read_bytes(buf: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = _read_long(buf, pos)
    if n < 0 or pos + n > len(buf):
        raise _Malformed(f"string of length {n} at byte {pos} overruns the {len(buf)}-byte message")
    return buf[pos:pos + n], pos + n


def _read_str(buf: bytes, pos: int) -> tuple[str, int]:
    b, pos = _read_bytes(buf, pos)
    try:
        return b.decode("utf-8"), pos
    except UnicodeDecodeError as e:
        raise _Malformed(f"invalid UTF-8 in string ending at byte {pos}") from e


def _fast_query(raw: bytes) -> dict[str, Any]:
    buf = bytes(raw)
    cid, p = _read_str(buf, schemas.HEADER_LEN)
    chunks = []
    while True:
        n, p = _read_long(buf, p)
        if n == 0:
            break
        if n < 0:
            n = -n
            _, p = _read_long(buf, p)  # block size in bytes
        if p + 4 * n > len(buf):
            raise _Malformed(f"float array block of {n} items overruns the message")
        chunks.append(np.frombuffer(buf, dtype="<f4", count=n, offset=p))
        p += 4 * n
    sample = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    metric, p = _read_str(buf, p)
    k, p = _read_long(buf, p)
    if not -(2**31) <= k < 2**31:
        raise _Malformed(f"k={k} does not fit an Avro int")
    mode, p = _read_str(buf, p)
    branch, p = _read_long(buf, p)
    if branch not in (0, 1) or (branch and p + 8 > len(buf)):
        raise _Malformed(f"bad threshold union branch {branch}")
    threshold = struct.unpack_from("<d", buf, p)[0] if branch else None
    p += 8 * branch
    branch, p = _read_long(buf, p)
    if branch not in (0, 1):
        raise _Malformed(f"bad reply_topic union branch {branch}")
    reply_topic = None
    if branch:
        reply_topic, p = _read_str(buf, p)
    millis, p = _read_long(buf, p)
    if p != len(buf):
        raise _Malformed(f"{len(buf) - p} trailing byte(s) after the query record")
    try:
        sent_at = EPOCH + timedelta(milliseconds=millis)
    except OverflowError as e:
        raise _Malformed(f"sent_at {millis} ms is out of range") from e
    return {"correlation_id": cid, "sample": sample, "metric": metric, "k": k, "mode": mode,
            "threshold": threshold, "reply_topic": reply_topic, "sent_at": sent_at}


# ---- results and dead letters ---------------------------------------------------------------------
def encode_result(correlation_id: str, *, matches: Sequence[tuple[str, float, int]] = (),
                  error: DecodeError | None = None, error_code: str | None = None,
                  error_message: str | None = None, metric: str | None = None, mode: str | None = None,
                  k: int | None = None, index_version: str | None = None, sent_at: datetime | None = None,
                  received_at: datetime, scored_at: datetime) -> bytes:
    """Encode a reply; pass ``error`` (or ``error_code`` + ``error_message``) for an error reply."""
    if error is not None:
        error_code, error_message = error.code.value, error.message
        metric, mode, k, sent_at = error.metric, error.mode, error.k, error.sent_at
    if error_message is not None:
        error_message = echo(error_message, MAX_REASON)
    return schemas.encode("result", {
        "correlation_id": correlation_id, "status": "error" if error_code else "ok",
        "error_code": error_code, "error_message": error_message, "metric": metric, "mode": mode, "k": k,
        "index_version": index_version,
        "matches": [{"id": m[0], "score": float(m[1]), "rank": int(m[2])} for m in matches],
        "sent_at": sent_at, "received_at": received_at, "scored_at": scored_at,
    })


def decode_result(raw: bytes) -> Result:
    """Decode a reply (raises :class:`schemas.WireFormatError` for bytes that are not one)."""
    rec = schemas.decode("result", raw)
    rec["matches"] = [(m["id"], m["score"], m["rank"]) for m in rec["matches"]]
    return Result(**rec)


def encode_dead_letter(*, value: bytes | None, key: bytes | None, topic: str, partition: int, offset: int,
                       timestamp: datetime | None, error: DecodeError, failed_at: datetime,
                       max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """A dead-letter record: the raw message (cut at ``max_bytes``), where it came from and why.

    Every part is bounded, so a dead letter is at most ``max_bytes + DEAD_LETTER_OVERHEAD`` bytes
    whatever its record held (a huge key, a huge value, a long reason).
    """
    return schemas.encode("dead_letter", {
        "value": None if value is None else bytes(value[:max_bytes]),
        "key": None if key is None else bytes(key[:MAX_DEAD_KEY]),
        "topic": topic[:249], "partition": int(partition), "offset": int(offset), "timestamp": timestamp,
        "error_code": error.code.value[:MAX_ECHO], "reason": echo(error.message, MAX_REASON),
        "correlation_id": error.correlation_id, "failed_at": failed_at,
    })


def decode_dead_letter(raw: bytes) -> dict[str, Any]:
    return schemas.decode("dead_letter", raw)
