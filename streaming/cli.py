"""``python -m streaming``: serve the streaming job, send queries, tail replies.

Contract used by outside evaluations (kept stable; more flags are fine)::

    python -m streaming serve --bootstrap HOST:PORT --index INDEX_DIR [--queries-topic T --replies-topic R
                              --checkpoint DIR]
    python -m streaming send --bootstrap HOST:PORT --queries QUERIES.parquet --metric M --mode MODE --k K
                             --output RESULTS.parquet [--timeout S]

Exit codes: 0 ok, 1 failure (replies missing, job failed, broker unreachable), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import typing
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from batch_index.engine.metrics import DEFAULT_METRICS, METRICS
from batch_index.errors import InvalidInputError, ours
from batch_index.search import MODES
from streaming.config import ServeConfig

logger = logging.getLogger(__name__)

ENV_BOOTSTRAP: Final[str] = "KAFKA_BOOTSTRAP"
ENV_INDEX: Final[str] = "ECG_INDEX"
ENV_QUERIES: Final[str] = "ECG_QUERIES_TOPIC"
ENV_REPLIES: Final[str] = "ECG_REPLIES_TOPIC"
ENV_KAFKA_OPTIONS: Final[str] = "ECG_KAFKA_OPTIONS"  # "key=value;key=value" (TLS/SASL settings)


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(name, default)


def _add(p: argparse.ArgumentParser, flag: str, env: str | None, default: Any, help: str, **kw: Any) -> None:
    shown = f" (env {env})" if env else ""
    value = _env(env, default) if env else default
    if "type" in kw and value is not None and isinstance(value, str):
        value = kw["type"](value)
    p.add_argument(flag, default=value, help=f"{help}{shown}; default: %(default)s", **kw)


def config_flags(p: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One flag per field of the dataclass ``cls``, from the field's metadata (see :mod:`streaming.config`).

    The flag is ``--field-name`` and its environment variable ``ECG_FIELD_NAME`` unless the metadata
    names others; the type follows the annotation (``int``, ``str``, optional ones, ``bool`` as a
    ``--no-...`` switch, ``KEY=VALUE`` pairs repeatable and ';'-separated in the environment).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, kind = f.metadata, hints[f.name]
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        env = meta.get("env") or "ECG_" + f.name.upper()
        if kind is bool:
            p.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                           help=meta["help"])
            continue
        raw = os.environ.get(env)
        if raw is None and f.name == "master":
            raw = os.environ.get("SPARK_MASTER")  # the name this flag read before ECG_SPARK_MASTER
        if typing.get_origin(kind) is tuple:  # KEY=VALUE pairs
            default = [_key_value(o) for o in (raw or "").split(";") if o.strip()] if raw else list(f.default)
            p.add_argument(flag, dest=f.name, action="append", type=_key_value, default=default,
                           metavar=meta.get("metavar"), help=f"{meta['help']} (env {env})")
            continue
        convert = int if int in (kind, *typing.get_args(kind)) else str
        default = f.default if raw is None else convert(raw)
        shown = "; default: %(default)s" if f.default not in (None, "") else ""  # else the help says it
        p.add_argument(flag, dest=f.name, type=convert, default=default, choices=meta.get("choices"),
                       help=f"{meta['help']} (env {env}){shown}")


def config_from_args(cls: type[Any], args: argparse.Namespace) -> Any:
    """The dataclass ``cls`` from the flags :func:`config_flags` added (its validation runs here)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _common(p: argparse.ArgumentParser) -> None:
    _add(p, "--bootstrap", ENV_BOOTSTRAP, None, "Kafka bootstrap servers HOST:PORT")
    _add(p, "--queries-topic", ENV_QUERIES, "ecg-queries", "topic the queries go to")
    _add(p, "--replies-topic", ENV_REPLIES, "ecg-replies", "topic the replies come from")
    env_opts = [_key_value(o) for o in (_env(ENV_KAFKA_OPTIONS) or "").split(";") if o.strip()]
    p.add_argument("--kafka-option", action="append", type=_key_value, default=env_opts, metavar="KEY=VALUE",
                   help=f"extra Kafka client setting, repeatable (security.protocol=SSL, sasl.username=...) "
                        f"(env {ENV_KAFKA_OPTIONS}, ';'-separated)")


