"""Re-creating the service's topics when a broker loses them (a memory-only broker restarted)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from confluent_kafka.admin import AdminClient

from batch_index.errors import EcgSearchError
from streaming.admin import admin_client, create_topics, missing_topics
from streaming.config import ServeConfig

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


class TopicKeeper:
    """Re-creates the service's topics when they vanish (a broker that keeps them in memory restarted).

    Runs beside the query in ``serve`` (``start()``/``stop()``), checking every ``interval_s``; the
    ckafka source then notices the new topic ids and reads the new logs from their beginning.
    """

    def __init__(self, cfg: ServeConfig, interval_s: float = 2.0) -> None:
        self.cfg = cfg
        self.interval_s = interval_s
        self.recreated: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._admin: AdminClient | None = None

    def check(self) -> list[str]:
        """Create whichever service topic is missing now; returns those created."""
        self._admin = self._admin or admin_client(self.cfg.bootstrap, self.cfg.client_config)
        missing = missing_topics(self.cfg.bootstrap, self.cfg.service_topics, admin=self._admin)
        if not missing:
            return []
        logger.warning("topics %s are missing (broker restarted with empty memory, or deleted); re-creating them",
                       missing)
        for t in missing:
            partitions = self.cfg.query_partitions if t == self.cfg.queries_topic else 1
            create_topics(self.cfg.bootstrap, [t], partitions=partitions, replication=self.cfg.replication_factor,
                          client_config=self.cfg.client_config)
        self.recreated.extend(missing)
        return missing

    def start(self) -> TopicKeeper:
        self._thread = threading.Thread(target=self._run, name="topic-keeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except EcgSearchError as e:
                logger.warning("could not re-create topics: %s", e)
