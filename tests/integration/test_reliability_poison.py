"""Promise 3, continued: no single record stops the job, and senders never choose where it writes.

Against the real broker and a real local Spark:

- hostile Kafka *metadata* (record timestamps at both ends of the range and beyond it, huge binary
  headers, huge keys, null values, a value larger than a fetch) on valid queries and on garbage: the
  valid queries are answered correctly, the garbage is dead-lettered with its coordinates, the job
  stays up, and the broker holds exactly the topics it held before;
- reply topics named by senders (fresh names, ``__consumer_offsets``, the service's own topics) are
  refused by default; opted in by a pattern, a reply to a topic that does not exist is recorded in a
  dead letter, never creates the topic;
- a broker that stops answering *during* delivery for longer than ``message.timeout.ms``: every reply
  is still delivered once it is back;
- a reply or dead letter too large for the producer's limit is replaced by its bounded stand-in;
- offsets the source never saw (transaction markers here; retention in production) are counted, also
  across a restart from the checkpoint.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient

from devtools.broker import ControllableBroker
from devtools.hostile import HOSTILE_TIMESTAMPS
from streaming.admin import create_topics
from streaming.client import StreamClient
from streaming.codec import DEAD_LETTER_OVERHEAD, decode_dead_letter, encode_query
from streaming.config import ServeConfig
from streaming.handler import BatchHandler
from streaming.scoring import Outgoing
from streaming.sink import DeliveryReport

from .reliability import REPLY_TIMEOUT, brute_force, read_topic, running, wait_for

MAX_BYTES = 32 << 10


def _topics(bootstrap: str) -> set[str]:
    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics)


def _producer(bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 64 << 20})


def _send(p: Producer, topic: str, value: bytes | None, key: bytes | None = None, **kw: Any) -> None:
    errors: list[KafkaError] = []
    p.produce(topic, value, key, on_delivery=lambda err, _m: errors.append(err) if err else None, **kw)
    assert p.flush(30) == 0 and not errors, errors


def _config(bootstrap: str, make_topic: Callable[..., str], tmp_path: Path, **kw: Any) -> ServeConfig:
    return ServeConfig(bootstrap=bootstrap, index=kw.pop("index"), queries_topic=make_topic("q"),
                       replies_topic=make_topic("r"), dead_letter_topic=make_topic("dlq"),
                       checkpoint=str(tmp_path / "ck"), max_message_bytes=MAX_BYTES, max_queries_per_batch=50, **kw)


def test_hostile_metadata_never_stops_the_job_and_creates_no_topic(
        spark: object, kafka_bootstrap: str, make_topic: Callable[..., str], index_dir: Path,
        corpus: tuple[list[str], np.ndarray], tmp_path: Path) -> None:
    ids, signals = corpus
    cfg = _config(kafka_bootstrap, make_topic, tmp_path, index=str(index_dir))
    rng = np.random.default_rng(3)
    before = _topics(kafka_bootstrap)
    p = _producer(kafka_bootstrap)
    valid: dict[str, int] = {}  # correlation id -> corpus row; each carries hostile metadata

    def query(cid: str, row: int, **kw: Any) -> bytes:
        valid[cid] = row
        return encode_query(cid, signals[row], "euclidean", k=3, mode="exact", **kw)

    for i, ts in enumerate(HOSTILE_TIMESTAMPS):
        _send(p, cfg.queries_topic, query(f"ts-{i}", i), f"ts-{i}".encode(), timestamp=ts)
    headers = [(f"h{j}", rng.bytes(10_000)) for j in range(100)] + [("bin\x00ary", b"\x00\xff"), ("none", None)]
    _send(p, cfg.queries_topic, query("headers", 10), b"headers", headers=headers)
    _send(p, cfg.queries_topic, query("huge-key", 11), rng.bytes(2 << 20))  # the id is in the value
    hostile_reply_topics = [f"fresh-{i}-{os.getpid()}" for i in range(30)]
    hostile_reply_topics += ["__consumer_offsets", cfg.queries_topic, cfg.dead_letter_topic]
    refused = {}
    for i, topic in enumerate(hostile_reply_topics):  # refused by default: answered with BAD_REPLY_TOPIC
        cid = f"topic-{i}"
        refused[cid] = topic
        _send(p, cfg.queries_topic, encode_query(cid, signals[i], "cosine", k=3, reply_topic=topic), cid.encode())
    garbage = {  # key -> value: dead letters (and error replies where the key names a sender)
        b"tombstone": None, None: None, b"big": rng.bytes(12 << 20), rng.bytes(1 << 20): b"not avro",
    }
    for key, value in garbage.items():
        _send(p, cfg.queries_topic, value, key, timestamp=HOSTILE_TIMESTAMPS[0])

    with StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as client:
        for cid in [*valid, *refused, "tombstone", "big"]:
            client.track(cid)
        with running(spark, cfg) as (handler, query_):
            got = client.collect([*valid, *refused, "tombstone", "big"], REPLY_TIMEOUT)
            dead = read_topic(kafka_bootstrap, cfg.dead_letter_topic, n=len(garbage) + len(refused),
                              timeout=REPLY_TIMEOUT)
            late = client.send(signals[7], "cosine", k=1, mode="exact")  # still serving
            assert client.collect([late], REPLY_TIMEOUT)[late].result.matches[0][0] == ids[7]
            assert query_.isActive and query_.exception() is None
    for cid, row in valid.items():
        res = got[cid].result
        assert res.ok and [m[0] for m in res.matches] == brute_force(signals, ids, signals[row], "euclidean", 3), cid
    for cid in refused:
        res = got[cid].result
        assert res.error_code == "BAD_REPLY_TOPIC", (cid, res)
    assert got["tombstone"].result.error_code == "UNDECODABLE" and got["big"].result.error_code == "OVERSIZE"
    letters = [decode_dead_letter(v) for _, _, _, v in dead]
    assert len(letters) == len(garbage) + len(refused)
    assert all(d["topic"] == cfg.queries_topic and d["offset"] >= 0 and d["reason"] for d in letters)
    assert max(len(v) for _, _, _, v in dead) <= MAX_BYTES + DEAD_LETTER_OVERHEAD  # bounded, whatever came in
    assert handler.totals["undeliverable"] == 0 and handler.totals["ok"] == len(valid) + 1
    assert _topics(kafka_bootstrap) == before  # nothing a sender wrote created a topic


def test_opted_in_reply_topics_must_exist_and_are_never_created(
        spark: object, kafka_bootstrap: str, make_topic: Callable[..., str], index_dir: Path,
        corpus: tuple[list[str], np.ndarray], tmp_path: Path) -> None:
    ids, signals = corpus
    cfg = _config(kafka_bootstrap, make_topic, tmp_path, index=str(index_dir), reply_topic_pattern=r".*")
    own = make_topic("own-replies")
    before = _topics(kafka_bootstrap)
    fresh = [f"fresh-optin-{i}-{os.getpid()}" for i in range(30)]
    with StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as client, \
            StreamClient(cfg.bootstrap, cfg.queries_topic, own) as own_client:
        with running(spark, cfg) as (handler, _):
            for i, topic in enumerate(fresh):
                client.send(signals[i], "cosine", k=3, reply_topic=topic, correlation_id=f"fresh-{i}")
            internal = client.send(signals[0], "cosine", k=3, reply_topic="__consumer_offsets")
            mine = own_client.send(signals[5], "cosine", k=3, mode="exact", reply_topic=own)
            assert own_client.collect([mine], REPLY_TIMEOUT)[mine].result.matches[0][0] == ids[5]
            assert client.collect([internal], REPLY_TIMEOUT)[internal].result.error_code == "BAD_REPLY_TOPIC"
            dead = read_topic(kafka_bootstrap, cfg.dead_letter_topic, n=len(fresh) + 1, timeout=REPLY_TIMEOUT)
            assert wait_for(lambda: handler.totals["undeliverable"] >= len(fresh), REPLY_TIMEOUT)
    letters = [decode_dead_letter(v) for _, _, _, v in dead]
    undeliverable = {d["correlation_id"] for d in letters if d["error_code"] == "UNDELIVERABLE_REPLY"}
    assert undeliverable == {f"fresh-{i}" for i in range(len(fresh))}
    assert all(d["value"] is None and d["topic"] == cfg.queries_topic for d in letters
               if d["error_code"] == "UNDELIVERABLE_REPLY")
    assert _topics(kafka_bootstrap) == before


class PausingHandler(BatchHandler):
    """Freezes the broker (SIGSTOP) as the first batch starts delivering, for ``down_s`` seconds."""

    def __init__(self, cfg: ServeConfig, broker: ControllableBroker, down_s: float) -> None:
        super().__init__(cfg)
        self.broker, self.down_s, self.paused = broker, down_s, threading.Event()
        self.paused_delivery_s: float | None = None  # how long the delivery that met the frozen broker took

    def _deliver(self, out: list[Outgoing], version: str) -> DeliveryReport:
        if self.paused.is_set() or not out:
            return super()._deliver(out, version)
        self.paused.set()
        self.broker.pause()
        threading.Timer(self.down_s, self.broker.resume).start()
        t0 = time.monotonic()
        report = super()._deliver(out, version)
        self.paused_delivery_s = time.monotonic() - t0
        return report


@pytest.fixture
def own_broker() -> Iterator[ControllableBroker]:
    with ControllableBroker() as b:
        yield b


def test_broker_gone_during_delivery_longer_than_the_message_timeout_loses_no_reply(
        spark: object, own_broker: ControllableBroker, index_dir: Path, corpus: tuple[list[str], np.ndarray],
        tmp_path: Path) -> None:
    ids, signals = corpus
    b = own_broker.bootstrap
    create_topics(b, ["q", "r", "dlq"])
    timeout_ms = 1500
    cfg = ServeConfig(bootstrap=b, index=str(index_dir), queries_topic="q", replies_topic="r",
                      dead_letter_topic="dlq", checkpoint=str(tmp_path / "ck"),
                      kafka_options=(("message.timeout.ms", str(timeout_ms)),))
    handler = PausingHandler(cfg, own_broker, down_s=4 * timeout_ms / 1000)
    with StreamClient(b, "q", "r") as client:
        sent = {client.send(signals[i], "manhattan", k=3, mode="exact"): i for i in range(20)}
        client.flush()
        with running(spark, cfg, handler):
            got = client.collect(sent, REPLY_TIMEOUT)
    assert handler.paused_delivery_s is not None and handler.paused_delivery_s >= 0.9 * handler.down_s  # it waited
    assert set(got) == set(sent)
    for cid, row in sent.items():
        assert [m[0] for m in got[cid].result.matches] == brute_force(signals, ids, signals[row], "manhattan", 3)
    # whether librdkafka timed the attempt out (then a fresh producer retried) or held requests already
    # on the wire until the broker answered depends on where each message was when it froze: both
    # deliver, and that is the property


def test_messages_too_large_for_their_topic_are_replaced_by_bounded_stand_ins(
        spark: object, kafka_bootstrap: str, make_topic: Callable[..., str], index_dir: Path,
        corpus: tuple[list[str], np.ndarray], tmp_path: Path) -> None:
    """Tansu ignores topic-level ``max.message.bytes``, so the producer's own limit refuses here."""
    ids, signals = corpus
    cfg = _config(kafka_bootstrap, make_topic, tmp_path, index=str(index_dir), max_k=300,
                  kafka_options=(("message.max.bytes", "4000"),))
    p = _producer(kafka_bootstrap)
    _send(p, cfg.queries_topic, b"\x00" * 20_000, b"garbage")  # its dead letter holds 20 KB of value
    with StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as client:
        client.track("garbage")
        with running(spark, cfg) as (handler, _):
            big = client.send(signals[1], "cosine", k=300, mode="exact")  # ~7 KB of matches
            small = client.send(signals[2], "cosine", k=3, mode="exact")
            got = client.collect([big, small, "garbage"], REPLY_TIMEOUT)
            dead = read_topic(kafka_bootstrap, cfg.dead_letter_topic, n=1, timeout=REPLY_TIMEOUT)
    assert got[big].result.error_code == "REPLY_TOO_LARGE" and "smaller k" in got[big].result.error_message
    assert got[small].result.matches[0][0] == ids[2]
    assert got["garbage"].result.error_code == "UNDECODABLE"
    (letter,) = [decode_dead_letter(v) for _, _, _, v in dead]
    assert letter["value"] is None and "20000 bytes left out" in letter["reason"] and letter["offset"] == 0
    assert handler.totals["replaced"] == 2


