"""Topics through Kafka's admin API: create (existing ones kept), list what is missing; one error type."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Iterable, Mapping

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streaming.errors import BrokerError
from streaming.redaction import redact

logger = logging.getLogger(__name__)



def create_topics(bootstrap: str, topics: Iterable[str], *, partitions: int = 1, replication: int = 1,
                  config: Mapping[str, str] | None = None, timeout: float = 15.0,
                  client_config: Mapping[str, str] | None = None) -> None:
    """Create ``topics`` (existing ones are left as they are); raises :class:`BrokerError` otherwise."""
    admin = admin_client(bootstrap, client_config)
    futures = admin.create_topics([NewTopic(t, partitions, replication, config=dict(config or {}))
                                   for t in topics], operation_timeout=timeout, request_timeout=timeout)
    for topic, fut in futures.items():
        try:
            fut.result(timeout)
            logger.info("created topic %s (%d partitions)", topic, partitions)
        except concurrent.futures.TimeoutError as e:
            raise BrokerError(f"creating topic {topic!r} on {bootstrap} timed out after {timeout:.0f} s") from e
        except KafkaException as e:
            err = e.args[0]
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise BrokerError(f"cannot create topic {topic!r} on {bootstrap}: {err}") from e


def admin_client(bootstrap: str, client_config: Mapping[str, str] | None = None) -> AdminClient:
    """An AdminClient; a setting librdkafka rejects is a :class:`BrokerError` (its value not echoed)."""
    try:
        return AdminClient({"bootstrap.servers": bootstrap, "logger": logging.getLogger("streaming.broker.admin"),
                            **(client_config or {})})
    except KafkaException as e:
        raise BrokerError(f"invalid Kafka client settings: {redact(str(e.args[0]), client_config)}") from None


def missing_topics(bootstrap: str, topics: Iterable[str], *, admin: AdminClient | None = None,
                   timeout: float = 5.0) -> list[str] | None:
    """Which of ``topics`` the broker does not have; None while it cannot be asked."""
    admin = admin or admin_client(bootstrap)
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException:
        return None
    return [t for t in topics if t not in md.topics or md.topics[t].error is not None]
