"""Spark tier: one local[2] SparkSession for every test in it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.spark)


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    from batch_index.build.spark_job import spark_session

    session = spark_session("local[2]", app_name="ecg-index-tests", driver_memory="2g")
    session.sparkContext.setLogLevel("ERROR")
    yield session
