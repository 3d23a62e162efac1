"""The reply sink under failure (promise 2), with a scripted producer: no broker needed.

Replies to the service's own topics are retried whatever the error, each retry with a fresh producer
(a producer wedged by a broker that lost its state must not stall the job); a reply to a sender's own
topic that does not exist is dropped and counted, quickly; a shutdown can abandon a delivery that
waits for an unreachable broker (the batch stays uncommitted and is replayed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError, Producer

from streaming.errors import DeliveryAborted
from streaming.scoring import Outgoing
from streaming.sink import FORCED, PRODUCER_DEFAULTS, Publisher, deliver, forced_conflicts


class ScriptedProducer:
    """Fails the first ``fail`` deliveries to each topic with ``errors[topic]``; ``hang`` never acks."""

    def __init__(self, errors: dict[str, int], fail: int = 1, hang: bool = False) -> None:
        self.errors, self.fail, self.hang = errors, fail, hang
        self.calls: dict[str, int] = {}
        self.queued: list[Callable[[], None]] = []
        self.purged = False

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Callable[..., None]) -> None:
        n = self.calls[topic] = self.calls.get(topic, 0) + 1
        err = KafkaError(self.errors[topic]) if topic in self.errors and n <= self.fail else None
        self.queued.append(lambda: on_delivery(err, None))

    def flush(self, timeout: float) -> int:
        if self.hang:
            return len(self.queued)
        for cb in self.queued:
            cb()
        self.queued = []
        return 0

    def purge(self) -> None:
        self.purged = True

    def poll(self, timeout: float) -> int:
        return 0


class ScriptedPublisher(Publisher):
    def __init__(self, make: Callable[[], ScriptedProducer]) -> None:
        super().__init__("unused:1")
        self.made: list[ScriptedProducer] = []
        self._make = make

    @property
    def producer(self) -> ScriptedProducer:  # type: ignore[override]
        if self._producer is None:
            self._producer = self._make()  # type: ignore[assignment]
            self.made.append(self._producer)  # type: ignore[arg-type]
        return self._producer  # type: ignore[return-value]


def _msgs(*topics: str) -> list[Outgoing]:
    return [Outgoing(t, b"k", b"v", "reply") for t in topics]


def test_service_topics_are_retried_with_a_fresh_producer_and_sender_topics_dropped() -> None:
    made: list[ScriptedProducer] = []

    def make() -> ScriptedProducer:
        made.append(ScriptedProducer({"replies": KafkaError._MSG_TIMED_OUT, "someone-elses": KafkaError._UNKNOWN_TOPIC,
                                      "dlq": KafkaError.UNKNOWN_TOPIC_OR_PART}, fail=1 if not made else 0))
        return made[-1]

    pub = ScriptedPublisher(make)
    report = deliver(pub, _msgs("replies", "someone-elses", "dlq"), service_topics=("replies", "dlq"),
                     retry_backoff_s=0.01)
    assert report.delivered == 2 and report.undeliverable == 1 and report.attempts == 2
    assert len(made) == 2 and made[0].purged and pub.renewed == 1  # the retry used a new producer
    assert made[1].calls == {"replies": 1, "dlq": 1}  # the sender's missing topic was not retried


def test_a_waiting_delivery_can_be_abandoned_on_shutdown() -> None:
    abort = threading.Event()
    threading.Timer(0.5, abort.set).start()
    with pytest.raises(DeliveryAborted):
        deliver(ScriptedPublisher(lambda: ScriptedProducer({}, hang=True)), _msgs("replies"), abort=abort)


def test_producer_settings_bound_the_wait_for_a_missing_reply_topic() -> None:
    assert PRODUCER_DEFAULTS["topic.metadata.propagation.max.ms"] <= 5_000  # not librdkafka's 30 s
    assert FORCED == {"acks": "all", "enable.idempotence": True, "allow.auto.create.topics": False}
    Producer({**PRODUCER_DEFAULTS, **FORCED, "bootstrap.servers": "127.0.0.1:1"})  # librdkafka accepts them all
    # what a user passes cannot weaken them (ServeConfig refuses these; the publisher applies FORCED last)
    assert forced_conflicts({"acks": "1", "enable.idempotence": "false", "allow.auto.create.topics": "true",
                             "ACKS": "-1", "linger.ms": "5"}) == ["acks=1", "enable.idempotence=false",
                                                                 "allow.auto.create.topics=true"]
