"""The confluent-kafka source, driven directly (no Spark) against the real broker."""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from streaming.kafka_source import KafkaStreamReader, SourceOptions, _positions


def _produce(bootstrap: str, topic: str, n: int, partitions: int, start: int = 0) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(start, start + n):
        p.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=i % partitions)
    assert p.flush(10) == 0


def _reader(bootstrap: str, topic: str, **opts: object) -> KafkaStreamReader:
    options = {"kafka.bootstrap.servers": bootstrap, "subscribe": topic, "idleWaitMs": "50",
               **{k: str(v) for k, v in opts.items()}}
    return KafkaStreamReader(SourceOptions.from_options(options))


def test_reads_every_record_to_end_of_partition(kafka_bootstrap: str, make_topic: Callable[..., str]) -> None:
    topic = make_topic("src", partitions=2)
    _produce(kafka_bootstrap, topic, 30, 2)
    r = _reader(kafka_bootstrap, topic)
    start = r.initialOffset()
    rows, end = r.read(start)
    rows = list(rows)
    assert sorted(v for _, v, *_ in rows) == sorted(f"v{i}".encode() for i in range(30))
    assert _positions(end) == {(topic, 0): 15, (topic, 1): 15}  # from records read, not Tansu's watermark
    key, value, t, _, _, ts, ts_type = rows[0]
    assert t == topic and key == b"k" + value[1:] and ts is not None and ts_type in (0, 1, 2)

    t0 = time.monotonic()
    more, end2 = r.read(end)
    assert list(more) == [] and end2 == end and time.monotonic() - t0 >= 0.05  # idle: long-polled

    _produce(kafka_bootstrap, topic, 3, 2, start=30)
    more, end3 = r.read(end)
    assert sorted(v for _, v, *_ in more) == [b"v30", b"v31", b"v32"]
    assert _positions(end3) == {(topic, 0): 17, (topic, 1): 16}
    replay = list(r.readBetweenOffsets(start, end))
    assert sorted(row[1] for row in replay) == sorted(row[1] for row in rows)
    r.stop()


def test_rate_limit_and_latest(kafka_bootstrap: str, make_topic: Callable[..., str]) -> None:
    topic = make_topic("src")
    _produce(kafka_bootstrap, topic, 25, 1)
    r = _reader(kafka_bootstrap, topic, maxOffsetsPerTrigger=10)
    offsets = r.initialOffset()
    sizes = []
    for _ in range(3):
        rows, offsets = r.read(offsets)
        sizes.append(len(list(rows)))
    assert sizes == [10, 10, 5] and _positions(offsets) == {(topic, 0): 25}

    latest = _reader(kafka_bootstrap, topic, startingOffsets="latest")
    assert _positions(latest.initialOffset()) == {(topic, 0): 25}

    by_bytes = _reader(kafka_bootstrap, topic, maxBytesPerTrigger=20)  # each record: 2-3 key + 2-3 value bytes
    rows, offsets = by_bytes.read(by_bytes.initialOffset())
    assert len(list(rows)) == 5 and _positions(offsets) == {(topic, 0): 5}


def test_a_read_under_a_steady_stream_ends_after_max_read_ms(kafka_bootstrap: str,
                                                            make_topic: Callable[..., str]) -> None:
    """Queries arriving without pause must not hold a micro-batch open until the read timeout."""
    topic = make_topic("src")
    r = _reader(kafka_bootstrap, topic, maxReadMs=200, readTimeoutMs=20_000)
    offsets = r.initialOffset()
    stop = threading.Event()

    def steady() -> None:  # ~200 records/s until stopped
        p = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
        i = 0
        while not stop.is_set():
            p.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
            p.poll(0)
            i += 1
            time.sleep(0.005)
        p.flush(10)

    producer = threading.Thread(target=steady, daemon=True)
    producer.start()
    try:
        seen, took = [], []
        while len(seen) < 3:
            t0 = time.monotonic()
            rows, offsets = r.read(offsets)
            rows = list(rows)
            if rows:
                took.append(time.monotonic() - t0)
                seen.append(len(rows))
    finally:
        stop.set()
        producer.join(15)
        r.stop()
    assert all(t < 5.0 for t in took), took  # bounded by maxReadMs (plus a fetch), not by readTimeoutMs
    assert all(n >= 1 for n in seen)


@pytest.mark.parametrize("quiet_ms", [600, 30])
def test_a_read_ends_when_the_senders_pause(kafka_bootstrap: str, make_topic: Callable[..., str],
                                            quiet_ms: int) -> None:
    """Records trickling in 100 ms apart (each flushed alone; the reader catches up between them) are one
    read when quietMs is longer than the gaps, and end the read at the first gap when it is shorter."""
    topic = make_topic("src")
    r = _reader(kafka_bootstrap, topic, maxReadMs=10_000, quietMs=quiet_ms, readTimeoutMs=20_000)
    offsets = r.initialOffset()
    first = threading.Event()

    def trickle() -> None:
        p = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
        for i in range(12):
            p.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
            p.flush(10)
            first.set()
            time.sleep(0.1)

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        assert first.wait(15)
        t0 = time.monotonic()
        rows, offsets = r.read(offsets)
        took = time.monotonic() - t0
        got = [v for _, v, *_ in rows]
    finally:
        sender.join(30)
        r.stop()
    if quiet_ms > 100:
        assert got == [f"v{i}".encode() for i in range(12)]
        assert _positions(offsets) == {(topic, 0): 12}
    else:
        assert 1 <= len(got) < 12 and got == [f"v{i}".encode() for i in range(len(got))]
        assert took < 1.0, took  # not held open until maxReadMs


def test_reader_pickles_without_its_consumer(kafka_bootstrap: str, make_topic: Callable[..., str]) -> None:
    topic = make_topic("src")
    _produce(kafka_bootstrap, topic, 2, 1)
    r = _reader(kafka_bootstrap, topic)
    list(r.read(r.initialOffset())[0])  # creates the consumer
    clone = pickle.loads(pickle.dumps(r))
    assert len(list(clone.read({topic: {}})[0])) == 2
    r.stop()
    clone.stop()


def test_rows_are_bounded_and_carry_any_timestamp(kafka_bootstrap: str, make_topic: Callable[..., str]) -> None:
    """A 120 MB record (over librdkafka's default receive limit) and CreateTimes no datetime holds."""
    from streaming.kafka_source import MAX_KEY_BYTES

    topic = make_topic("src")
    p = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 200 << 20, "compression.type": "zstd"})
    p.produce(topic, value=bytes(120 << 20), key=b"k" * (MAX_KEY_BYTES + 10))
    for ts in (253402300800001, -62135596800001, 253402300799999, 1_700_000_000_000):
        p.produce(topic, value=b"v", key=b"t", timestamp=ts)
    assert p.flush(60) == 0
    r = _reader(kafka_bootstrap, topic, maxRecordBytes=1000)
    rows, end = r.read({topic: {}})
    (big,) = list(rows)  # alone: its full size counts against the batch's byte bound
    rows, _ = r.read(end)
    stamped = list(rows)
    assert len(big[1]) == 1001 and len(big[0]) == MAX_KEY_BYTES  # enough to refuse it, no more
    assert [r[5] is None for r in stamped] == [True, True, True, False]  # the last day of 9999 is outside too
    assert all(r[6] == 1 for r in stamped)  # the timestamp type is kept
