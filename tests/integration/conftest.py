"""Integration tier: a real Kafka-protocol broker and a real local Spark.

The broker is the one named by ``$KAFKA_BOOTSTRAP`` if set, else an embedded Tansu started once per
session. Every test gets fresh uuid-named topics; checkpoints live in ``tmp_path``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from batch_index.build.shards import BuildConfig, build_index
from batch_index.corpus.synthetic import SynthConfig, generate
from streaming.admin import create_topics
from streaming.broker import EmbeddedBroker

INDEX_SIZE = 300


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of the broker under test."""
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap


@pytest.fixture
def make_topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Callable[..., str]:
    """Create a fresh uuid-named topic: ``make_topic("queries", partitions=2)``."""

    def make(role: str, partitions: int = 1) -> str:
        name = f"test-{request.node.name[:40]}-{role}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")
        create_topics(kafka_bootstrap, [name], partitions=partitions)
        return name

    return make


@pytest.fixture(scope="session")
def corpus() -> tuple[list[str], np.ndarray]:
    """A small synthetic ECG corpus: ids and signals of shape (INDEX_SIZE, 2500)."""
    ids, _, signals = generate(0, INDEX_SIZE, SynthConfig(seed=7))
    return list(ids), np.asarray(signals, dtype=np.float32)


@pytest.fixture(scope="session")
def index_dir(corpus: tuple[list[str], np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index over :func:`corpus` with every metric, built without Spark."""
    ids, signals = corpus
    out = tmp_path_factory.mktemp("index") / "v1"
    return Path(build_index(ids, signals, out, BuildConfig(n_references=16, seed=1), sampling_rate=250.0))


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    """One local[2] SparkSession for the whole tier."""
    from streaming.job import spark_session

    session = spark_session("ecg-streaming-tests", master="local[2]")
    yield session
    session.stop()
