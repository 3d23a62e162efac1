"""Promise 2, broker outages are survived.

The embedded broker (Tansu) keeps topics in memory, so a restart on the same port brings every topic
back empty, under a new topic id. The job must notice (a clear log line, ``@epoch`` in its offsets),
read the new logs from their beginning, re-create its topics, and serve new queries; while the broker
is away it idles instead of failing. A replay of a logged batch waits for the broker rather than
failing after a timeout. Each test runs its own broker: restarting the session's would disturb others.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from devtools.broker import ControllableBroker
from streaming.admin import create_topics
from streaming.cli import main
from streaming.client import StreamClient
from streaming.config import ServeConfig
from streaming.kafka_source import EPOCH_KEY, ID_KEY, KafkaStreamReader, SourceOptions, _positions

from .reliability import REPLY_TIMEOUT, running, wait_for


@pytest.fixture
def broker() -> Iterator[ControllableBroker]:
    with ControllableBroker() as b:
        yield b


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2})
    for v in values:
        p.produce(topic, v)
    assert p.flush(10) == 0


def _reader(bootstrap: str, topic: str) -> KafkaStreamReader:
    return KafkaStreamReader(SourceOptions.from_options({
        "kafka.bootstrap.servers": bootstrap, "subscribe": topic, "idleWaitMs": "20", "readTimeoutMs": "1000"}))


def test_reader_takes_a_recreated_topic_from_its_beginning_even_at_the_old_offset(
        broker: ControllableBroker, caplog: pytest.LogCaptureFixture) -> None:
    create_topics(broker.bootstrap, ["q"])
    _produce(broker.bootstrap, "q", [b"old-%d" % i for i in range(5)])
    r = _reader(broker.bootstrap, "q")
    rows, before = r.read(r.initialOffset())
    assert len(list(rows)) == 5 and _positions(before) == {("q", 0): 5}

    broker.restart()
    rows, same = r.read(before)  # the topic is gone: nothing to read, no failure, offsets kept
    assert list(rows) == [] and same == before
    create_topics(broker.bootstrap, ["q"])
    _produce(broker.bootstrap, "q", [b"new-%d" % i for i in range(5)])  # the new log ends where the old one did
    with caplog.at_level(logging.WARNING, logger="streaming.kafka_source"):
        rows, after = r.read(before)
    assert [row[1] for row in rows] == [b"new-%d" % i for i in range(5)]
    assert _positions(after) == _positions(before)  # same numbers, yet a different offset: Spark sees progress
    assert json.dumps(after) != json.dumps(before)
    assert after["q"][EPOCH_KEY] == 1 and after["q"][ID_KEY] != before["q"][ID_KEY]
    assert "topic q was recreated" in caplog.text and "reading the new log from its beginning" in caplog.text

    broker.restart()
    create_topics(broker.bootstrap, ["q"])
    _produce(broker.bootstrap, "q", [b"newer-%d" % i for i in range(8)])  # grew past the old position
    rows, last = r.read(after)
    assert [row[1] for row in rows] == [b"newer-%d" % i for i in range(8)]  # none of its first 5 skipped
    assert last["q"][EPOCH_KEY] == 2
    r.stop()


def test_replay_waits_for_an_unreachable_broker_then_reports_what_the_broker_lost(
        broker: ControllableBroker, caplog: pytest.LogCaptureFixture) -> None:
    create_topics(broker.bootstrap, ["q"])
    _produce(broker.bootstrap, "q", [b"m%d" % i for i in range(6)])
    r = _reader(broker.bootstrap, "q")
    start = r.initialOffset()
    rows, end = r.read(start)
    assert len(list(rows)) == 6

    broker.pause()  # unreachable, but keeps its log (a network partition)
    t0 = time.monotonic()
    rows, same = r.read(end)  # a normal trigger during the outage: nothing, no failure
    assert list(rows) == [] and same == end
    threading.Timer(3.0, broker.resume).start()
    replayed = list(r.readBetweenOffsets(start, end))  # readTimeoutMs is 1 s: it must wait, not fail
    assert time.monotonic() - t0 >= 3.0
    assert [row[1] for row in replayed] == [b"m%d" % i for i in range(6)]

    broker.restart()  # now the log is really gone
    create_topics(broker.bootstrap, ["q"])
    with caplog.at_level(logging.ERROR, logger="streaming.kafka_source"):
        assert list(r.readBetweenOffsets(start, end)) == []
    assert "cannot re-read topic q" in caplog.text and "was recreated" in caplog.text
    r.stop()


def test_job_survives_a_broker_restart_and_serves_new_queries(
        spark: object, broker: ControllableBroker, index_dir: Path, corpus: tuple[list[str], np.ndarray],
        tmp_path: Path) -> None:
    ids, signals = corpus
    cfg = ServeConfig(bootstrap=broker.bootstrap, index=str(index_dir), queries_topic="q", replies_topic="r",
                      dead_letter_topic="dlq", checkpoint=str(tmp_path / "ck"))
    create_topics(cfg.bootstrap, cfg.service_topics)
    with running(spark, cfg, keeper_interval_s=0.5) as (handler, query), \
            StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as client:
        first = [client.send(signals[i], "cosine", k=1, mode="exact") for i in range(6)]
        assert len(client.collect(first, REPLY_TIMEOUT)) == 6
        assert wait_for(lambda: handler.totals["records"] == 6, 30)  # counted after the replies went out
        batches = handler.totals["batches"]

        broker.stop()
        during = client.send(signals[40], "cosine", k=1, mode="exact")  # waits in the client's producer
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4.0:  # the outage: the job neither fails nor runs empty batches
            assert query.isActive and query.exception() is None
            time.sleep(0.2)
        assert handler.totals["batches"] == batches
        broker.start()  # same port, empty memory: every topic is gone

        assert wait_for(lambda: set(cfg.service_topics) <= _topics(cfg.bootstrap), 30), "topics not re-created"
        second = [client.send(signals[i], "euclidean", k=1, mode="exact") for i in range(100, 105)]
        replies = client.collect([during, *second], REPLY_TIMEOUT)
        assert query.isActive and query.exception() is None

    assert replies.keys() == {during, *second}, "queries after the outage went unanswered"
    assert replies[during].result.matches[0][0] == ids[40]  # the client's retry delivered it
    for i, cid in zip(range(100, 105), second):
        assert replies[cid].result.ok and replies[cid].result.matches[0][0] == ids[i]
    logged = sorted((Path(cfg.checkpoint_dir) / "offsets").glob("[0-9]*"), key=lambda p: int(p.name))
    last = json.loads(logged[-1].read_text().splitlines()[-1])
    assert last["q"][EPOCH_KEY] >= 1  # the source noticed the recreated topic


def _topics(bootstrap: str) -> set[str]:
    from confluent_kafka.admin import AdminClient

    try:
        return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=2).topics)
    except Exception:
        return set()


def test_client_reports_an_unreachable_broker_clearly(tmp_path: Path, corpus: tuple[list[str], np.ndarray],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from batch_index.corpus.files import write_corpus
    from streaming.broker import free_port

    qfile = write_corpus(tmp_path / "q.parquet", ["a"], corpus[1][:1])
    t0 = time.monotonic()
    rc = main(["send", "--bootstrap", f"127.0.0.1:{free_port()}", "--queries", str(qfile), "--metric", "cosine",
               "--output", str(tmp_path / "o.parquet"), "--timeout", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and time.monotonic() - t0 < 15
    assert err.startswith("error: cannot reach the broker at 127.0.0.1:") and "Traceback" not in err