def _query_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--metric", required=required, default=None if required else "cosine", choices=METRICS)
    p.add_argument("--mode", default="hkmeans", choices=MODES, help="default: %(default)s")
    p.add_argument("--k", type=int, default=10, help="matches per query; default: %(default)s")
    p.add_argument("--threshold", type=float, default=None, help="drop matches scoring below this")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for replies; default: %(default)s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m streaming", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default=_env("ECG_LOG_LEVEL", "INFO").upper(),
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
                        help="(env ECG_LOG_LEVEL); default: %(default)s")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the streaming job until interrupted (SIGINT/SIGTERM)")
    config_flags(s, ServeConfig)

    s = sub.add_parser("send", help="send every row of a Parquet file as a query; write the replies as Parquet")
    _common(s)
    s.add_argument("--queries", required=True, type=Path, help="Parquet with columns id (string), signal (list)")
    s.add_argument("--output", required=True, type=Path, help="Parquet: query_id, rank, id, score, latency_ms, "
                   "error")
    _query_flags(s, required=True)

    s = sub.add_parser("send-one", help="send one query from a file and print its matches")
    _common(s)
    s.add_argument("input", type=Path, help=".npy, .csv, .parquet (with --row or --id) or a WFDB record (.hea)")
    s.add_argument("--row", type=int, default=None, help="row of a 2-D .npy/.csv or Parquet file; default 0")
    s.add_argument("--id", dest="record_id", default=None, help="Parquet: the row with this id")
    s.add_argument("--start-s", type=float, default=0.0, help="WFDB: window start in seconds")
    s.add_argument("--lead", default=None, help="WFDB: lead name or index; default: the first")
    s.add_argument("--plot", type=Path, default=None, help="save the query beside its top matches (PNG)")
    s.add_argument("--plot-index", type=Path, default=None, help="index to take the matches' signals from")
    _query_flags(s, required=False)

    s = sub.add_parser("demo", help="everything on this machine: broker, synthetic corpus, index, job, queries")
    s.add_argument("--size", type=int, default=2000, help="synthetic signals to index; default: %(default)s")
    s.add_argument("--workdir", type=Path, default=None, help="where the index and checkpoint go (default: temp)")
    s.add_argument("--k", type=int, default=3, help="matches per query; default: %(default)s")

    s = sub.add_parser("tail", help="print replies as they arrive")
    _common(s)
    s.add_argument("--from-beginning", action="store_true")
    s.add_argument("--idle-timeout", type=float, default=None, help="stop after this many quiet seconds")
    return parser


# ---- commands -----------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from streaming.job import serve

    return serve(config_from_args(ServeConfig, args))