def test_offsets_never_read_are_counted_also_after_a_restart(
        spark: object, kafka_bootstrap: str, make_topic: Callable[..., str], index_dir: Path,
        corpus: tuple[list[str], np.ndarray], tmp_path: Path) -> None:
    """A transaction's commit marker takes an offset no consumer sees: the gap a retention cut leaves."""
    _, signals = corpus
    cfg = _config(kafka_bootstrap, make_topic, tmp_path, index=str(index_dir))
    tx = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"gaps-{os.getpid()}-{cfg.queries_topic}"})
    tx.init_transactions(30)

    def transaction(first: int, n: int) -> list[str]:
        tx.begin_transaction()
        cids = [f"tx-{i}" for i in range(first, first + n)]
        for i, cid in enumerate(cids):
            tx.produce(cfg.queries_topic, encode_query(cid, signals[first + i], "cosine", k=2), cid.encode())
        tx.commit_transaction(30)
        return cids

    with StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as client:
        first = transaction(0, 3) + transaction(3, 3)  # offsets 0-2, marker 3, 4-6, marker 7
        for cid in first:
            client.track(cid)
        with running(spark, cfg) as (handler, _):
            assert set(client.collect(first, REPLY_TIMEOUT)) == set(first)
        assert handler.totals["skipped_offsets"] == 1  # the marker between them (7 is behind the last record)
        second = transaction(6, 3)  # offsets 8-10: the marker at 7 now lies between batches
        for cid in second:
            client.track(cid)
        with running(spark, cfg) as (restarted, _):  # a new handler: where batch N-1 ended is in the checkpoint
            assert set(client.collect(second, REPLY_TIMEOUT)) == set(second)
    assert restarted.totals["skipped_offsets"] == 1


