"""Hostile messages for the reliability tests and ``tools/fault_injection.py`` (never imported by the service).

:func:`hostile_messages`: a reproducible mix of messages the service must contain (random bytes,
truncated Avro, valid Avro of other schemas, wrong lengths, NaN/inf, k out of range, unknown metric or
mode, empty and oversize messages, hostile reply topics, ...), each with the error codes it may earn,
the correlation id its error reply must carry (None: the sender cannot be named, dead letter only),
and hostile Kafka metadata (timestamps, headers) to produce it with.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Final

import fastavro
import numpy as np

import schemas
from streaming.codec import MAX_CORRELATION_ID, encode_query

HOSTILE_KINDS: Final[tuple[str, ...]] = (
    "random_bytes", "truncated", "other_schema_result", "other_schema_dead_letter", "unknown_fingerprint",
    "headerless_avro", "wrong_length", "nan", "inf", "huge_k", "negative_k", "zero_k", "unknown_metric",
    "unknown_mode", "empty", "tombstone", "oversize", "long_correlation_id", "bad_threshold", "bad_reply_topic",
    "reserved_reply_topic", "trailing_bytes", "bad_utf8_id", "huge_array_block", "keyless_garbage",
    "fresh_reply_topic", "internal_reply_topic", "huge_sample_value", "huge_metric", "huge_key_garbage",
)
#: CreateTime values a sender may set: Python's and Spark's range ends and beyond, "none" (-1), int64's max
HOSTILE_TIMESTAMPS: Final[tuple[int, ...]] = (
    253402300800001, 253402300799999, -62135596800001, -62135596800000, -1, 1, 2**62, 2**63 - 1)


@dataclass(frozen=True)
class Hostile:
    """One hostile message and what the service must make of it."""

    kind: str
    key: bytes | None
    value: bytes | None
    codes: frozenset[str]   # the error codes it may be rejected with
    reply_id: str | None    # the correlation id of its error reply; None = dead letter only
    timestamp: int = 0      # the record's CreateTime (0: the producer's clock)
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @property
    def size(self) -> int:
        return len(self.value or b"") + len(self.key or b"")

    @property
    def produce_kwargs(self) -> dict[str, object]:
        """Keyword arguments of ``Producer.produce`` that give the record its hostile metadata."""
        return {"timestamp": self.timestamp, **({"headers": list(self.headers)} if self.headers else {})}


def hostile_messages(n: int, *, dim: int, max_bytes: int, max_k: int, queries_topic: str, seed: int = 0,
                     id_prefix: str = "hostile") -> list[Hostile]:
    """``n`` hostile messages cycling through :data:`HOSTILE_KINDS` (same seed, same bytes).

    Their Kafka metadata is hostile too: the timestamps cycle through :data:`HOSTILE_TIMESTAMPS`
    (and the producer's clock), and every seventh record carries ~0.5 MB of binary headers.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h = _hostile(HOSTILE_KINDS[i % len(HOSTILE_KINDS)], f"{id_prefix}-{i}", rng, dim, max_bytes, max_k,
                     queries_topic)
        stamps = (0, *HOSTILE_TIMESTAMPS)
        headers = tuple((f"h{j}", rng.bytes(10_000) if j % 5 else None) for j in range(50)) if i % 7 == 3 else ()
        out.append(replace(h, timestamp=stamps[i % len(stamps)], headers=headers))
    return out


