"""Promise 5, backpressure: a burst far above the per-batch limit is drained in bounded batches.

The per-batch metrics (one JSON line per micro-batch) show every batch within the limit (records and
bytes) and the backlog: ``lag`` (queries still waiting; exact on Kafka, a lower bound on Tansu, whose
reported end offset is that of the newest record batch) and ``age_ms_max`` (how long the oldest query
of the batch waited). ``tools/fault_injection.py`` reports the job's peak memory over 10,000 queries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from streaming.client import StreamClient
from streaming.config import ServeConfig

from .reliability import REPLY_TIMEOUT, running

LIMIT = 20


def _metrics(path: Path) -> list[dict]:
    return [m for m in map(json.loads, path.read_text().splitlines()) if m["records"]]


def _config(bootstrap: str, make_topic: Callable[..., str], index_dir: Path, tmp_path: Path,
            **limits: int) -> ServeConfig:
    """Fresh topics, a checkpoint and a metrics file in ``tmp_path``, and the batch ``limits`` under test."""
    return ServeConfig(bootstrap=bootstrap, index=str(index_dir), queries_topic=make_topic("q"),
                       replies_topic=make_topic("r"), dead_letter_topic=make_topic("dlq"),
                       checkpoint=str(tmp_path / "ck"), metrics_file=str(tmp_path / "metrics.jsonl"), **limits)


def test_a_burst_ten_times_the_batch_limit_drains_in_bounded_batches_with_lag_visible(
        spark: object, kafka_bootstrap: str, make_topic: Callable[..., str], index_dir: Path,
        corpus: tuple[list[str], np.ndarray], tmp_path: Path) -> None:
    _, signals = corpus
    cfg = _config(kafka_bootstrap, make_topic, index_dir, tmp_path, max_queries_per_batch=LIMIT)
    with StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as client:
        burst = [client.send(signals[i % len(signals)], "euclidean", k=2, mode="hkmeans") for i in range(10 * LIMIT)]
        client.flush()  # the whole burst waits before the job starts
        with running(spark, cfg):
            replies = client.collect(burst, REPLY_TIMEOUT)
    assert len(replies) == len(burst) and all(r.result.ok for r in replies.values())
    batches = _metrics(tmp_path / "metrics.jsonl")
    sizes = [m["records"] for m in batches]
    assert sum(sizes) == len(burst) and max(sizes) <= LIMIT and len(sizes) >= 10, sizes
    lags = [m["lag"] for m in batches]
    assert None not in lags and lags[0] > 0 and lags[-1] == 0, lags  # the backlog is visible, then gone
    assert lags == sorted(lags, reverse=True), lags
    ages = [m["age_ms_max"] for m in batches]
    assert ages[-1] > ages[0], ages  # the last of the burst waited longest


def test_the_byte_limit_bounds_a_batch_of_large_messages(
        spark: object, kafka_bootstrap: str, make_topic: Callable[..., str], index_dir: Path,
        corpus: tuple[list[str], np.ndarray], tmp_path: Path) -> None:
    _, signals = corpus
    cfg = _config(kafka_bootstrap, make_topic, index_dir, tmp_path,
                  max_batch_bytes=50_000)  # a query is ~10 KB: at most 5 per batch
    with StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as client:
        sent = [client.send(signals[i], "cosine", k=1, mode="exact") for i in range(30)]
        client.flush()
        with running(spark, cfg):
            assert len(client.collect(sent, REPLY_TIMEOUT)) == len(sent)
    sizes = [m["records"] for m in _metrics(tmp_path / "metrics.jsonl")]
    assert sum(sizes) == 30 and max(sizes) <= 5, sizes
