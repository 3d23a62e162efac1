"""Promise 6, security basics.

- Kafka settings (TLS/SASL) reach every client the service makes: proven by settings that cannot
  work (a CA file that does not exist; TLS against this plaintext broker) making each client fail
  clearly instead of being ignored: the query client, the admin client, the reply producer, the topic
  keeper, and the Spark source in its Python worker.
- Secrets never appear in logs, errors or results (masked wherever a setting's value could surface;
  ``test_reliability_restart.py`` checks a whole serving run's logs, checkpoint, metrics and replies).
- Limits on message size, k and reply topics are enforced (batch size: ``test_reliability_backpressure``).
- Index paths from configuration are validated with clear errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from batch_index.errors import IndexFormatError
from streaming.admin import admin_client, create_topics
from streaming.cli import main
from streaming.client import StreamClient
from streaming.codec import decode_result, encode_query
from streaming.config import ServeConfig
from streaming.errors import BrokerError, ClientError, ConfigError, SourceConfigError
from streaming.handler import BatchHandler
from streaming.index_cache import IndexHolder, resolve_index
from streaming.job import start_query
from streaming.kafka_source import KafkaStreamReader, SourceOptions
from streaming.redaction import redact
from streaming.scoring import Record, answer_batch
from streaming.sink import Publisher
from streaming.topic_keeper import TopicKeeper

REPO = Path(__file__).resolve().parents[2]
SECRET = "hunter2-correct-horse-battery"
BAD_TLS = {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": "alice",
           "sasl.password": SECRET, "ssl.ca.location": "/nonexistent/ca.pem"}


def _no_secret(text: str) -> str:
    assert SECRET not in text, text
    return text


def test_settings_reach_every_client_and_fail_clearly(kafka_bootstrap: str, make_topic: Callable[..., str],
                                                      index_dir: Path) -> None:
    cfg = ServeConfig(bootstrap=kafka_bootstrap, index=str(index_dir), queries_topic=make_topic("q"),
                      replies_topic=make_topic("r"), dead_letter_topic=make_topic("dlq"),
                      kafka_options=tuple(BAD_TLS.items()))
    failures = []
    with pytest.raises(ClientError, match="invalid Kafka client settings.*ssl.ca.location") as e:
        StreamClient(kafka_bootstrap, cfg.queries_topic, cfg.replies_topic, BAD_TLS)
    failures.append(str(e.value))
    with pytest.raises(BrokerError, match="ssl.ca.location") as e:
        create_topics(kafka_bootstrap, ["x"], client_config=BAD_TLS)
    failures.append(str(e.value))
    with pytest.raises(BrokerError, match="reply producer.*ssl.ca.location") as e:
        _ = Publisher(kafka_bootstrap, cfg.client_config).producer
    failures.append(str(e.value))
    with pytest.raises(BrokerError, match="ssl.ca.location") as e:
        TopicKeeper(cfg).check()
    failures.append(str(e.value))
    reader = KafkaStreamReader(SourceOptions.from_options({
        "kafka.bootstrap.servers": kafka_bootstrap, "subscribe": cfg.queries_topic,
        **{f"kafka.{k}": v for k, v in BAD_TLS.items()}}))
    with pytest.raises(SourceConfigError, match="ssl.ca.location") as e:
        reader.read({cfg.queries_topic: {}})
    failures.append(str(e.value))
    for text in failures:
        _no_secret(text)
    assert SECRET not in repr(cfg) and SECRET not in str(cfg.redacted()) and SECRET not in repr(reader.opts)
    assert cfg.redacted()["kafka_options"]["sasl.password"] == "***"

    # TLS against this plaintext broker: refused (after the connect timeout), not silently plaintext
    with pytest.raises(ClientError, match=r"cannot reach the broker.*security\.protocol=SSL"):
        StreamClient(kafka_bootstrap, cfg.queries_topic, cfg.replies_topic, {"security.protocol": "SSL"}, timeout=2)
    StreamClient(kafka_bootstrap, cfg.queries_topic, cfg.replies_topic, {"security.protocol": "PLAINTEXT"}).close()


def test_spark_source_gets_the_settings_and_its_failure_shows_no_secret(
        spark: object, kafka_bootstrap: str, make_topic: Callable[..., str], index_dir: Path,
        tmp_path: Path) -> None:
    good = ServeConfig(bootstrap=kafka_bootstrap, index=str(index_dir), queries_topic=make_topic("q"),
                       replies_topic=make_topic("r"), dead_letter_topic=make_topic("dlq"),
                       checkpoint=str(tmp_path / "ck"))
    handler = BatchHandler(good)  # a working reply producer: only the source sees the bad settings
    query = start_query(spark, replace(good, kafka_options=tuple(BAD_TLS.items())), handler)  # type: ignore[arg-type]
    try:
        with pytest.raises(Exception, match="ckafka source cannot create its Kafka") as e:
            query.awaitTermination(120)
        _no_secret(str(e.value))
    finally:
        query.stop()


def test_serve_with_unusable_settings_exits_clearly_without_the_secret(kafka_bootstrap: str,
                                                                        index_dir: Path) -> None:
    args = [sys.executable, "-m", "streaming", "serve", "--bootstrap", kafka_bootstrap, "--index", str(index_dir)]
    for k, v in BAD_TLS.items():
        args += ["--kafka-option", f"{k}={v}"]
    run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ECG_LOG_LEVEL": "DEBUG"})
    assert run.returncode == 1, run.stderr[-2000:]
    err = _no_secret(run.stdout + run.stderr)
    assert "error: invalid Kafka client settings" in err and "ssl.ca.location" in err and "Traceback" not in err
    assert '"sasl.password": "***"' in err  # the settings are logged, the secret masked


def test_redaction_catches_a_secret_pasted_into_the_wrong_setting() -> None:
    cfg = {"sasl.password": SECRET, "security.protocol": SECRET}  # librdkafka echoes an invalid value
    with pytest.raises(BrokerError) as e:
        admin_client("127.0.0.1:1", cfg)
    assert "***" in _no_secret(str(e.value)) and e.value.__cause__ is None and e.value.__suppress_context__
    assert redact(f"x {SECRET} y", {"ssl.key.password": SECRET}) == "x *** y"
    assert redact(f"x {SECRET} y", {"client.id": SECRET}) == f"x {SECRET} y"  # not a secret setting


def test_limits_are_enforced(index_dir: Path, corpus: tuple[list[str], np.ndarray]) -> None:
    _, signals = corpus
    cfg = ServeConfig(bootstrap="unused:1", index=str(index_dir), queries_topic="q", dead_letter_topic="dlq",
                      max_k=5, max_message_bytes=20_000)
    cases = {
        "k6": (encode_query("k6", signals[0], "cosine", k=6), "BAD_K"),
        "big": (encode_query("big", np.zeros(6000, np.float32), "cosine"), "OVERSIZE"),
        "loop": (encode_query("loop", signals[0], "cosine", reply_topic="q"), "BAD_REPLY_TOPIC"),
        "dlq": (encode_query("dlq", signals[0], "cosine", reply_topic="dlq"), "BAD_REPLY_TOPIC"),
        "ok": (encode_query("ok", signals[0], "cosine", k=5), None),
    }
    records = [Record(cid.encode(), raw, "q", 0, i) for i, (cid, (raw, _)) in enumerate(cases.items())]
    out, _ = answer_batch(records, IndexHolder(index_dir).current(), replies_topic="r", dead_letter_topic="dlq",
                          limits=cfg.limits)
    replies = {decode_result(m.value).correlation_id: (m.topic, decode_result(m.value)) for m in out
               if m.kind == "reply"}
    for cid, (_, code) in cases.items():
        topic, res = replies[cid]
        assert topic == "r" and res.error_code == code, (cid, res)
    for bad in ({"max_k": 0}, {"max_message_bytes": 0}, {"max_queries_per_batch": 0}, {"max_batch_bytes": 0},
                {"reply_topic_pattern": "("}, {"queries_topic": "a b"}):
        with pytest.raises(ConfigError):
            replace(cfg, **bad)


def test_index_paths_are_validated(tmp_path: Path, index_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "afile").write_text("x")
    (root / "v1").symlink_to(index_dir, target_is_directory=True)  # a version living elsewhere: refused too
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path / "afile": "is not a directory",
    }
    for path, message in cases.items():
        with pytest.raises(IndexFormatError, match=message):
            resolve_index(path)
    for pointer, message in (("../../etc", "directly inside"), ("v1/../../x", "directly inside"),
                             ("v1", "directly inside"), ("", "is empty"), ("v9", "directly inside|not a directory")):
        (root / "CURRENT").write_text(pointer + "\n")
        with pytest.raises(IndexFormatError, match=message):
            resolve_index(root)
    (root / "CURRENT").write_text(str(tmp_path / "afile") + "\n")  # absolute paths are allowed, if directories
    with pytest.raises(IndexFormatError, match="not a directory"):
        resolve_index(root)

    rc = main(["serve", "--bootstrap", "127.0.0.1:1", "--index", str(tmp_path / "afile")])
    err = capsys.readouterr().err
    assert rc == 1 and "error: index path" in err and "is not a directory" in err and "Traceback" not in err