def _hostile(kind: str, cid: str, rng: np.random.Generator, dim: int, max_bytes: int, max_k: int,
             queries_topic: str) -> Hostile:
    sample = rng.normal(0, 1, dim).astype(np.float32)
    key = cid.encode()

    def q(**kw: object) -> bytes:
        args = {"metric": "cosine", "k": 5, "mode": "exact", **kw}
        return encode_query(str(args.pop("cid", cid)), args.pop("sample", sample), **args)  # type: ignore[arg-type]

    def h(value: bytes | None, *codes: str, reply: str | None = cid, k: bytes | None = key) -> Hostile:
        return Hostile(kind, k, value, frozenset(codes), reply)

    if kind == "random_bytes":
        raw = rng.bytes(int(rng.integers(1, 2000)))
        return h(b"\x00" + raw[1:] if raw[:1] == schemas.MAGIC[:1] else raw, "UNDECODABLE")
    if kind == "truncated":
        raw = q()
        return h(raw[:int(rng.integers(1, len(raw)))], "UNDECODABLE")
    if kind == "other_schema_result":
        now = datetime.now(timezone.utc)
        return h(schemas.encode("result", {"correlation_id": cid, "status": "ok", "matches": [],
                                           "received_at": now, "scored_at": now}), "UNKNOWN_SCHEMA")
    if kind == "other_schema_dead_letter":
        return h(schemas.encode("dead_letter", {"value": b"x", "topic": "t", "partition": 0, "offset": 1,
                                                "error_code": "X", "reason": "y",
                                                "failed_at": datetime.now(timezone.utc)}), "UNKNOWN_SCHEMA")
    if kind == "unknown_fingerprint":
        return h(schemas.MAGIC + rng.bytes(8) + q()[schemas.HEADER_LEN:], "UNKNOWN_SCHEMA")
    if kind == "headerless_avro":  # a valid query body without the single-object header
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schemas.load_schema("query"), {
            "correlation_id": cid, "sample": sample.tolist(), "metric": "cosine", "k": 5, "mode": "exact",
            "threshold": None, "reply_topic": None, "sent_at": datetime.now(timezone.utc)})
        return h(buf.getvalue(), "UNDECODABLE")
    if kind == "wrong_length":
        n = int(rng.integers(0, 2 * dim))
        n = n + 1 if n == dim else n
        return h(q(sample=rng.normal(0, 1, n).astype(np.float32)), "BAD_LENGTH")
    if kind in ("nan", "inf"):
        bad = sample.copy()
        bad[int(rng.integers(dim))] = np.nan if kind == "nan" else rng.choice([np.inf, -np.inf])
        return h(q(sample=bad), "NON_FINITE")
    if kind == "huge_k":
        return h(q(k=int(rng.choice([max_k + 1, 10**6, 2**31 - 1]))), "BAD_K")
    if kind == "negative_k":
        return h(q(k=int(rng.choice([-1, -5, -(2**31)]))), "BAD_K")
    if kind == "zero_k":
        return h(q(k=0), "BAD_K")
    if kind == "unknown_metric":
        return h(q(metric=str(rng.choice(["hamming", "", "COSINE", "cosine ", "dtw", "\u00e9uclidean"]))),
                 "UNKNOWN_METRIC")
    if kind == "unknown_mode":
        return h(q(mode=str(rng.choice(["lsh", "", "EXACT", "ivf", "hnsw"]))), "UNKNOWN_MODE")
    if kind == "empty":
        return h(b"", "UNDECODABLE")
    if kind == "tombstone":
        return h(None, "UNDECODABLE")
    if kind == "oversize":
        per_float = 4
        n = (max_bytes + int(rng.integers(1, 4096))) // per_float + 1
        return h(q(sample=rng.normal(0, 1, n).astype(np.float32)), "OVERSIZE")
    if kind == "long_correlation_id":
        long_id = cid + "x" * (MAX_CORRELATION_ID + 1 - len(cid))
        return h(q(cid=long_id), "BAD_CORRELATION_ID", reply=None, k=long_id.encode())
    if kind == "bad_threshold":
        return h(q(threshold=float("nan")), "BAD_THRESHOLD")
    if kind == "bad_reply_topic":
        return h(q(reply_topic=str(rng.choice(["no spaces allowed", "", "x" * 300, "a/b", "..\u00e9"]))),
                 "BAD_REPLY_TOPIC")
    if kind == "reserved_reply_topic":
        return h(q(reply_topic=queries_topic), "BAD_REPLY_TOPIC")
    if kind == "trailing_bytes":
        return h(q() + rng.bytes(int(rng.integers(1, 16))), "UNDECODABLE")
    if kind == "bad_utf8_id":
        raw = bytearray(q(cid="u" * 8))
        raw[schemas.HEADER_LEN + 1:schemas.HEADER_LEN + 9] = b"\xff" * 8  # after the length byte
        return h(bytes(raw), "UNDECODABLE")
    if kind == "huge_array_block":
        raw = q()
        head = schemas.HEADER_LEN + 1 + len(cid.encode())  # past the correlation id
        return h(raw[:head] + _zigzag(1 << 40) + raw[head + 3:head + 200], "UNDECODABLE")
    if kind == "keyless_garbage":
        return h(b"\x01" + rng.bytes(int(rng.integers(1, 64))), "UNDECODABLE", reply=None, k=None)
    if kind == "fresh_reply_topic":  # a legal name no topic has: would create one on an auto-creating producer
        return h(q(reply_topic=f"fresh-{cid}-{int(rng.integers(1 << 30))}"), "BAD_REPLY_TOPIC")
    if kind == "internal_reply_topic":
        return h(q(reply_topic=str(rng.choice(["__consumer_offsets", "__transaction_state"]))), "BAD_REPLY_TOPIC")
    if kind == "huge_sample_value":  # finite, but would overflow float32 sums in the compiled kernels
        big = sample.copy()
        big[int(rng.integers(dim))] = float(rng.choice([3e38, -1e30, 1e13]))
        return h(q(sample=big), "OUT_OF_RANGE")
    if kind == "huge_metric":  # its echo in the error reply must stay bounded
        return h(q(metric="m" * min(10_000, max_bytes // 4)), "UNKNOWN_METRIC")
    if kind == "huge_key_garbage":
        return h(b"\x00" + rng.bytes(int(rng.integers(1, 512))), "UNDECODABLE", reply=None, k=rng.bytes(1 << 20))
    raise ValueError(f"unknown hostile kind {kind!r}")


def _zigzag(n: int) -> bytes:
    z, out = (n << 1) ^ (n >> 63), bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)