def cmd_send(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch_index.corpus.files import read_corpus
    from streaming.client import StreamClient

    ids, signals, _ = read_corpus(args.queries)
    run = uuid.uuid4().hex[:12]
    with StreamClient(args.bootstrap, args.queries_topic, args.replies_topic, dict(args.kafka_option),
                      timeout=min(15.0, args.timeout)) as client:
        cids = [client.send(sig, args.metric, k=args.k, mode=args.mode, threshold=args.threshold,
                            correlation_id=f"{run}-{i}") for i, sig in enumerate(signals)]
        replies = client.collect(cids, args.timeout)
        undelivered = dict(client.undelivered)
    cols: dict[str, list[Any]] = {c: [] for c in ("query_id", "rank", "id", "score", "latency_ms", "error")}

    def row(qid: str, rank: int | None, mid: str | None, score: float | None, lat: float | None,
            err: str | None) -> None:
        for c, v in zip(cols, (qid, rank, mid, score, lat, err)):
            cols[c].append(v)

    n_err = 0
    for qid, cid in zip(ids, cids):
        reply = replies.get(cid)
        if cid in undelivered:
            row(qid, None, None, None, None, f"NOT_SENT: {undelivered[cid]}")
        elif reply is None:
            row(qid, None, None, None, None, f"NO_REPLY: no reply within {args.timeout:g} s")
        elif not reply.result.ok:
            n_err += 1
            row(qid, None, None, None, reply.latency_ms, f"{reply.result.error_code}: {reply.result.error_message}")
        elif not reply.result.matches:
            row(qid, None, None, None, reply.latency_ms, None)
        else:
            for mid, score, rank in reply.result.matches:
                row(qid, rank, mid, score, reply.latency_ms, None)
    schema = pa.schema([("query_id", pa.string()), ("rank", pa.int32()), ("id", pa.string()),
                        ("score", pa.float64()), ("latency_ms", pa.float64()), ("error", pa.string())])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(cols, schema=schema), args.output)
    lat = np.array([r.latency_ms for r in replies.values()])
    missing = len(cids) - len(replies)
    summary = f"sent {len(cids)}, answered {len(replies)}, errors {n_err}, missing {missing}"
    if lat.size:
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        summary += f"; latency ms p50 {p50:.0f} p95 {p95:.0f} p99 {p99:.0f}"
    print(f"{summary}; wrote {args.output}")
    if undelivered:
        print(f"error: {len(undelivered)} of {len(cids)} queries were not accepted by the broker: "
              f"{next(iter(undelivered.values()))}", file=sys.stderr)
    if missing:
        print(f"error: {missing} of {len(cids)} queries got no reply within {args.timeout:g} s", file=sys.stderr)
        return FAILURE_EXIT
    return 0


def load_sample(path: Path, *, row: int | None = None, record_id: str | None = None, start_s: float = 0.0,
                lead: str | None = None) -> tuple[str, npt.NDArray[np.float32]]:
    """One query signal from .npy, .csv, Parquet (corpus layout) or a WFDB record; returns (label, sample)."""
    suffix = path.suffix.lower()
    if suffix in (".hea", ".dat") or (not suffix and path.with_suffix(".hea").exists()):
        from batch_index.corpus.wfdb import IngestConfig, windows_from_record

        lead_arg: str | int | None = int(lead) if lead is not None and lead.isdigit() else lead
        wids, _, windows = windows_from_record(path, IngestConfig(stride_s=1.0, lead=lead_arg))
        i = round(start_s)
        if not 0 <= i < len(windows):
            raise InvalidInputError(f"--start-s {start_s:g} is outside the record ({len(windows)} windows of "
                                    "10 s at 1 s steps)")
        return wids[i], windows[i]
    if not path.exists():
        raise InvalidInputError(f"input {str(path)!r} does not exist")
    if suffix == ".parquet":
        from batch_index.corpus.files import read_corpus

        ids, signals, _ = read_corpus(path)
        if record_id is not None:
            if record_id not in ids:
                raise InvalidInputError(f"no row with id {record_id!r} in {str(path)!r}")
            row = ids.index(record_id)
        i = row or 0
        if not 0 <= i < len(ids):
            raise InvalidInputError(f"--row {i} is outside {str(path)!r} ({len(ids)} rows)")
        return ids[i], signals[i]
    if suffix == ".npy":
        data = np.load(path, allow_pickle=False)
    elif suffix in (".csv", ".txt"):
        try:
            data = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as e:
            raise InvalidInputError(f"cannot read numbers from {str(path)!r}: {e}") from e
        data = data.ravel() if 1 in data.shape else data
    else:
        raise InvalidInputError(f"unsupported input {str(path)!r}: expected .npy, .csv, .parquet or a WFDB .hea")
    if data.ndim == 2:
        i = row or 0
        if not 0 <= i < data.shape[0]:
            raise InvalidInputError(f"--row {i} is outside {str(path)!r} ({data.shape[0]} rows)")
        return f"{path.name}[{i}]", data[i].astype(np.float32)
    if data.ndim != 1:
        raise InvalidInputError(f"{str(path)!r} holds an array of shape {data.shape}; expected 1-D or 2-D")
    return path.name, data.astype(np.float32)


