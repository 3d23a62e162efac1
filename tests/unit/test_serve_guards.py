"""What ``serve`` refuses or masks before it starts, and how skipped offsets are counted."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

from streaming.cli import build_parser
from streaming.config import ServeConfig
from streaming.errors import ConfigError
from streaming.offset_gaps import OffsetGaps


class Rec(NamedTuple):
    topic: str
    partition: int
    offset: int


def test_delivery_settings_cannot_be_weakened() -> None:
    for bad in ("acks=1", "acks=0", "enable.idempotence=false", "allow.auto.create.topics=true"):
        key, value = bad.split("=")
        with pytest.raises(ConfigError, match=bad.replace(".", r"\.")):
            ServeConfig(bootstrap="h:1", index="ix", kafka_options=((key, value),))
    ServeConfig(bootstrap="h:1", index="ix", kafka_options=(("acks", "-1"), ("enable.idempotence", "true")))


def test_secret_spark_settings_are_masked() -> None:
    cfg = ServeConfig(bootstrap="h:1", index="ix", spark_conf=(("spark.hadoop.fs.s3a.secret.key", "AKIA-s3cr3t"),
                                                               ("spark.ssl.keyPassword", "pw-12345"),
                                                               ("spark.executor.memory", "2g")))
    shown = json.dumps(cfg.redacted())
    assert "AKIA-s3cr3t" not in shown and "pw-12345" not in shown and '"2g"' in shown
    assert cfg.secrets == {"spark.hadoop.fs.s3a.secret.key": "AKIA-s3cr3t", "spark.ssl.keyPassword": "pw-12345"}


def test_topics_and_checkpoint_defaults() -> None:
    cfg = ServeConfig(bootstrap="h:1", index="ix")
    assert cfg.replication_factor == -1 and cfg.reply_topic_pattern is None and cfg.limits.reply_topic_pattern is None
    assert not Path(cfg.checkpoint_dir).is_relative_to(tempfile.gettempdir())  # not the shared temp dir
    for bad in (0, -2):
        with pytest.raises(ConfigError, match="replication factor"):
            ServeConfig(bootstrap="h:1", index="ix", replication_factor=bad)
    args = build_parser().parse_args(["serve", "--bootstrap", "h:1", "--index", "ix", "--replication-factor", "3",
                                      "--reply-topic-pattern", "replies-.*"])
    assert (args.replication_factor, args.reply_topic_pattern) == (3, "replies-.*")
    defaults = build_parser().parse_args(["serve", "--bootstrap", "h:1", "--index", "ix"])
    assert (defaults.replication_factor, defaults.reply_topic_pattern) == (-1, None)


def test_gaps_within_and_between_batches(tmp_path: Path) -> None:
    gaps = OffsetGaps(str(tmp_path))
    assert gaps.observe(0, [Rec("q", 0, 5), Rec("q", 0, 6), Rec("q", 1, 0)]) == 0  # nothing known before batch 0
    assert gaps.observe(1, [Rec("q", 0, 9), Rec("q", 0, 7), Rec("q", 1, 1)]) == 1  # 8 never read
    assert gaps.observe(2, [Rec("q", 0, 20), Rec("q", 1, 4)]) == 10 + 2
    assert gaps.observe(3, [Rec("q", 0, 0)]) == 0  # the log restarted (topic recreated): no gap
    assert gaps.total == 13


def test_gaps_after_a_restart_start_from_the_checkpoints_offset_log(tmp_path: Path) -> None:
    (tmp_path / "offsets").mkdir()
    metadata = '{"batchWatermarkMs":0,"batchTimestampMs":1,"conf":{}}'
    (tmp_path / "offsets" / "6").write_text("v1\n" + metadata + '\n{"q":{"0":40,"1":3,"@id":"x","@epoch":1}}\n')
    gaps = OffsetGaps(str(tmp_path))
    assert gaps.observe(7, [Rec("q", 0, 45), Rec("q", 1, 3)]) == 5
    assert OffsetGaps(str(tmp_path / "elsewhere")).observe(7, [Rec("q", 0, 45)]) == 0  # no log: nothing claimed


def test_serve_flags_are_the_config_fields_with_the_same_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    for f in dataclasses.fields(ServeConfig):  # a stray deployment variable must not change the defaults
        monkeypatch.delenv("ECG_" + f.name.upper(), raising=False)
    for name in ("KAFKA_BOOTSTRAP", "ECG_SPARK_MASTER", "SPARK_MASTER", "ECG_KAFKA_OPTIONS"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["serve", "--bootstrap", "h:1", "--index", "ix"])
    parsed = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)}
    defaults = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in parsed.items()} == {
        **defaults, "bootstrap": "h:1", "index": "ix"}
    monkeypatch.setenv("ECG_MAX_K", "7")
    monkeypatch.setenv("SPARK_MASTER", "spark://old:7077")  # the variable this flag read first still works
    monkeypatch.setenv("ECG_SPARK_CONF", "spark.a=1;spark.b=2")
    args = build_parser().parse_args(["serve", "--bootstrap", "h:1", "--index", "ix", "--no-create-topics"])
    assert (args.max_k, args.master, args.spark_conf, args.create_topics) == (
        7, "spark://old:7077", [("spark.a", "1"), ("spark.b", "2")], False)
