"""The service's errors: each a subclass of the product's one root, :class:`batch_index.errors.EcgSearchError`.

Both command lines print ``error: <message>`` for any of them and exit with its ``exit_code``; nothing else
needs to know which file raised it.
"""

from __future__ import annotations

from batch_index.errors import EcgSearchError


class ConfigError(EcgSearchError, ValueError):
    """A serve setting is missing or out of range."""


class SourceConfigError(EcgSearchError, ValueError):
    """The source's options (or the Kafka settings passed through them) are unusable."""


class BrokerError(EcgSearchError):
    """A broker could not be found, started, reached, or refused a request (topics, settings)."""


class ClientError(EcgSearchError):
    """The broker or the reply topic cannot be reached from the client."""


class DeliveryAborted(EcgSearchError):
    """Delivery was abandoned on request (shutdown while the broker is away); the batch is replayed."""


class DeliveryFailed(EcgSearchError):
    """A service topic refused a message and its bounded stand-in: the batch fails uncommitted."""


__all__ = ["BrokerError", "ClientError", "ConfigError", "DeliveryAborted", "DeliveryFailed", "SourceConfigError"]
