"""Publishing replies and dead letters: one Producer per process, at-least-once.

:func:`deliver` returns only when the broker has acknowledged every message (``acks=all``), so a
micro-batch is committed only after its replies are durable. Transient failures (broker away) are
retried without end, each attempt bounded by ``message.timeout.ms``, logging as it goes: the job waits
for the broker rather than crash-looping or dropping replies. After a failed attempt the producer is
replaced by a fresh one, so a client wedged by a broker that lost its state cannot stall the job.

What is never retried: a message too large for the broker, an illegal topic name, and a *per-query*
reply topic that does not exist or may not be written (the sender named it; one bad reply topic must
not stall everyone else). Those are logged and counted. The service's own topics (the replies and
dead-letter topics) are retried whatever the error, since dropping there would lose answers.

The producer is not idempotent by default: replies are keyed by correlation id and duplicates are
part of the at-least-once contract anyway, while an idempotent producer's state does not survive a
restart of a broker that keeps it in memory (Tansu answers "unknown producer id" forever after).
Pass ``enable.idempotence=true`` as a Kafka option to have it on a real cluster.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from batch_index.errors import EcgSearchError
from streaming.broker import BrokerError, redact
from streaming.scoring import Outgoing

logger = logging.getLogger(__name__)

PRODUCER_DEFAULTS: Final[dict[str, object]] = {
    "enable.idempotence": False, "acks": "all", "linger.ms": 2, "compression.type": "none",
    "message.timeout.ms": 30_000, "message.max.bytes": 8 << 20,
    # a reply topic that does not exist (broker with auto-create off) fails in ~2 s instead of holding
    # its micro-batch for librdkafka's default 30 s propagation wait
    "topic.metadata.propagation.max.ms": 2_000,
}
MAX_BACKOFF_S: Final[float] = 10.0


class Publisher:
    """The process's producer for one broker and client config; :meth:`renew` swaps in a fresh one."""

    def __init__(self, bootstrap: str, client_config: Mapping[str, str] | None = None) -> None:
        self.bootstrap = bootstrap
        self.client_config = dict(client_config or {})
        self.renewed = 0
        self._producer: Producer | None = None

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            try:
                self._producer = Producer({**PRODUCER_DEFAULTS, "bootstrap.servers": self.bootstrap,
                                           "logger": logging.getLogger("streaming.sink.librdkafka"),
                                           **self.client_config})
            except KafkaException as e:  # a rejected setting; its value may be a secret: no chaining
                raise BrokerError("invalid Kafka client settings for the reply producer: "
                                  f"{redact(str(e.args[0]), self.client_config)}") from None
        return self._producer

    def renew(self, why: str) -> None:
        """Drop the current producer (its unsent messages are purged) and make a new one on next use."""
        old, self._producer = self._producer, None
        if old is not None:
            old.purge()
            old.flush(0)
            self.renewed += 1
            logger.warning("replacing the reply producer (%s)", why)


_PUBLISHERS: dict[tuple[str, tuple[tuple[str, str], ...]], Publisher] = {}
_LOCK = threading.Lock()


def publisher_for(bootstrap: str, client_config: Mapping[str, str] | None = None) -> Publisher:
    """The process's :class:`Publisher` for ``bootstrap`` + ``client_config`` (made once, then reused)."""
    key = (bootstrap, tuple(sorted((client_config or {}).items())))
    with _LOCK:
        if key not in _PUBLISHERS:
            _PUBLISHERS[key] = Publisher(bootstrap, client_config)
        return _PUBLISHERS[key]


def producer_for(bootstrap: str, client_config: Mapping[str, str] | None = None) -> Producer:
    """The process's current Producer for ``bootstrap`` + ``client_config``."""
    return publisher_for(bootstrap, client_config).producer


@dataclass
class DeliveryReport:
    delivered: int = 0
    undeliverable: int = 0
    attempts: int = 0


class DeliveryAborted(EcgSearchError):
    """Delivery was abandoned on request (shutdown while the broker is away); the batch is replayed."""


def deliver(publisher: Publisher | Producer, messages: Sequence[Outgoing], *, service_topics: Collection[str] = (),
            retry_backoff_s: float = 1.0, abort: threading.Event | None = None) -> DeliveryReport:
    """Produce ``messages`` and wait until each is acknowledged or known undeliverable.

    ``service_topics`` are retried whatever the error (see the module docstring); a bare
    ``Producer`` (tests) is used as is, never renewed. Setting ``abort`` makes a waiting delivery
    raise :class:`DeliveryAborted` (its micro-batch is then not committed, so nothing is lost).
    """
    abort = abort or threading.Event()
    report = DeliveryReport()
    pending = list(messages)
    backoff = retry_backoff_s
    while pending:
        report.attempts += 1
        producer = publisher.producer if isinstance(publisher, Publisher) else publisher
        failed: list[tuple[Outgoing, KafkaError]] = []
        for m in pending:
            _produce(producer, m, failed, report)
        while producer.flush(1.0) > 0:  # wait for every ack (or per-message timeout) of this attempt
            if abort.is_set():
                raise DeliveryAborted(f"delivery of {len(pending)} messages abandoned: stopping")
        retry = []
        for m, err in failed:
            if _retriable(err, m.topic in service_topics):
                retry.append(m)
            else:
                report.undeliverable += 1
                logger.error("dropping undeliverable %s to %s (key %r): %s", m.kind, m.topic, m.key, err)
        if retry:
            first = next(err for m, err in failed if m is retry[0])
            logger.warning("%d of %d messages not acknowledged (%s); retrying in %.0f s (attempt %d)", len(retry),
                           len(pending), first, backoff, report.attempts + 1)
            if isinstance(publisher, Publisher):
                publisher.renew(f"{len(retry)} messages not acknowledged: {first.str()}")
            if abort.wait(backoff):
                raise DeliveryAborted(f"delivery of {len(retry)} messages abandoned: stopping")
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        pending = retry
    return report


def _produce(producer: Producer, m: Outgoing, failed: list[tuple[Outgoing, KafkaError]],
             report: DeliveryReport) -> None:
    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            report.delivered += 1
        else:
            failed.append((m, err))

    while True:
        try:
            producer.produce(m.topic, m.value, m.key, on_delivery=on_delivery)
            return
        except BufferError:  # local queue full: let deliveries drain
            producer.poll(0.1)
        except (KafkaException, ValueError, TypeError) as e:  # e.g. an invalid topic name: permanent
            err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else KafkaError(
                KafkaError._INVALID_ARG, str(e))
            failed.append((m, err))
            return


def _codes(*names: str) -> frozenset[int]:
    return frozenset(getattr(KafkaError, n) for n in names if hasattr(KafkaError, n))


_TOO_LARGE: Final[frozenset[int]] = _codes("MSG_SIZE_TOO_LARGE", "INVALID_MSG_SIZE", "RECORD_LIST_TOO_LARGE")
_BAD_TOPIC: Final[frozenset[int]] = _codes("_INVALID_ARG", "TOPIC_EXCEPTION", "INVALID_TOPIC_EXCEPTION")
_NOT_WRITABLE: Final[frozenset[int]] = _codes("_UNKNOWN_TOPIC", "UNKNOWN_TOPIC_OR_PART", "TOPIC_AUTHORIZATION_FAILED")


def _retriable(err: KafkaError, service_topic: bool) -> bool:
    """Whether to try ``err``'s message again (with a fresh producer)."""
    code = err.code()
    if code in _TOO_LARGE or code in _BAD_TOPIC:
        return False
    if code in _NOT_WRITABLE:
        return service_topic
    return True
