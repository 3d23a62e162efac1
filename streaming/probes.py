"""What a batch's metrics line reports about the process and the queue: GC pauses and the lag behind the topic."""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from streaming.admin import admin_client
from streaming.errors import BrokerError

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


class GcPauses:
    """Milliseconds this process has spent in Python's cyclic garbage collector (via ``gc.callbacks``).

    The driver holds pyspark, numba and the index: millions of objects that a full collection walks.
    Each batch reports its share (``gc_ms``), so a pause shows up as what it is, not as slow scoring.
    """

    def __init__(self) -> None:
        self.total_ms = 0.0
        self._started: float | None = None
        gc.callbacks.append(self._on)

    def _on(self, phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.total_ms += (time.perf_counter() - self._started) * 1000
            self._started = None

    def close(self) -> None:
        if self._on in gc.callbacks:
            gc.callbacks.remove(self._on)


@functools.cache
def gc_pauses() -> GcPauses:
    """The process's one counter (handlers come and go; a callback each would pile up in ``gc.callbacks``)."""
    return GcPauses()


class LagProbe:
    """Queries still waiting in the queries topic after a batch: the broker's end offsets minus ours.

    Exact on Apache Kafka; on Tansu, whose reported end offset is that of the newest record *batch*,
    it is a lower bound (``age_ms_max`` in the same metrics line is exact on both: how old the oldest
    query of the batch was when scored). None while the broker does not answer within ``timeout``.
    """

    def __init__(self, bootstrap: str, topic: str, client_config: Mapping[str, str] | None = None, *,
                 timeout: float = 2.0, refresh_s: float = 10.0) -> None:
        self.bootstrap, self.topic, self.client_config = bootstrap, topic, dict(client_config or {})
        self.timeout, self.refresh_s = timeout, refresh_s
        self.next: dict[int, int] = {}  # partition -> the offset after the last one answered
        self._admin: AdminClient | None = None
        self._partitions: tuple[int, ...] = ()
        self._listed_at = -float("inf")

    def advance(self, offsets: Mapping[str, Mapping[str, list[int]]]) -> None:
        """Take a batch's offset ranges (``BatchStats.offsets``: topic -> partition -> [first, last])."""
        for p, (_, last) in offsets.get(self.topic, {}).items():
            self.next[int(p)] = last + 1

    def measure(self) -> int | None:
        try:
            admin = self._admin = self._admin or admin_client(self.bootstrap, self.client_config)
            if time.monotonic() - self._listed_at > self.refresh_s:
                desc = admin.describe_topics(TopicCollection([self.topic]), request_timeout=self.timeout)
                self._partitions = tuple(p.id for p in desc[self.topic].result(self.timeout).partitions)
                self._listed_at = time.monotonic()
            ends = admin.list_offsets({TopicPartition(self.topic, p): OffsetSpec.latest() for p in self._partitions},
                                      request_timeout=self.timeout)
            return sum(max(0, f.result(self.timeout).offset - self.next.get(tp.partition, 0))
                       for tp, f in ends.items())
        except (KafkaException, BrokerError, TimeoutError, concurrent.futures.TimeoutError, ValueError) as e:
            # (concurrent.futures.TimeoutError is not the builtin TimeoutError before Python 3.11)
            logger.debug("lag unknown: %s", e)
            return None
