"""``python -m batch_index``: generate, ingest, build, search, inspect, warm.

Flags mirror the config dataclasses (``SynthConfig``, ``IngestConfig``, ``BuildConfig``,
``SearchParams``); deployment settings also read environment variables, shown in ``--help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch_index.build.shards import SHARD_ROWS, BuildConfig
from batch_index.engine.metrics import DEFAULT_METRICS, METRICS
from batch_index.errors import InvalidInputError, ours
from batch_index.search import DEFAULT_PARAMS, MODES, SearchParams

logger = logging.getLogger("batch_index")

ENV_MASTER = "ECG_SPARK_MASTER"
ENV_DRIVER_MEMORY = "ECG_SPARK_DRIVER_MEMORY"
LOCAL_SEARCH_MAX_QUERIES = 20_000
_BUILD_DEFAULTS = BuildConfig()
_SEARCH_DEFAULTS = SearchParams()


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _spark_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--master", default=_env(ENV_MASTER, "local[2]"),
                   help=f"Spark master URL (env {ENV_MASTER}; default %(default)s)")
    p.add_argument("--driver-memory", default=_env(ENV_DRIVER_MEMORY, "4g"),
                   help=f"Spark driver memory (env {ENV_DRIVER_MEMORY}; default %(default)s)")
    p.add_argument("--partitions", type=int, default=None,
                   help="Spark partitions (= index shards for build); default: from the input")


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type for integers >= ``low``; the message names what was expected."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _per_metric(field: str) -> str:
    return ", ".join(f"{m} {getattr(p, field)}" for m, p in DEFAULT_PARAMS.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m batch_index", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write a synthetic ECG corpus (Parquet: id, label, signal)")
    g.add_argument("--output", required=True, help="Parquet output (a directory when --engine spark)")
    g.add_argument("--n", type=_positive_int, default=10_000, help="number of windows (default %(default)s)")
    g.add_argument("--start", type=int, default=0, help="first row number; rows are deterministic per (seed, row)")
    g.add_argument("--sampling-rate", type=float, default=250.0, help="Hz (default %(default)s)")
    g.add_argument("--duration", type=float, default=10.0, help="seconds per window (default %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--noise-scale", type=float, default=1.0)
    g.add_argument("--engine", choices=("auto", "local", "spark"), default="auto",
                   help="auto: Spark above 50,000 rows, else one file written locally")
    _spark_flags(g)

    i = sub.add_parser("ingest", help="cut WFDB records into windows (Parquet: id, label, signal)")
    i.add_argument("--records", nargs="+", required=True, help="record paths without extension (e.g. data/100)")
    i.add_argument("--output", required=True)
    i.add_argument("--window", type=float, default=10.0, help="window length in s (default %(default)s)")
    i.add_argument("--stride", type=float, default=10.0, help="s between window starts (default %(default)s)")
    i.add_argument("--sampling-rate", type=float, default=250.0, help="target Hz (default %(default)s)")
    i.add_argument("--lead", default=None, help="lead name or 0-based index (default: first lead)")

    b = sub.add_parser("build", help="build an index directory from a Parquet corpus with Spark")
    b.add_argument("--input", required=True, help="corpus Parquet file or directory (columns id, signal)")
    b.add_argument("--output", required=True, help="index directory to create")
    b.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated, of {','.join(METRICS)} (default: the four raw-sample metrics, "
                        "%(default)s)")
    b.add_argument("--n-references", type=_positive_int, default=_BUILD_DEFAULTS.n_references,
                   help="real reference signals (default %(default)s)")
    b.add_argument("--reference-method", choices=("sample", "kmeans", "farthest"),
                   default=_BUILD_DEFAULTS.reference_method, help="how references are picked (default %(default)s)")
    b.add_argument("--reference-sample", type=_positive_int, default=_BUILD_DEFAULTS.reference_sample,
                   help="rows sampled to the driver to pick references from (default %(default)s)")
    b.add_argument("--basis-rank", type=_positive_int, default=_BUILD_DEFAULTS.basis_rank,
                   help="reference-space dimensions kept (default %(default)s)")
    b.add_argument("--branching", type=_positive_int, default=_BUILD_DEFAULTS.branching)
    b.add_argument("--leaf-size", type=_positive_int, default=_BUILD_DEFAULTS.leaf_size)
    b.add_argument("--max-depth", type=_positive_int, default=_BUILD_DEFAULTS.max_depth)
    b.add_argument("--kmeans", choices=("minibatch", "lloyd"), default=_BUILD_DEFAULTS.kmeans)
    b.add_argument("--graph-degree", type=_positive_int, default=_BUILD_DEFAULTS.graph_degree,
                   help="neighbours per signal in the reference-space graph (default %(default)s)")
    b.add_argument("--graph-cluster-size", type=_positive_int, default=_BUILD_DEFAULTS.graph_cluster_size,
                   help="graph neighbours are exact within k-means clusters of about this many signals; "
                        "build time grows linearly with it (default %(default)s)")
    b.add_argument("--l1-blocks", type=_non_negative_int, default=_BUILD_DEFAULTS.l1_blocks,
                   help="block sums kept per signal to order manhattan candidates (a lower bound of L1); "
                        "0 = none (default %(default)s; only written when the index serves manhattan)")
    b.add_argument("--shape-max-lag", type=_non_negative_int, default=None,
                   help="shape: largest shift compared, in samples (default: 15%% of the signal length, "
                        "375 = 1.5 s of a 10-s window at 250 Hz)")
    b.add_argument("--shape-bins", type=_positive_int, default=_BUILD_DEFAULTS.shape_bins,
                   help="shape: spectrum magnitudes kept as features, the rest summed into one "
                        "(default %(default)s: 44 Hz of a 10-s window at 250 Hz)")
    b.add_argument("--shape-rank", type=_positive_int, default=_BUILD_DEFAULTS.shape_rank,
                   help="shape: PCA dimensions of the features the graph is walked in (default %(default)s)")
    b.add_argument("--partitioning", choices=("kmeans", "rows"), default=_BUILD_DEFAULTS.partitioning,
                   help="how a multi-shard build splits the corpus: kmeans by content (a query then searches "
                        "only its nearest shards, search --n-shards-probe) or rows in input order (default "
                        "%(default)s)")
    b.add_argument("--cells-per-shard", type=_positive_int, default=_BUILD_DEFAULTS.cells_per_shard,
                   help="kmeans partitioning: k-means cells per shard, what queries are routed by "
                        "(default %(default)s)")
    b.add_argument("--seed", type=int, default=_BUILD_DEFAULTS.seed)
    b.add_argument("--sampling-rate", type=float, default=None, help="Hz, recorded in the manifest")
    b.add_argument("--engine", choices=("spark", "local"), default="spark",
                   help="spark (default) or local: one process, for corpora that fit in memory")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    b.add_argument("--shard-rows", type=_positive_int, default=SHARD_ROWS,
                   help="without --partitions, the fewest shards of at most this many signals (default "
                        "%(default)s: ~1.3 GB of 2,500-sample signals per build task); every query walks every shard")
    _spark_flags(b)

    s = sub.add_parser("search", help="search every row of a Parquet query file")
    s.add_argument("--index", required=True)
    s.add_argument("--queries", required=True, help="Parquet with columns id, signal")
    s.add_argument("--metric", required=True, choices=METRICS)
    s.add_argument("--mode", default="hkmeans", choices=MODES)
    s.add_argument("--k", type=_positive_int, default=10)
    s.add_argument("--output", required=True, help="results Parquet: query_id, rank, id, score")
    s.add_argument("--threshold", type=float, default=None, help="drop matches scoring below this")
    s.add_argument("--n-probe", type=_positive_int, default=None,
                   help=f"hkmeans: tree leaves seeding the graph walk per shard (default {_SEARCH_DEFAULTS.n_probe})")
    s.add_argument("--ef", type=_positive_int, default=None,
                   help="hkmeans: points the graph walk keeps per shard (default: per metric, "
                        + _per_metric("ef") + ")")
    s.add_argument("--rerank", type=_positive_int, default=None,
                   help="candidates re-scored exactly on raw signals (default: per metric, "
                        + _per_metric("rerank") + ")")
    s.add_argument("--n-shards-probe", type=_non_negative_int, default=None,
                   help="hkmeans on a content-partitioned index: shards searched per query, the nearest "
                        "under the metric; 0 = every shard (default: per metric, " + _per_metric("n_shards_probe")
                        + ")")
    s.add_argument("--route", choices=("centroid", "representative"), default=None,
                   help=f"hkmeans: steer the tree by node centroid or representative signal "
                        f"(default {_SEARCH_DEFAULTS.route})")
    s.add_argument("--recall", action="store_true",
                   help="also run exact search on the same queries and report recall@k (slower)")
    s.add_argument("--engine", choices=("auto", "local", "spark"), default="auto",
                   help=f"auto: Spark above {LOCAL_SEARCH_MAX_QUERIES} queries, else in this process")
    s.add_argument("--by-shard", action="store_true",
                   help="spark: each task loads one shard and results are merged (indexes too big for one executor)")
    _spark_flags(s)

    n = sub.add_parser("inspect", help="verify an index and print its manifest summary")
    n.add_argument("--index", required=True)
    n.add_argument("--no-verify", action="store_true", help="skip checksum verification")

    sub.add_parser("warm", help="compile the search kernels into numba's cache (make setup runs it once), so "
                                "the first search does not pay ~20-30 s of compiling")
    return parser


def _spark(args: argparse.Namespace):
    from batch_index.build.spark_job import spark_session

    spark = spark_session(args.master, driver_memory=args.driver_memory)
    spark.sparkContext.setLogLevel("WARN")
    return spark


def cmd_generate(args: argparse.Namespace) -> int:
    from batch_index.corpus.synthetic import SynthConfig, generate

    cfg = SynthConfig(sampling_rate=args.sampling_rate, duration_s=args.duration, seed=args.seed,
                      noise_scale=args.noise_scale)
    if args.engine == "spark" or (args.engine == "auto" and args.n > 50_000):
        from batch_index.build import spark_job
        if args.start:
            raise InvalidInputError("--start is only supported with --engine local")
        spark_job.generate(_spark(args), args.output, args.n, cfg, args.partitions)
    else:
        from batch_index.corpus.files import write_corpus

        ids, labels, signals = generate(args.start, args.n, cfg)
        write_corpus(args.output, ids, signals, labels)
    logger.info("wrote %d synthetic windows of %d samples to %s", args.n, cfg.n_samples, args.output)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from batch_index.corpus.files import write_corpus
    from batch_index.corpus.wfdb import IngestConfig, ingest_records

    lead: str | int | None = args.lead
    if lead is not None and lead.isdigit():
        lead = int(lead)
    cfg = IngestConfig(window_s=args.window, stride_s=args.stride, target_rate=args.sampling_rate, lead=lead)
    ids, labels, signals = ingest_records(args.records, cfg)
    if not ids:
        raise InvalidInputError("no complete windows in the given records")
    write_corpus(args.output, ids, signals, labels)
    logger.info("wrote %d windows of %d samples to %s", len(ids), signals.shape[1], args.output)
    return 0


def build_config(args: argparse.Namespace) -> BuildConfig:
    return BuildConfig(metrics=args.metrics, n_references=args.n_references, reference_method=args.reference_method,
                       reference_sample=args.reference_sample, basis_rank=args.basis_rank,
                       branching=args.branching, leaf_size=args.leaf_size, max_depth=args.max_depth,
                       kmeans=args.kmeans, graph_degree=args.graph_degree,
                       graph_cluster_size=args.graph_cluster_size, l1_blocks=args.l1_blocks,
                       shape_max_lag=args.shape_max_lag, shape_bins=args.shape_bins, shape_rank=args.shape_rank,
                       partitioning=args.partitioning, cells_per_shard=args.cells_per_shard, seed=args.seed)


def cmd_build(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    t0 = time.monotonic()
    if args.engine == "local":
        from batch_index.build.shards import build_index
        from batch_index.corpus.files import read_corpus

        ids, signals, meta = read_corpus(args.input)
        labels = meta.column("label").to_pylist() if "label" in meta.column_names else None
        out = build_index(ids, signals, args.output, cfg, labels=labels, sampling_rate=args.sampling_rate,
                          n_shards=args.partitions or 1, overwrite=args.overwrite)
    else:
        from batch_index.build import spark_job
        out = spark_job.build(_spark(args), args.input, args.output, cfg, partitions=args.partitions,
                              shard_rows=args.shard_rows, sampling_rate=args.sampling_rate, overwrite=args.overwrite)
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    print(f"index {manifest['version']}: {manifest['count']} signals x {manifest['dim']} samples, "
          f"{len(manifest['shards'])} shard(s), metrics {','.join(manifest['metrics'])}, "
          f"built in {time.monotonic() - t0:.1f} s -> {out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from batch_index.corpus.files import read_corpus
    from batch_index.search import SearchIndex

    params = SearchParams.for_metric(args.metric, n_probe=args.n_probe, ef=args.ef, rerank=args.rerank,
                                     route=args.route, n_shards_probe=args.n_shards_probe)
    index = SearchIndex.load(args.index)
    index.check_metric(args.metric)
    n_queries = pq.ParquetFile(args.queries).metadata.num_rows if Path(args.queries).is_file() else None
    t0 = time.monotonic()
    big = n_queries is None or n_queries > LOCAL_SEARCH_MAX_QUERIES
    if args.engine == "spark" or args.by_shard or (args.engine == "auto" and big):
        from batch_index.build import spark_job
        table = spark_job.search(_spark(args), index, args.queries, args.metric, args.mode, args.k,
                                 args.threshold, params, args.partitions, by_shard=args.by_shard)
        ids = None
    else:
        from batch_index.build.spark_job import results_batch

        ids, q, _ = read_corpus(args.queries, expected_len=index.dim)
        matches = index.search(q, args.metric, args.mode, args.k, args.threshold, params)
        table = pa.Table.from_batches([results_batch(ids, matches)])
    elapsed = time.monotonic() - t0
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.output)
    nq = len(ids) if ids is not None else len(set(table.column("query_id").to_pylist()))
    print(f"{nq} queries, {table.num_rows} matches ({args.metric}, {args.mode}, k={args.k}) "
          f"in {elapsed:.2f} s ({nq / max(elapsed, 1e-9):.0f} queries/s) -> {args.output}")
    if args.recall:
        if ids is None:
            ids, q, _ = read_corpus(args.queries, expected_len=index.dim)
        print(f"recall@{args.k} against exact: {measure_recall(index, q, args.metric, args.mode, args.k, params):.4f}")
    return 0


def measure_recall(index, q: np.ndarray, metric: str, mode: str, k: int, params: SearchParams) -> float:
    """Mean fraction of the exact top-k that ``mode`` also returns (ann-benchmarks' recall@k)."""
    truth, _ = index.search_arrays(q, metric, "exact", k, params)
    got, _ = index.search_arrays(q, metric, mode, k, params)
    return float(np.mean([len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(got, truth)]))


def cmd_inspect(args: argparse.Namespace) -> int:
    from batch_index.index_files import read_manifest

    t0 = time.monotonic()
    m = read_manifest(Path(args.index), verify=not args.no_verify)
    size = sum((Path(args.index) / f).stat().st_size for f in m["files"])
    print(json.dumps({k: m[k] for k in ("version", "created", "metrics", "count", "dim", "sampling_rate",
                                        "n_references", "basis_rank", "params")}, indent=2))
    print(f"{len(m['shards'])} shard(s), {len(m['files'])} files, {size / 1e6:.1f} MB; "
          f"checksums {'verified' if not args.no_verify else 'not checked'} in {time.monotonic() - t0:.1f} s")
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    from batch_index.warmup import warm_kernels

    r = warm_kernels()
    print(f"search kernels compiled or loaded in {r.seconds:.1f} s; numba cache {r.cache_dir} "
          f"({r.cached_files} index files)")
    return 0


USER_ERROR_EXIT = 2  # documented: refused input, a missing or corrupt index (argparse's usage errors: 2 too)
_COMMANDS = {"generate": cmd_generate, "ingest": cmd_ingest, "build": cmd_build, "search": cmd_search,
             "inspect": cmd_inspect, "warm": cmd_warm}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        return _COMMANDS[args.command](args)
    except Exception as e:  # ours, raised here or carried back from a Spark executor: one clean line
        error = ours(e)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