def cmd_send_one(args: argparse.Namespace) -> int:
    from streaming.client import StreamClient

    label, sample = load_sample(args.input, row=args.row, record_id=args.record_id, start_s=args.start_s,
                                lead=args.lead)
    with StreamClient(args.bootstrap, args.queries_topic, args.replies_topic, dict(args.kafka_option),
                      timeout=min(15.0, args.timeout)) as client:
        cid = client.send(sample, args.metric, k=args.k, mode=args.mode, threshold=args.threshold)
        reply = client.collect([cid], args.timeout).get(cid)
    if reply is None:
        print(f"error: no reply within {args.timeout:g} s (is `python -m streaming serve` running?)",
              file=sys.stderr)
        return FAILURE_EXIT
    res = reply.result
    print(f"query {label} ({sample.size} samples)  {args.metric}/{args.mode} k={args.k}  "
          f"index {res.index_version}  {reply.latency_ms:.0f} ms")
    if not res.ok:
        print(f"error {res.error_code}: {res.error_message}", file=sys.stderr)
        return FAILURE_EXIT
    print(f"{'rank':>4}  {'id':<32} {'score':>12}")
    for mid, score, rank in res.matches:
        print(f"{rank:>4}  {mid:<32} {score:>12.6f}")
    if args.plot:
        plot_matches(args.plot, label, sample, res.matches, args.plot_index, metric=args.metric)
        print(f"plot saved to {args.plot}")
    return 0


