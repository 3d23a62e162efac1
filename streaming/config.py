"""The serving configuration: one frozen dataclass, and the only place each setting is described.

Every field of :class:`ServeConfig` carries its help text (and, where it differs from the rule, its
flag or environment variable) in its metadata; ``python -m streaming serve`` builds its flags from it
(:func:`streaming.cli.config_flags`), so a default, a name or a help text is written once. The rule:
flag ``--field-name``, environment variable ``ECG_FIELD_NAME``.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from batch_index.search import DEFAULT_MAX_K
from streaming.codec import DEFAULT_MAX_BYTES, TOPIC_NAME, Limits
from streaming.errors import ConfigError
from streaming.redaction import is_secret_key
from streaming.sink import forced_conflicts

SOURCES: Final[tuple[str, ...]] = ("ckafka", "kafka")



def setting(default: Any, help: str, *, env: str | None = None, flag: str | None = None,
            choices: tuple[str, ...] | None = None, metavar: str | None = None, secret: bool = False) -> Any:
    """A :class:`ServeConfig` field with what its flag needs (``env``/``flag`` only where the rule differs)."""
    return field(default=default, repr=not secret,
                 metadata={"help": help, "env": env, "flag": flag, "choices": choices, "metavar": metavar})


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``python -m streaming serve`` takes (each flag also has an environment variable)."""

    bootstrap: str = setting("", "Kafka bootstrap servers HOST:PORT", env="KAFKA_BOOTSTRAP")
    index: str = setting("", "index directory, or a directory with a CURRENT pointer to one")
    queries_topic: str = setting("ecg-queries", "topic the queries come from")
    replies_topic: str = setting("ecg-replies", "topic the replies go to")
    dead_letter_topic: str = setting("ecg-dead-letters", "topic for messages that cannot be answered")
    checkpoint: str | None = setting(
        None, "checkpoint directory (restarts resume from it); give one on durable storage in production; "
        "default: a directory private to this user under $XDG_STATE_HOME (~/.local/state/ecg-similarity/"
        "checkpoints), per queries topic and broker")
    source: str = setting("ckafka", "ckafka = Python source on confluent-kafka; kafka = Spark's JVM connector "
                          "(needs spark-sql-kafka on the classpath)", choices=SOURCES)
    starting_offsets: str = setting("earliest", "where a fresh checkpoint starts (a restart resumes from the "
                                    "checkpoint)", choices=("earliest", "latest"))
    max_queries_per_batch: int = setting(2000, "rate control: records per micro-batch")
    max_batch_bytes: int = setting(64 << 20, "ckafka: memory bound per micro-batch (values + keys)")
    trigger_ms: int = setting(0, "micro-batch interval; 0 = back to back (lowest latency)")
    idle_wait_ms: int = setting(200, "ckafka: long-poll this many ms when no query is waiting")
    max_read_ms: int = setting(300, "ckafka: a micro-batch stops reading this many ms after it has queries, "
                               "even without reaching the end of the topic")
    read_quiet_ms: int = setting(50, "ckafka: a micro-batch that reached the end of the topic waits this many ms "
                                 "for more queries (a burst is answered as one batch); 0 = none")
    max_k: int = setting(DEFAULT_MAX_K, "largest k a query may ask for")
    max_message_bytes: int = setting(DEFAULT_MAX_BYTES, "larger queries are rejected")
    reply_topic_pattern: str | None = setting(
        None, "opt in to per-query reply topics: a regex a query's own reply_topic must fullmatch; the service's "
        "queries, dead-letter and internal (__*) topics are refused whatever it says, and the topic must exist "
        "(the service never creates one); unset: replies go to --replies-topic only")
    n_probe: int | None = setting(None, "hkmeans: tree leaves seeding the graph walk (default: per metric)")
    ef: int | None = setting(None, "hkmeans: points the graph walk keeps (default: per metric)")
    rerank: int | None = setting(None, "candidates re-scored exactly (default: per metric)")
    master: str = setting("local[2]", "Spark master (env SPARK_MASTER is read too, for compatibility)",
                          env="ECG_SPARK_MASTER")
    executor_min_batch: int | None = setting(
        None, "micro-batches of at least this many queries are answered on the executors, one slice per core; "
        "smaller ones on the driver; 0 = always the driver; unset: 0 on a local master (its executors share "
        "the driver's cores), 128 on a cluster")
    search_threads: int | None = setting(None, "threads the driver's search uses; unset: one per core of the "
                                         "driver")
    create_topics: bool = setting(True, "do not create missing topics at start", flag="--no-create-topics")
    query_partitions: int = setting(1, "partitions of the queries topic when the service creates it")
    replication_factor: int = setting(-1, "replication factor of the topics the service creates; -1 = the "
                                      "broker's default.replication.factor")
    metrics_file: str | None = setting(None, "append per-batch metrics here as JSON lines")
    kafka_options: tuple[tuple[str, str], ...] = setting(
        (), "extra Kafka client setting, repeatable (security.protocol=SSL, sasl.username=...); env: "
        "';'-separated", flag="--kafka-option", metavar="KEY=VALUE", secret=True)
    spark_conf: tuple[tuple[str, str], ...] = setting(
        (), "extra Spark setting, repeatable (spark.jars.packages=... for --source kafka); env: ';'-separated",
        metavar="KEY=VALUE")

    def __post_init__(self) -> None:
        if not self.bootstrap:
            raise ConfigError("no broker: pass --bootstrap HOST:PORT or set KAFKA_BOOTSTRAP")
        if not self.index:
            raise ConfigError("no index: pass --index INDEX_DIR or set ECG_INDEX")
        if self.source not in SOURCES:
            raise ConfigError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.starting_offsets not in ("earliest", "latest"):
            raise ConfigError(f"starting offsets must be earliest or latest, got {self.starting_offsets!r}")
        for name in ("queries_topic", "replies_topic", "dead_letter_topic"):
            if not TOPIC_NAME.fullmatch(getattr(self, name)):
                raise ConfigError(f"{name.replace('_', ' ')} {getattr(self, name)!r} is not a valid topic name")
        for name in ("max_queries_per_batch", "max_batch_bytes", "max_k", "max_message_bytes", "n_probe", "ef",
                     "rerank", "query_partitions"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.executor_min_batch is not None and self.executor_min_batch < 0:
            raise ConfigError(f"executor min batch must be >= 0, got {self.executor_min_batch}")
        if self.search_threads is not None and self.search_threads < 1:
            raise ConfigError(f"search threads must be >= 1, got {self.search_threads}")
        if self.max_read_ms < 1:
            raise ConfigError(f"max read ms must be >= 1, got {self.max_read_ms}")
        if self.read_quiet_ms < 0:
            raise ConfigError(f"read quiet ms must be >= 0, got {self.read_quiet_ms}")
        if self.trigger_ms < 0 or self.idle_wait_ms < 0:
            raise ConfigError("trigger and idle wait must be >= 0 ms")
        if self.replication_factor == 0 or self.replication_factor < -1:
            raise ConfigError(f"replication factor must be >= 1, or -1 for the broker's default, got "
                              f"{self.replication_factor}")
        if self.reply_topic_pattern is not None:
            try:
                re.compile(self.reply_topic_pattern)
            except re.error as e:
                raise ConfigError(f"reply topic pattern {self.reply_topic_pattern!r} is not a regex: {e}") from e
        weakened = forced_conflicts(dict(self.kafka_options))
        if weakened:
            raise ConfigError(f"Kafka option(s) {', '.join(weakened)} would weaken delivery: the service always "
                              "produces with acks=all, idempotence on and topic auto-creation off; remove them")

    @property
    def checkpoint_dir(self) -> str:
        """``--checkpoint``, else a directory private to this user that survives reboots.

        Not the shared temp dir: other users could read or rewrite the offsets there, and a reboot that
        empties it would restart the stream from ``--starting-offsets``. Production gives
        ``--checkpoint`` on durable storage (the compose file does).
        """
        if self.checkpoint:
            return self.checkpoint
        where = re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.queries_topic}@{self.bootstrap}")
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return str(Path(state) / "ecg-similarity" / "checkpoints" / where)

    @property
    def executor_threshold(self) -> int:
        """Records from which a micro-batch goes to the executors (0: never).

        On a local master the executors are the driver's own cores, and the driver's threaded search
        answers a batch without a Spark job (measured with 1,000 queries at 10^5: 0.95 s in the driver
        with 2 threads, 1.2-1.3 s on the 2 executors, which pay ~0.25 s to ship the records).
        """
        if self.executor_min_batch is not None:
            return self.executor_min_batch
        return 0 if self.master.strip().startswith("local") else 128

    @property
    def driver_threads(self) -> int:
        if self.search_threads:
            return self.search_threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    @property
    def search_overrides(self) -> dict[str, int]:
        """Search knobs set explicitly; the rest come from each metric's recommended settings."""
        return {k: v for k, v in (("n_probe", self.n_probe), ("ef", self.ef), ("rerank", self.rerank))
                if v is not None}

    @property
    def limits(self) -> Limits:
        # a query may not have its reply written into the service's own input or dead-letter topic
        pattern = None if self.reply_topic_pattern is None else re.compile(self.reply_topic_pattern)
        return Limits(self.max_message_bytes, self.max_k, pattern,
                      frozenset((self.queries_topic, self.dead_letter_topic)), self.replies_topic)

    @property
    def service_topics(self) -> tuple[str, str, str]:
        return (self.queries_topic, self.replies_topic, self.dead_letter_topic)

    @property
    def client_config(self) -> dict[str, str]:
        return dict(self.kafka_options)

    @property
    def secrets(self) -> dict[str, str]:
        """Every setting whose value must never be logged (Kafka options and Spark settings alike)."""
        return {k: v for k, v in (*self.kafka_options, *self.spark_conf) if is_secret_key(k)}

    def redacted(self) -> dict[str, Any]:
        """The settings for logs: secret-looking Kafka options and Spark settings are masked."""
        d = asdict(self)
        d["kafka_options"] = {k: "***" if is_secret_key(k) else v for k, v in self.kafka_options}
        d["spark_conf"] = {k: "***" if is_secret_key(k) else v for k, v in self.spark_conf}
        d["checkpoint"] = self.checkpoint_dir
        return d
