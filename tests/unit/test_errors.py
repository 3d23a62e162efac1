"""One error root: every deliberate error is found behind what reaches a command line, however it travelled."""

from __future__ import annotations

import pickle

import pytest

from batch_index.errors import EcgSearchError, IndexFormatError, InvalidInputError, MetricNotIndexedError, ours
from schemas import UndecodableError
from streaming.errors import BrokerError, ConfigError, DeliveryFailed, SourceConfigError


@pytest.mark.parametrize("cls", [InvalidInputError, MetricNotIndexedError, IndexFormatError, ConfigError,
                                 SourceConfigError, BrokerError, DeliveryFailed, UndecodableError])
def test_every_error_of_ours_is_under_the_one_root_and_found_as_itself(cls: type[EcgSearchError]) -> None:
    error = cls("signal 3: expected 2500 samples, got 12")
    assert isinstance(error, EcgSearchError) and ours(error) is error


def test_an_error_raised_from_ours_is_shown_as_ours() -> None:
    try:
        try:
            raise IndexFormatError("index directory '/x' does not exist")
        except IndexFormatError as e:
            raise RuntimeError("loading failed") from e
    except RuntimeError as outer:
        assert isinstance(ours(outer), IndexFormatError)


def test_an_error_carried_back_from_an_executor_as_text_is_rebuilt_with_its_class_and_message() -> None:
    # what Spark's PythonException / Py4JJavaError carries: the worker's traceback, as text
    wrapped = RuntimeError(
        "An exception was thrown from the Python worker. Please see the stack trace below.\n"
        "Traceback (most recent call last):\n"
        '  File "/work/batch_index/corpus/files.py", line 99, in signals_from_arrow\n'
        "batch_index.errors.InvalidInputError: row 17: signal has 12 samples, expected 2500\n")
    found = ours(wrapped)
    assert type(found) is InvalidInputError and str(found) == "row 17: signal has 12 samples, expected 2500"
    java = RuntimeError("An error occurred while calling o87.collectToPython.\n"
                        ": org.apache.spark.SparkException: Job aborted due to stage failure: Task 0 failed\n"
                        "org.apache.spark.api.python.PythonException: Traceback (most recent call last):\n"
                        "streaming.errors.BrokerError: cannot reach h:1\n\n\tat org.apache.spark.api.python")
    assert type(ours(java)) is BrokerError and str(ours(java)) == "cannot reach h:1"


def test_errors_that_are_not_ours_are_left_alone() -> None:
    assert ours(RuntimeError("ValueError: something else")) is None
    assert ours(KeyError("signal")) is None


def test_our_errors_survive_pickling_as_spark_ships_them() -> None:
    again = pickle.loads(pickle.dumps(MetricNotIndexedError("metric 'shape' is not in this index")))
    assert type(again) is MetricNotIndexedError and ours(again) is again
