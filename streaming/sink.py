"""Publishing replies and dead letters: one idempotent Producer per process, at-least-once.

:func:`deliver` returns only when the broker has acknowledged every message (``acks=all``), so a
micro-batch is committed only after its replies are durable. Transient failures (broker away) are
retried without end, each attempt bounded by ``message.timeout.ms``, logging as it goes: the job waits
for the broker rather than crash-looping or dropping replies. Permanent failures (a reply topic that
cannot exist, a message too large) are logged and counted, so one bad reply topic cannot stall
everyone else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streaming.scoring import Outgoing

logger = logging.getLogger(__name__)

PRODUCER_DEFAULTS: Final[dict[str, object]] = {
    "enable.idempotence": True, "acks": "all", "linger.ms": 2, "compression.type": "none",
    "message.timeout.ms": 30_000, "message.max.bytes": 8 << 20,
}
_PRODUCERS: dict[tuple[str, tuple[tuple[str, str], ...]], Producer] = {}
_LOCK = threading.Lock()


@dataclass
class DeliveryReport:
    delivered: int = 0
    undeliverable: int = 0
    attempts: int = 0


def producer_for(bootstrap: str, client_config: Mapping[str, str] | None = None) -> Producer:
    """The process's Producer for ``bootstrap`` + ``client_config`` (made on first use, then reused)."""
    key = (bootstrap, tuple(sorted((client_config or {}).items())))
    with _LOCK:
        if key not in _PRODUCERS:
            _PRODUCERS[key] = Producer({**PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap,
                                        "logger": logging.getLogger("streaming.sink.librdkafka"),
                                        **(client_config or {})})
        return _PRODUCERS[key]


def deliver(producer: Producer, messages: Sequence[Outgoing], *, retry_backoff_s: float = 1.0) -> DeliveryReport:
    """Produce ``messages`` and wait until each is acknowledged or known undeliverable."""
    report = DeliveryReport()
    pending = list(messages)
    while pending:
        report.attempts += 1
        failed: list[tuple[Outgoing, KafkaError]] = []
        for m in pending:
            _produce(producer, m, failed, report)
        while producer.flush(1.0) > 0:  # wait for every ack (or per-message timeout) of this attempt
            pass
        retry = [m for m, err in failed if _retriable(err)]
        for m, err in failed:
            if not _retriable(err):
                report.undeliverable += 1
                logger.error("dropping undeliverable %s to %s (key %r): %s", m.kind, m.topic, m.key, err)
        if retry:
            logger.warning("%d of %d messages not acknowledged (%s); retrying (attempt %d)", len(retry),
                           len(pending), failed[0][1], report.attempts + 1)
            time.sleep(retry_backoff_s)
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


_PERMANENT: Final[frozenset[int]] = frozenset(
    getattr(KafkaError, name) for name in (
        "MSG_SIZE_TOO_LARGE", "INVALID_MSG_SIZE", "RECORD_LIST_TOO_LARGE", "TOPIC_AUTHORIZATION_FAILED",
        "TOPIC_EXCEPTION", "_INVALID_ARG", "_UNKNOWN_TOPIC", "UNKNOWN_TOPIC_OR_PART")
    if hasattr(KafkaError, name))


def _retriable(err: KafkaError) -> bool:
    return err.code() not in _PERMANENT and not err.fatal()
