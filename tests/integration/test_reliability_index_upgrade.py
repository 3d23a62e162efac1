"""Promise 4, index upgrades without downtime, while queries flow (extends ``test_index_upgrade.py``).

A steady stream of queries; a new version is published (its load is slow: 3 s), then a corrupt one.
No query is dropped, each result names the version that answered it, the versions never go back
(v1 ... v1, v2 ... v2), v1 keeps answering while v2 loads, and the corrupt version is refused (logged
once, counted in the per-batch metrics) while v2 keeps serving. ``tools/fault_injection.py --only
upgrade`` runs the 10,000-query version.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from batch_index.search import SearchIndex
from streaming.client import StreamClient
from streaming.config import ServeConfig
from streaming.handler import BatchHandler
from streaming.index_cache import IndexHolder

from .reliability import REPLY_TIMEOUT, running
from .test_index_upgrade import _build, _point

RATE = 20.0  # queries per second
SLOW_LOAD_S = 3.0


def test_upgrade_mid_stream_with_a_slow_load_then_a_corrupt_version(
        spark: object, kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path,
        corpus: tuple[list[str], np.ndarray], caplog: pytest.LogCaptureFixture) -> None:
    ids, signals = corpus
    root = tmp_path / "index"
    v1 = SearchIndex.load(_build(root, "v1", signals[:100], ids[:100])).version
    v2 = SearchIndex.load(_build(root, "v2", signals[:150], ids[:150])).version
    _point(root, "v1")

    def slow_loader(path: Path) -> SearchIndex:
        if path.name == "v2":
            time.sleep(SLOW_LOAD_S)
        return SearchIndex.load(path)

    cfg = ServeConfig(bootstrap=kafka_bootstrap, index=str(root), queries_topic=make_topic("q"),
                      replies_topic=make_topic("r"), dead_letter_topic=make_topic("dlq"),
                      checkpoint=str(tmp_path / "ck"))
    holder = IndexHolder(root, loader=slow_loader)
    sent: list[tuple[str, float]] = []  # (correlation id, monotonic send time), in send (= offset) order
    events: dict[str, float] = {}
    with running(spark, cfg, BatchHandler(cfg, holder)) as (handler, query), \
            StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as client, \
            caplog.at_level(logging.INFO, logger="streaming.index_cache"):

        def flow(until: Callable[[], bool], timeout: float) -> None:
            deadline, next_send = time.monotonic() + timeout, time.monotonic()
            while not until():
                assert time.monotonic() < deadline, f"timed out; sent {len(sent)}, answered {len(client.replies)}"
                if time.monotonic() >= next_send:
                    sent.append((client.send(signals[120], "cosine", k=1, mode="exact"), time.monotonic()))
                    next_send += 1 / RATE
                client.poll(0.01)

        def versions() -> set[str | None]:
            return {r.result.index_version for r in client.replies.values()}

        flow(lambda: len(client.replies) >= 10, REPLY_TIMEOUT)
        _point(root, "v2")
        events["published v2"] = time.monotonic()
        flow(lambda: v2 in versions(), REPLY_TIMEOUT)
        events["v2 answering"] = time.monotonic()
        flow(lambda: time.monotonic() > events["v2 answering"] + 1.0, 10)

        bad = root / "v3"
        shutil.copytree(root / "v2", bad)
        with open(next(bad.rglob("signals.npy")), "r+b") as f:  # flip bytes: checksum mismatch
            f.seek(200)
            f.write(b"\xff" * 16)
        _point(root, "v3")
        events["published corrupt v3"] = time.monotonic()
        flow(lambda: holder.refused == 1, 60)
        refused_at = time.monotonic()
        flow(lambda: time.monotonic() > refused_at + 1.5, 10)
        replies = client.collect([cid for cid, _ in sent], REPLY_TIMEOUT)
        assert query.isActive and query.exception() is None
        last_metrics = dict(handler.last)

    missing = [cid for cid, _ in sent if cid not in replies]
    assert not missing, f"{len(missing)} of {len(sent)} queries dropped during the upgrade"
    seq = [replies[cid].result.index_version for cid, _ in sent]
    assert set(seq) == {v1, v2}, set(seq)
    first_v2 = seq.index(v2)
    assert seq == [v1] * first_v2 + [v2] * (len(seq) - first_v2), "versions went back and forth"
    for cid, _ in sent:
        res = replies[cid].result
        assert res.ok and (res.matches[0][0] == ids[120]) == (res.index_version == v2)  # row 120 is only in v2
    # the slow load did not stall serving: v1 kept answering while v2 loaded
    loading = [t + replies[cid].latency_ms / 1000 for cid, t in sent if replies[cid].result.index_version == v1]
    assert any(t > events["published v2"] + 1.0 for t in loading), "no query answered while the new version loaded"
    # the corrupt version: refused once, logged, counted; v2 kept serving every query sent after it
    after = [replies[cid].result.index_version for cid, t in sent if t > events["published corrupt v3"]]
    assert after and set(after) == {v2}
    assert holder.refused == 1 and last_metrics["index_refused"] == 1 and last_metrics["index_reloads"] == 1
    assert caplog.text.count("refusing new index version") == 1 and "corrupt" in caplog.text
