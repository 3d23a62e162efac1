"""Queries validated once at the door; results and dead letters on the wire."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import fastavro
import numpy as np
import pytest

import schemas
from streaming import codec
from streaming.codec import DecodeError, ErrorCode, Limits, Query

T0 = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
GOLDEN_QUERY = bytes.fromhex(
    "c3018245a9b2399a41a4" "06712d31" "06" "0000003f000080bf00000040" "00" "0c636f73696e65" "06"
    "0a6578616374" "02000000000000d03f" "020272" "dcec86829963")
GOLDEN_RESULT = bytes.fromhex(
    "c3015471e0570dd75752" "06712d31" "00" "00" "00" "020c636f73696e65" "020a6578616374" "0204" "02047631"
    "04" "0261000000000000e83f02" "0262000000000000e03f04" "00" "02dcec86829963" "dcec86829963"
    "dcec86829963")


@dataclass
class FakeIndex:
    """The four attributes validation reads from a ``SearchIndex``."""

    dim: int = 3
    metrics: tuple[str, ...] = ("cosine", "euclidean")
    version: str = "v-test"
    max_k: int = 50


IDX = FakeIndex()


def q(sample: object = (0.5, -1.0, 2.0), metric: str = "cosine", **kw: object) -> bytes:
    return codec.encode_query(kw.pop("cid", "q-1"), sample, metric, sent_at=T0, **kw)  # type: ignore[arg-type]


def test_golden_query_bytes() -> None:
    raw = codec.encode_query("q-1", [0.5, -1.0, 2.0], "cosine", k=3, mode="exact", threshold=0.25,
                             reply_topic="r", sent_at=T0)
    assert raw == GOLDEN_QUERY


def test_golden_result_bytes() -> None:
    raw = codec.encode_result("q-1", matches=[("a", 0.75, 1), ("b", 0.5, 2)], metric="cosine", mode="exact",
                              k=2, index_version="v1", sent_at=T0, received_at=T0, scored_at=T0)
    assert raw == GOLDEN_RESULT
    res = codec.decode_result(raw)
    assert res.ok and res.matches == [("a", 0.75, 1), ("b", 0.5, 2)] and res.scored_at == T0


def test_query_round_trip() -> None:
    got = codec.decode_query(GOLDEN_QUERY, IDX, Limits(replies_topic="r"))  # its reply topic is the service's
    assert isinstance(got, Query)
    assert (got.correlation_id, got.metric, got.mode, got.k, got.threshold, got.reply_topic, got.sent_at) == (
        "q-1", "cosine", "exact", 3, 0.25, "r", T0)
    assert got.sample.dtype == np.float32 and got.sample.tolist() == [0.5, -1.0, 2.0]
    assert got.group == ("cosine", "exact", 3, 0.25)


@pytest.mark.parametrize("seed", range(20))
def test_fast_path_equals_fastavro(seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = codec.encode_query(f"id-{seed}-é", rng.standard_normal(int(rng.integers(0, 300))), "dot",
                             k=int(rng.integers(-5, 2**31 - 1)), mode=["exact", "hkmeans", "x"][seed % 3],
                             threshold=None if seed % 2 else float(rng.standard_normal()),
                             reply_topic=None if seed % 3 else "replies", sent_at=T0)
    fast = codec._fast_query(raw)
    slow = fastavro.schemaless_reader(io.BytesIO(raw[10:]), schemas.load_schema("query"))
    assert fast.pop("sample").tolist() == pytest.approx(slow.pop("sample"))
    assert fast == slow


@pytest.mark.parametrize("seed", range(20))
def test_fast_writer_equals_fastavro(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal(int(rng.integers(0, 300))).astype(np.float32)
    if seed == 3:
        sample[:3] = [np.inf, -0.0, np.float32(1e-40)]  # non-finite and subnormal floats: the service judges them
    sent = T0 + timedelta(days=int(rng.integers(-30000, 30000)), microseconds=int(rng.integers(0, 10**9)))
    fields = dict(k=int(rng.integers(-(2**31), 2**31)), mode=["exact", "hkmeans", "ünknown"][seed % 3],
                  threshold=None if seed % 2 else float(rng.standard_normal()),
                  reply_topic=None if seed % 3 else "replies", sent_at=sent)
    fast = codec.encode_query(f"id-{seed}-é", sample, "dot", **fields)
    slow = schemas.encode("query", {"correlation_id": f"id-{seed}-é", "sample": sample.tolist(), "metric": "dot",
                                    **fields})
    assert fast == slow


def test_writer_falls_back_to_fastavro_for_what_it_does_not_take() -> None:
    # a numpy integer k, an int threshold and a naive sent_at are fastavro's to convert (or refuse)
    raw = codec.encode_query("x", [1.0, 2.0], "cosine", k=np.int64(4), threshold=1, sent_at=datetime(2026, 1, 2, 3))
    rec = fastavro.schemaless_reader(io.BytesIO(raw[10:]), schemas.load_schema("query"))
    assert (rec["k"], rec["threshold"], rec["sample"]) == (4, 1.0, [1.0, 2.0])


def test_fast_path_is_pinned_to_current_schema() -> None:
    # If query.avsc changes, update codec._fast_query and codec._FAST_FP together.
    assert codec._FAST_FP == schemas.fingerprint("query")


def test_fast_path_handles_negative_block_counts() -> None:
    # Avro writers may emit array blocks as (-count, byte size, items); fastavro never does, others do.
    body = bytearray(GOLDEN_QUERY)
    at = body.index(bytes.fromhex("060000003f"))
    body[at:at + 1] = bytes.fromhex("0310")  # a block of -2 items (zigzag 3) of 8 bytes (zigzag 16) ...
    body[at + 2 + 8:at + 2 + 8] = bytes.fromhex("02")  # ... then a block of 1 item
    got = codec.decode_query(bytes(body), IDX, Limits(replies_topic="r"))
    assert isinstance(got, Query) and got.sample.tolist() == [0.5, -1.0, 2.0]
    assert fastavro.schemaless_reader(io.BytesIO(bytes(body[10:])), schemas.load_schema("query"))["sample"] == [
        0.5, -1.0, 2.0]


def _err(raw: bytes | None, index: FakeIndex = IDX, limits: Limits = codec.DEFAULT_LIMITS, key: bytes | None = None
         ) -> DecodeError:
    got = codec.decode_query(raw, index, limits, key=key)
    assert isinstance(got, DecodeError), got
    return got


@pytest.mark.parametrize("raw, code", [
    (q(sample=[0.5, 1.0]), ErrorCode.BAD_LENGTH),
    (q(sample=[0.5, np.nan, 1.0]), ErrorCode.NON_FINITE),
    (q(sample=[0.5, -np.inf, 1.0]), ErrorCode.NON_FINITE),
    (q(metric="hamming"), ErrorCode.UNKNOWN_METRIC),
    (q(metric="dot"), ErrorCode.METRIC_NOT_INDEXED),
    (q(mode="fast"), ErrorCode.UNKNOWN_MODE),
    (q(k=0), ErrorCode.BAD_K),
    (q(k=-3), ErrorCode.BAD_K),
    (q(k=51), ErrorCode.BAD_K),
    (q(k=2**31 - 1), ErrorCode.BAD_K),
    (q(threshold=float("nan")), ErrorCode.BAD_THRESHOLD),
    (q(threshold=float("inf")), ErrorCode.BAD_THRESHOLD),
    (q(reply_topic="no spaces/allowed"), ErrorCode.BAD_REPLY_TOPIC),
])
def test_invalid_queries_get_specific_codes_and_keep_their_id(raw: bytes, code: ErrorCode) -> None:
    err = _err(raw)
    assert err.code is code and err.correlation_id == "q-1" and err.message


def test_error_messages_name_the_bad_value() -> None:
    assert "2 values" in _err(q(sample=[1.0, 2.0])).message and "expects 3" in _err(q(sample=[1.0, 2.0])).message
    assert "'hamming'" in _err(q(metric="hamming")).message
    assert "1..50" in _err(q(k=99)).message


def test_service_limits_tighten_the_index_limits() -> None:
    assert _err(q(k=11), limits=Limits(max_k=10)).code is ErrorCode.BAD_K
    assert _err(q(reply_topic="other"), limits=Limits(reply_topic_pattern=re.compile(r"replies\..*"))
                ).code is ErrorCode.BAD_REPLY_TOPIC
    assert isinstance(codec.decode_query(q(reply_topic="replies.me"), IDX,
                                         Limits(reply_topic_pattern=re.compile(r"replies\..*"))), Query)
    big = q(sample=np.zeros(2000))
    err = _err(big, limits=Limits(max_bytes=len(big) - 1), key=b"k-9")
    assert err.code is ErrorCode.OVERSIZE and err.correlation_id == "k-9"


@pytest.mark.parametrize("raw, code", [
    (None, ErrorCode.UNDECODABLE),
    (b"", ErrorCode.UNDECODABLE),
    (b"hello world", ErrorCode.UNDECODABLE),
    (GOLDEN_QUERY[:-3], ErrorCode.UNDECODABLE),
    (GOLDEN_QUERY + b"\x00", ErrorCode.UNDECODABLE),
    (b"\xc3\x01" + b"\x11" * 8 + GOLDEN_QUERY[10:], ErrorCode.UNKNOWN_SCHEMA),
    (GOLDEN_RESULT, ErrorCode.UNKNOWN_SCHEMA),
])
def test_unreadable_messages(raw: bytes | None, code: ErrorCode) -> None:
    assert _err(raw).code is code


def test_truncated_query_still_names_its_sender() -> None:
    assert _err(GOLDEN_QUERY[:20]).correlation_id == "q-1"
    assert _err(b"garbage", key=b"from-key").correlation_id == "from-key"
    assert _err(b"garbage", key=b"\xff\xfe").correlation_id is None


def test_empty_correlation_id_is_not_replied_to() -> None:
    err = _err(q(cid=""))
    assert err.code is ErrorCode.BAD_CORRELATION_ID and err.correlation_id is None


@pytest.mark.parametrize("seed", range(200))
def test_random_bytes_never_raise(seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = bytearray(GOLDEN_QUERY if seed % 2 else rng.bytes(int(rng.integers(0, 64))))
    if seed % 2:  # flip some bytes of a valid query after the header
        for i in rng.integers(10, len(raw), size=3):
            raw[i] = int(rng.integers(0, 256))
    assert isinstance(codec.decode_query(bytes(raw), IDX), (Query, DecodeError))


def test_reply_topics_are_the_services_unless_a_pattern_opts_in() -> None:
    service = Limits(replies_topic="ecg-replies", reserved_topics=frozenset({"ecg-queries", "ecg-dead-letters"}))
    assert isinstance(codec.decode_query(q(reply_topic="ecg-replies"), IDX, service), Query)
    for topic in ("fresh-topic-1", "__consumer_offsets", "ecg-queries", "ecg-dead-letters", "x" * 300):
        err = _err(q(reply_topic=topic), limits=service)
        assert err.code is ErrorCode.BAD_REPLY_TOPIC and err.reply_topic is None, topic  # replied on the service's
    assert "--reply-topic-pattern" in _err(q(reply_topic="fresh-topic-1"), limits=service).message
    opted = Limits(reply_topic_pattern=re.compile(r".*"), replies_topic="ecg-replies",
                   reserved_topics=frozenset({"ecg-queries", "ecg-dead-letters"}))
    assert isinstance(codec.decode_query(q(reply_topic="fresh-topic-1"), IDX, opted), Query)
    for topic in ("__consumer_offsets", "__transaction_state", "ecg-queries", "ecg-dead-letters", "a b"):
        assert _err(q(reply_topic=topic), limits=opted).code is ErrorCode.BAD_REPLY_TOPIC, topic  # even with .*


def test_huge_but_finite_samples_are_refused() -> None:
    err = _err(q(sample=[0.5, 3e38, 1.0]))
    assert err.code is ErrorCode.OUT_OF_RANGE and "sample value 1" in err.message and "1e+12" in err.message
    assert isinstance(codec.decode_query(q(sample=[0.5, -1e12, 1.0]), IDX), Query)  # the bound itself is fine


def test_what_a_sender_wrote_is_echoed_bounded() -> None:
    err = _err(q(metric="m" * 100_000, mode="x" * 100_000))
    res = codec.decode_result(codec.encode_result("q-1", error=err, received_at=T0, scored_at=T0))
    assert len(res.metric) <= codec.MAX_ECHO and len(res.mode) <= codec.MAX_ECHO
    assert len(res.error_message) <= codec.MAX_REASON
    huge = codec.DecodeError(ErrorCode.INTERNAL, "r" * 10**6, "q-1")
    raw = codec.encode_dead_letter(value=b"v" * 5000, key=b"k" * 10**6, topic="t" * 249, partition=0, offset=1,
                                   timestamp=None, error=huge, failed_at=T0, max_bytes=4000)
    assert len(raw) <= 4000 + codec.DEAD_LETTER_OVERHEAD
    dl = codec.decode_dead_letter(raw)
    assert len(dl["value"]) == 4000 and len(dl["key"]) == codec.MAX_DEAD_KEY and len(dl["reason"]) <= codec.MAX_REASON


def test_error_result_and_dead_letter_round_trip() -> None:
    err = _err(q(metric="hamming"))
    res = codec.decode_result(codec.encode_result("q-1", error=err, index_version="v-test",
                                                  received_at=T0, scored_at=T0))
    assert (res.status, res.error_code, res.metric, res.k, res.matches) == (
        "error", "UNKNOWN_METRIC", "hamming", 10, [])
    dl = codec.decode_dead_letter(codec.encode_dead_letter(
        value=b"raw", key=None, topic="t", partition=2, offset=41, timestamp=T0, error=err, failed_at=T0))
    assert (dl["value"], dl["topic"], dl["partition"], dl["offset"], dl["error_code"], dl["correlation_id"]) == (
        b"raw", "t", 2, 41, "UNKNOWN_METRIC", "q-1")
