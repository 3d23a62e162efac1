"""Publishing replies and dead letters: one Producer per process, at-least-once.

:func:`deliver` returns only when the broker has acknowledged every message, so a micro-batch is
committed only after its replies are durable. The producer always runs with ``acks=all``, idempotence
on and topic auto-creation off (:data:`FORCED`): user Kafka options may tune it but cannot weaken
that (:func:`forced_conflicts` names the settings that try). Transient failures (broker away) are
retried without end, each attempt bounded by ``message.timeout.ms``, logging as it goes: the job waits
for the broker rather than crash-looping or dropping replies. After a failed attempt the producer is
replaced by a fresh one (a new producer id), so a client wedged by a broker that lost its state (a
memory-only broker restarted: "unknown producer id") cannot stall the job.

A message refused for good is never dropped silently:

- to a service topic (the replies or dead-letter topic), too large: replaced by its bounded stand-in
  (:func:`streaming.scoring.substitute`: a ``REPLY_TOO_LARGE`` error reply, a dead letter without the
  raw value) and counted as ``replaced``; if even the stand-in is refused the batch fails (uncommitted,
  so it is replayed once the topic is fixed);
- to a service topic, any other error (unknown topic, not authorised, broker away): retried;
- to a sender's own reply topic (opt-in, ``--reply-topic-pattern``) that does not exist or may not be
  written: an ``UNDELIVERABLE_REPLY`` dead letter takes its place, counted as ``undeliverable``
  (one bad reply topic must not stall everyone else, and the producer never creates topics).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streaming.errors import BrokerError, DeliveryAborted, DeliveryFailed
from streaming.redaction import redact
from streaming.scoring import Outgoing

logger = logging.getLogger(__name__)

PRODUCER_DEFAULTS: Final[dict[str, object]] = {
    # an attempt gives up after 10 s and the next one runs on a fresh producer: after a memory-only
    # broker restarted, the old producer's id is unknown there and its messages only time out (at
    # librdkafka's 30 s default, replies came 30 s late); a real outage is retried without end anyway
    "linger.ms": 2, "compression.type": "none", "message.timeout.ms": 10_000, "message.max.bytes": 8 << 20,
    # a reply topic that does not exist fails in ~2 s instead of holding its micro-batch for
    # librdkafka's default 30 s propagation wait
    "topic.metadata.propagation.max.ms": 2_000,
}
#: What the delivery guarantee rests on; applied after the user's Kafka options.
FORCED: Final[dict[str, object]] = {"acks": "all", "enable.idempotence": True, "allow.auto.create.topics": False}
_EQUIVALENT: Final[dict[str, frozenset[str]]] = {
    "acks": frozenset({"all", "-1"}), "enable.idempotence": frozenset({"true"}),
    "allow.auto.create.topics": frozenset({"false"})}
MAX_BACKOFF_S: Final[float] = 10.0


def forced_conflicts(options: Mapping[str, str]) -> list[str]:
    """The user's Kafka options that would weaken :data:`FORCED` (``acks=1``, ...), as ``key=value``."""
    return [f"{k}={v}" for k, v in options.items()
            if k.strip().lower() in _EQUIVALENT and str(v).strip().lower() not in _EQUIVALENT[k.strip().lower()]]


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
                                           **self.client_config, **FORCED})
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


@dataclass
class DeliveryReport:
    delivered: int = 0
    undeliverable: int = 0  # replies a sender's own topic refused (each replaced by a dead letter)
    replaced: int = 0       # messages a topic refused for good, delivered as their bounded stand-in
    attempts: int = 0




#: ``substitute(message, why, sender_topic)``: the bounded stand-in of a refused message
Substitute = Callable[[Outgoing, str, bool], Outgoing]


def deliver(publisher: Publisher | Producer, messages: Sequence[Outgoing], *, service_topics: Collection[str] = (),
            substitute: Substitute | None = None, retry_backoff_s: float = 1.0,
            abort: threading.Event | None = None) -> DeliveryReport:
    """Produce ``messages`` and wait until each (or its stand-in) is acknowledged.

    What happens to a refused message is in the module docstring; without ``substitute`` a message
    refused for good is dropped and counted (tests of the retry logic). A bare ``Producer`` is used as
    is, never renewed. Setting ``abort`` makes a waiting delivery raise :class:`DeliveryAborted` (its
    micro-batch is then not committed, so nothing is lost).
    """
    abort = abort or threading.Event()
    report = DeliveryReport()
    pending = list(messages)
    stand_ins: set[int] = set()  # id() of the stand-ins made so far: never replaced again
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
        retry: list[Outgoing] = []
        transient: list[KafkaError] = []  # errors worth another attempt with a fresh producer
        for m, err in failed:
            service = m.topic in service_topics
            if _fate(err, service) == "retry":
                retry.append(m)
                transient.append(err)
                continue
            if substitute is None or id(m) in stand_ins:
                if service:
                    raise DeliveryFailed(f"{m.topic!r} refused a {m.kind} and its bounded stand-in ({err.str()}); "
                                         "the batch stays uncommitted and is replayed: check the topic's "
                                         "max.message.bytes and ACLs")
                report.undeliverable += 1
                logger.error("dropping undeliverable %s to %s (key %r): %s", m.kind, m.topic, m.key, err)
                continue
            stand_in = substitute(m, f"{err.str()} ({err.name()})", not service)
            stand_ins.add(id(stand_in))
            retry.append(stand_in)
            if service:
                report.replaced += 1
                logger.warning("%s refused a %s of %d bytes (%s); sending its bounded stand-in", m.topic, m.kind,
                               len(m.value), err)
            else:
                report.undeliverable += 1
                logger.error("reply to %r could not be written to the sender's topic %s (%s); recorded in a "
                             "dead letter", m.key, m.topic, err)
        if transient:
            logger.warning("%d of %d messages not acknowledged (%s); retrying in %.0f s (attempt %d)",
                           len(transient), len(pending), transient[0], backoff, report.attempts + 1)
            if isinstance(publisher, Publisher):
                publisher.renew(f"{len(transient)} messages not acknowledged: {transient[0].str()}")
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


def _fate(err: KafkaError, service_topic: bool) -> str:
    """``retry`` (with a fresh producer) or ``refused`` (for good: its stand-in goes instead)."""
    code = err.code()
    if code in _TOO_LARGE or code in _BAD_TOPIC:
        return "refused"
    if code in _NOT_WRITABLE:
        return "retry" if service_topic else "refused"
    return "retry"