class _FailsOnce:
    """A real index whose first ``version`` read raises: a batch-level failure no record caused."""

    def __init__(self, index: Any) -> None:
        self._index, self._failed = index, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._index, name)

    @property
    def version(self) -> str:
        if not self._failed:
            self._failed = True
            raise RuntimeError("injected batch-level failure")
        return self._index.version


class _FlakyHolder:
    def __init__(self, real: Any) -> None:
        self.real, self.calls, self.reloads, self.refused = real, 0, 0, 0

    def current(self) -> Any:
        self.calls += 1
        return self.real.current() if self.calls == 1 else _FailsOnce(self.real.current())  # 1st: start-up


def test_a_batch_that_fails_as_a_whole_is_answered_record_by_record(
        spark: object, kafka_bootstrap: str, make_topic: Callable[..., str], index_dir: Path,
        corpus: tuple[list[str], np.ndarray], tmp_path: Path) -> None:
    from streaming.index_cache import IndexHolder

    ids, signals = corpus
    cfg = _config(kafka_bootstrap, make_topic, tmp_path, index=str(index_dir))
    handler = BatchHandler(cfg, _FlakyHolder(IndexHolder(index_dir)))  # type: ignore[arg-type]
    p = _producer(kafka_bootstrap)
    _send(p, cfg.queries_topic, b"garbage", b"g-1")
    with StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as client:
        client.track("g-1")
        with running(spark, cfg, handler):
            sent = {client.send(signals[i], "dot", k=3, mode="exact"): i for i in range(8)}
            got = client.collect([*sent, "g-1"], REPLY_TIMEOUT)
            dead = read_topic(kafka_bootstrap, cfg.dead_letter_topic, n=1, timeout=REPLY_TIMEOUT)
    for cid, row in sent.items():
        assert [m[0] for m in got[cid].result.matches] == brute_force(signals, ids, signals[row], "dot", 3)
    assert got["g-1"].result.error_code == "UNDECODABLE" and len(dead) == 1
    assert handler.totals["isolated_batches"] == handler.totals["batches"] >= 1