def plot_matches(out: Path, label: str, sample: npt.NDArray[np.float32],
                 matches: Sequence[tuple[str, float, int]], index_dir: Path | None, top: int = 3,
                 metric: str | None = None) -> None:
    """Query on top, its best matches below (signals from ``index_dir`` when given).

    Under ``shape`` each match is drawn over the query, both z-normalised, shifted by the lag that
    maximised their cross-correlation (what the score compares), not at the offset it was cut at.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InvalidInputError("--plot needs matplotlib: pip install 'ecg-similarity[plot]'") from e
    signals: dict[str, npt.NDArray[np.float32]] = {}
    lags: dict[str, int] = {}
    if index_dir is not None:
        from batch_index.search import SearchIndex

        idx = SearchIndex.load(index_dir, verify=False)
        pos = {str(i): n for n, i in enumerate(idx.ids)}
        for mid, _, _ in matches[:top]:
            if mid in pos:
                signals[mid] = np.asarray(idx._rows(np.array([pos[mid]]))[0])
        if metric == "shape" and signals:
            from batch_index.engine.shape import shape_scores

            _, best = shape_scores(sample, np.stack(list(signals.values())), idx.shape_max_lag or 0)
            lags = dict(zip(signals, (int(b) for b in best)))
    shown = [m for m in matches[:top] if m[0] in signals] if signals else []
    fig, axes = plt.subplots(1 + len(shown), 1, figsize=(12, 2.2 * (1 + len(shown))), sharex=True, squeeze=False)
    axes[0, 0].plot(sample, lw=0.8, color="black")
    axes[0, 0].set_title(f"query {label}")
    for ax, (mid, score, rank) in zip(axes[1:, 0], shown):
        if mid in lags:
            from batch_index.engine.shape import znormalise

            t = np.arange(sample.size)
            ax.plot(t, znormalise(sample)[0], lw=0.8, color="black", alpha=0.45, label="query")
            ax.plot(t + lags[mid], znormalise(signals[mid])[0], lw=0.8, label=f"match shifted {lags[mid]:+d}")
            ax.legend(loc="upper right", fontsize=7)
            ax.set_title(f"#{rank} {mid}  score {score:.4f}  best lag {lags[mid]:+d} samples (z-normalised)")
            continue
        ax.plot(signals[mid], lw=0.8)
        ax.set_title(f"#{rank} {mid}  score {score:.4f}")
    axes[-1, 0].set_xlabel("sample")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from batch_index.build.shards import build_index
    from batch_index.corpus.synthetic import SynthConfig, generate
    from streaming.admin import create_topics
    from streaming.broker import EmbeddedBroker
    from streaming.client import StreamClient
    from streaming.config import ServeConfig
    from streaming.job import spark_session, start_query, stop_gracefully

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ecg-demo-"))
    print(f"workdir {work}")
    ids, _, signals = generate(0, args.size, SynthConfig(seed=0))
    build_index(list(ids), signals, work / "index" / "v1", sampling_rate=250.0, overwrite=True)
    (work / "index" / "CURRENT").write_text("v1\n")
    print(f"indexed {args.size} synthetic ECG windows of {signals.shape[1]} samples")
    with EmbeddedBroker() as broker:
        cfg = ServeConfig(bootstrap=broker.bootstrap, index=str(work / "index"), checkpoint=str(work / "checkpoint"))
        create_topics(cfg.bootstrap, [cfg.queries_topic, cfg.replies_topic, cfg.dead_letter_topic])
        print(f"broker {broker.bootstrap}; starting Spark (about 10-30 s to the first reply)...", flush=True)
        spark = spark_session(master=cfg.master)
        query = start_query(spark, cfg)
        try:
            rng = np.random.default_rng(1)
            with StreamClient(cfg.bootstrap, cfg.queries_topic, cfg.replies_topic) as client:
                t0 = time.monotonic()  # a first query, answered once Spark is up: the table shows latency alone
                warm = client.send(signals[0], "cosine", k=1, mode="exact")
                if warm not in client.collect([warm], 180):
                    print("error: the streaming job did not answer within 180 s", file=sys.stderr)
                    return FAILURE_EXIT
                print(f"first reply after {time.monotonic() - t0:.1f} s (Spark start-up); now one query per "
                      "mode and metric:")
                sent = {}
                for mode in MODES:
                    for metric in DEFAULT_METRICS:
                        row = int(rng.integers(args.size))
                        noisy = signals[row] + rng.normal(0, 0.05, signals.shape[1]).astype(np.float32)
                        sent[client.send(noisy, metric, k=args.k, mode=mode)] = (mode, metric, ids[row])
                replies = client.collect(sent, 120)
        finally:
            stop_gracefully(query)
            spark.stop()
    print(f"{'mode':<10}{'metric':<11}{'query of':<16}{'ms':>6}  top {args.k}")
    for cid, (mode, metric, source) in sent.items():
        reply = replies.get(cid)
        if reply is None:
            print(f"{mode:<10}{metric:<11}{source:<16}  no reply")
            continue
        res = reply.result
        top = ", ".join(f"{m[0]} {m[1]:.3f}" for m in res.matches) if res.ok else f"{res.error_code}"
        print(f"{mode:<10}{metric:<11}{source:<16}{reply.latency_ms:>6.0f}  {top}")
    print(f"{len(replies)}/{len(sent)} answered; stopped cleanly")
    return 0 if len(replies) == len(sent) else 1


def cmd_tail(args: argparse.Namespace) -> int:
    from streaming.client import tail

    for key, res in tail(args.bootstrap, args.replies_topic, from_beginning=args.from_beginning,
                         client_config=dict(args.kafka_option), idle_timeout=args.idle_timeout):
        if isinstance(res, Exception):
            print(f"{key!r}: undecodable reply: {res}")
        elif res.ok:
            top = ", ".join(f"{m[0]}={m[1]:.4f}" for m in res.matches[:3])
            print(f"{res.correlation_id}  ok  {res.metric}/{res.mode}  {len(res.matches)} matches  [{top}]  "
                  f"index {res.index_version}", flush=True)
        else:
            print(f"{res.correlation_id}  {res.error_code}  {res.error_message}", flush=True)
    return 0


FAILURE_EXIT = 1  # documented: any error of ours ends a command with 1 (argparse's usage errors exit 2)
COMMANDS = {"serve": cmd_serve, "send": cmd_send, "send-one": cmd_send_one, "tail": cmd_tail, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "demo" and not args.bootstrap:
        parser.error(f"--bootstrap is required (or set {ENV_BOOTSTRAP})")
    if args.command == "serve" and not args.index:
        parser.error(f"--index is required (or set {ENV_INDEX})")
    if getattr(args, "k", 1) < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("ECG_LOG_LEVEL", args.log_level)  # Spark's Python workers log at the same level
    for noisy in ("py4j", "py4j.clientserver", "py4j.java_gateway"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return 0
    except Exception as e:  # ours, raised here or carried back from a Spark executor: one clean line
        error = ours(e)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return FAILURE_EXIT
