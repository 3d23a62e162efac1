"""Index upgrades at micro-batch boundaries: a pointer to a new version, corrupt versions refused."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from batch_index.build.shards import BuildConfig, build_index
from batch_index.errors import IndexFormatError
from streaming.client import StreamClient
from streaming.config import ServeConfig
from streaming.handler import BatchHandler
from streaming.index_cache import IndexHolder, resolve_index
from streaming.job import start_query, stop_gracefully


def _build(root: Path, name: str, signals: np.ndarray, ids: list[str]) -> Path:
    return Path(build_index(ids, signals, root / name, BuildConfig(n_references=8, seed=2)))


def _point(root: Path, name: str) -> None:
    tmp = root / "CURRENT.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "CURRENT")  # atomic publish


@pytest.fixture
def versions(tmp_path: Path, corpus: tuple[list[str], np.ndarray]) -> Path:
    ids, signals = corpus
    root = tmp_path / "index"
    _build(root, "v1", signals[:100], ids[:100])
    _build(root, "v2", signals[:150], ids[:150])
    _point(root, "v1")
    return root


def test_pointer_resolution(versions: Path, tmp_path: Path) -> None:
    assert resolve_index(versions) == (versions / "v1").resolve()
    assert resolve_index(versions / "v2") == (versions / "v2").resolve()
    link = tmp_path / "live"
    link.symlink_to(versions / "v2")
    assert resolve_index(link) == (versions / "v2").resolve()
    (versions / "CURRENT").write_text("../elsewhere\n")
    with pytest.raises(IndexFormatError, match="directly inside"):
        resolve_index(versions)


def test_new_version_swapped_in_at_the_boundary_and_corrupt_one_refused(
        versions: Path, corpus: tuple[list[str], np.ndarray]) -> None:
    ids, signals = corpus
    holder = IndexHolder(versions)
    v1 = holder.current()
    assert v1.size == 100
    _point(versions, "v2")
    assert holder.current() is v1  # loading in the background; this batch keeps v1
    holder.wait_idle(30)
    v2 = holder.current()
    assert v2.size == 150 and holder.reloads == 1

    bad = _build(versions, "v3", signals[:120], ids[:120])
    with open(next(bad.rglob("signals.npy")), "r+b") as f:  # flip bytes: checksum mismatch
        f.seek(200)
        f.write(b"\xff" * 16)
    _point(versions, "v3")
    holder.current()
    holder.wait_idle(30)
    assert holder.current() is v2 and holder.refused == 1
    holder.current()
    holder.wait_idle(30)
    assert holder.refused == 1  # refused once, not re-tried every batch

    _build(versions, "v4", signals[:50, :1000], ids[:50])  # another query length: incompatible
    _point(versions, "v4")
    holder.current()
    holder.wait_idle(30)
    assert holder.current() is v2 and holder.refused == 2


def test_running_job_answers_with_the_new_version(
        spark: object, versions: Path, kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path,
        corpus: tuple[list[str], np.ndarray]) -> None:
    _, signals = corpus
    cfg = ServeConfig(bootstrap=kafka_bootstrap, index=str(versions), queries_topic=make_topic("q"),
                      replies_topic=make_topic("r"), dead_letter_topic=make_topic("dlq"),
                      checkpoint=str(tmp_path / "ck"))
    handler = BatchHandler(cfg, IndexHolder(versions))
    query = start_query(spark, cfg, handler)  # type: ignore[arg-type]
    try:
        with StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as client:
            first = client.send(signals[120], "cosine", k=1, mode="exact")
            r1 = client.collect([first], 90)[first].result
            _point(versions, "v2")
            seen: set[str | None] = set()
            for _ in range(40):  # keep querying until the job has swapped versions
                cid = client.send(signals[120], "cosine", k=1, mode="exact")
                res = client.collect([cid], 30)[cid].result
                seen.add(res.index_version)
                if len(seen) > 1 or res.index_version != r1.index_version:
                    break
        assert res.ok and res.index_version != r1.index_version
        assert res.matches[0][0] == corpus[0][120]  # row 120 exists only in v2
        assert r1.matches[0][0] != corpus[0][120]
    finally:
        stop_gracefully(query)
