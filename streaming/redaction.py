"""Secret settings never reach a log line or an error: which keys are secret, and masking their values."""

from __future__ import annotations

import logging
from collections.abc import Mapping


def redact(text: str, client_config: Mapping[str, str] | None) -> str:
    """``text`` with the value of every secret-looking setting of ``client_config`` replaced by ``***``."""
    for key, value in (client_config or {}).items():
        if value and len(value) >= 3 and is_secret_key(key):
            text = text.replace(value, "***")
    return text


class SecretFilter(logging.Filter):
    """Masks the values of secret Kafka settings in every log record that passes a handler."""

    def __init__(self, client_config: Mapping[str, str] | None) -> None:
        super().__init__()
        self.client_config = dict(client_config or {})

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        masked = redact(text, self.client_config)
        if masked != text:
            record.msg, record.args = masked, None
        return True


def is_secret_key(key: str) -> bool:
    """Kafka/JAAS settings whose values must never be logged (passwords, private keys, tokens, JAAS lines)."""
    k = key.lower().removeprefix("kafka.")
    return any(word in k for word in _SECRET_WORDS) or k in ("ssl.key.pem", "sasl.oauthbearer.config")


_SECRET_WORDS = ("password", "secret", "token", "jaas", "credential")
