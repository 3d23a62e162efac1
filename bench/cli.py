"""``python -m bench``: recall (study 1), scaling (2), e2e (3), distributed (4), first-search (5), exact (6),
shape (7), routing (8), ucr; ``report`` re-renders study 1.

Results go to ``bench/results/<study>/`` (``--out``); corpora, indexes and other large intermediates to
``--workdir`` (env ``ECG_BENCH_WORKDIR``), which is never committed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from batch_index.engine.metrics import DEFAULT_METRICS, parse_metrics
from batch_index.errors import EcgSearchError
from batch_index.search import MODES
from bench.measure import REPO

logger = logging.getLogger("bench")

ENV_WORKDIR = "ECG_BENCH_WORKDIR"
ENV_WFDB_DIR = "ECG_WFDB_DIR"
RESULTS = REPO / "bench" / "results"


def _ints(text: str, least: int = 1) -> tuple[int, ...]:
    try:
        v = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not v or min(v) < least:
        raise argparse.ArgumentTypeError(f"expected integers >= {least}, got {text!r}")
    return v


def _ints_or_zero(text: str) -> tuple[int, ...]:
    return _ints(text, least=0)


def _sizes(text: str) -> tuple[int, ...]:
    """Corpus sizes such as ``1e4,1e5`` or ``10000,100000``."""
    try:
        return _ints(",".join(str(int(float(t))) for t in text.split(",") if t.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1e4,1e5; got {text!r}") from None


def _cells(text: str) -> tuple[tuple[int, str], ...]:
    out = []
    for part in text.split(","):
        threads, _, style = part.partition(":")
        if not threads.isdigit() or int(threads) < 1 or style not in ("single", "batch"):
            raise argparse.ArgumentTypeError(f"cells look like 1:single,2:batch; got {part!r}")
        out.append((int(threads), style))
    return tuple(out)


def _common(p: argparse.ArgumentParser, study: str) -> None:
    p.add_argument("--out", type=Path, default=RESULTS / study, help="results folder (default %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get(ENV_WORKDIR, "/tmp/ecg-bench")),
                   help=f"scratch folder for corpora and indexes (env {ENV_WORKDIR}; default %(default)s)")
    p.add_argument("--seed", type=int, default=0)


def _wfdb_flag(p: argparse.ArgumentParser) -> None:
    default = Path(os.environ.get(ENV_WFDB_DIR, REPO.parent / "shared/data/wfdb"))
    p.add_argument("--wfdb-dir", type=Path, default=default,
                   help=f"real records (env {ENV_WFDB_DIR}; default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from bench.recall import RecallConfig
    from bench.systems import PEERS, Sweep

    rc, sw = RecallConfig(), Sweep()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="study", required=True)

    r = sub.add_parser("recall", help="study 1: recall@k vs queries/s against numpy and FAISS")
    _common(r, "recall")
    r.add_argument("--n", type=int, default=rc.n, help="synthetic corpus size (default %(default)s)")
    r.add_argument("--queries", type=int, default=rc.n_queries, help="queries per query set (default %(default)s)")
    r.add_argument("--datasets", default=",".join(rc.datasets), help="synthetic,real (default %(default)s)")
    r.add_argument("--metrics", default=",".join(rc.metrics))
    r.add_argument("--ef", type=_ints, default=sw.ef, help="hkmeans ef sweep")
    r.add_argument("--hk-rerank", type=_ints_or_zero, default=sw.hk_rerank,
                   help="hkmeans re-rank sweep per ef: 0 = ef itself, values >= ef are skipped")
    r.add_argument("--n-probe", type=_ints, default=sw.n_probe, help="hkmeans n_probe sweep")
    r.add_argument("--rerank", type=_ints, default=sw.rerank, help="transform rerank sweep")
    r.add_argument("--ivf-nprobe", type=_ints, default=sw.ivf_nprobe)
    r.add_argument("--ivf-nlist", type=int, default=sw.ivf_nlist, help="0: round(sqrt(n))")
    r.add_argument("--hnsw-ef", type=_ints, default=sw.hnsw_ef, help="FAISS HNSW efSearch sweep")
    r.add_argument("--hnsw-m", type=int, default=sw.hnsw_m)
    r.add_argument("--hnsw-ef-construction", type=int, default=sw.hnsw_ef_construction)
    r.add_argument("--no-faiss", action="store_true", help="skip FAISS (e.g. when faiss-cpu is not installed)")
    r.add_argument("--reuse-index", action="store_true",
                   help="search our index an earlier run left in --workdir instead of building it again")
    r.add_argument("--peers", default=",".join(PEERS),
                   help="peer systems (bench.peers) to build, comma-separated, '' for none (default %(default)s)")
    r.add_argument("--cells", type=_cells, default=rc.cells,
                   help="timed (threads:style) cells; the first is the primary (default 1:single,1:batch,2:batch)")
    r.add_argument("--repeats", type=int, default=rc.repeats, help="timed rounds; medians reported")
    r.add_argument("--min-time", type=float, default=rc.min_time, help="seconds per timed pass (default %(default)s)")
    r.add_argument("--target", type=float, default=rc.target, help="recall target (default %(default)s)")
    r.add_argument("--margin", type=float, default=rc.margin,
                   help="recommended defaults reach target + margin (default %(default)s)")
    r.add_argument("--stride", type=float, default=rc.stride_s, help="real-record window stride in s")
    _wfdb_flag(r)

    s = sub.add_parser("scaling", help="study 2: build time, peak memory, query time at fixed recall vs N")
    _common(s, "scaling")
    s.add_argument("--sizes", type=_sizes, default=(10_000, 100_000), help="corpus sizes (default 1e4,1e5)")
    s.add_argument("--queries", type=int, default=100)
    s.add_argument("--metrics", default="cosine,euclidean,manhattan,dot")
    s.add_argument("--ef", type=_ints, default=(16, 32, 64, 128, 256, 512, 1024), help="ef ladder, ascending")
    s.add_argument("--n-probe", type=int, default=1, help="hkmeans n_probe (default %(default)s)")
    s.add_argument("--target", type=float, default=0.95)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--engine", choices=("local", "spark"), default="local",
                   help="local: build_index in one process from .npy; spark: generate and build with the "
                        "batch_index CLI (Parquet corpus, default shards), as a user would (default %(default)s)")
    s.add_argument("--reuse-builds", action="store_true",
                   help="keep indexes (and their build measurements) from an earlier run of this study")

    rt = sub.add_parser("routing", help="study 8: recall and time vs shards probed on a content-partitioned index")
    _common(rt, "routing")
    rt.set_defaults(seed=3)  # another corpus than the defaults were chosen on
    rt.add_argument("--n", type=int, default=40_000, help="corpus size (default %(default)s)")
    rt.add_argument("--shards", type=int, default=8, help="shards built (default %(default)s)")
    rt.add_argument("--cells-per-shard", type=int, default=None, help="k-means cells per shard (default: the build's)")
    rt.add_argument("--queries", type=int, default=200)
    rt.add_argument("--growth", default="", help="comma-separated corpus sizes: instead, how the shards probed "
                    "for recall@10 >= 0.95 grow with the shard count at a fixed shard size (GROWTH.md)")
    rt.add_argument("--shard-rows", type=int, default=5_000, help="shard size of --growth (default %(default)s)")

    d = sub.add_parser("distributed", help="study 4: Spark build with local[1] vs local[2]")
    _common(d, "distributed")
    d.add_argument("--n", type=int, default=20_000, help="corpus size (default %(default)s)")
    d.add_argument("--masters", default="local[1],local[2]")
    d.add_argument("--partitions", type=int, default=4, help="shards, the same for every master")
    d.add_argument("--repeats", type=int, default=2)

    f = sub.add_parser("first-search", help="study 5: first search after install vs the next, with/without warm")
    _common(f, "first-search")
    f.add_argument("--metric", default="cosine")
    f.add_argument("--mode", default="hkmeans", choices=MODES)
    f.add_argument("--repeats", type=int, default=1)
    _wfdb_flag(f)

    x = sub.add_parser("exact", help="study 6: exact mode (lower-bound pruning) vs brute force, 1 thread")
    _common(x, "exact")
    x.add_argument("--n", type=int, default=100_000, help="synthetic corpus size (default %(default)s)")
    x.add_argument("--queries", type=int, default=20, help="queries per query set (default %(default)s)")
    x.add_argument("--datasets", default="synthetic,real", help="synthetic,real (default %(default)s)")
    x.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    x.add_argument("--reuse-index", action="store_true",
                   help="search the index an earlier run left in --workdir instead of building it again")
    _wfdb_flag(x)

    sh = sub.add_parser("shape", help="study 7: shape metrics: shifted copies, recall vs q/s, build cost")
    _common(sh, "shape")
    sh.add_argument("--n", type=_size, default=100_000, help="synthetic corpus size (default %(default)s)")
    sh.add_argument("--queries", type=int, default=100, help="queries per query set (default %(default)s)")
    sh.add_argument("--ef", type=_ints, default=(128, 256, 512), help="hkmeans ef sweep")
    sh.add_argument("--rerank", type=_ints, default=(64, 128, 256), help="hkmeans re-rank sweep")
    _wfdb_flag(sh)
    u = sub.add_parser("ucr", help="1-NN error of euclidean, zeuclidean and shape on UCR ECG sets (TSV layout)")
    u.add_argument("--ucr-dir", type=Path, required=True, help="folder holding <Name>/<Name>_TRAIN.tsv and _TEST.tsv")
    u.add_argument("--datasets", default="ECG200,ECG5000,ECGFiveDays,TwoLeadECG")
    u.add_argument("--max-lag-fraction", type=float, default=None,
                   help="shape lag bound as a fraction of the series length (default: the index default, 0.15)")
    u.add_argument("--out", type=Path, default=RESULTS / "shape", help="results folder (default %(default)s)")
    rp = sub.add_parser("report", help="re-render study 1's README and plots from its results.csv and meta.json")
    rp.add_argument("--out", type=Path, default=RESULTS / "recall", help="study 1 results folder")

    e = sub.add_parser("e2e", help="study 3: end to end through Kafka and Spark (latency, burst, throughput)")
    _common(e, "e2e")
    e.add_argument("--n", type=_size, default=100_000, help="index size (default %(default)s)")
    e.add_argument("--index", type=Path, default=None,
                   help="index to serve (default: the scaling study's Spark-built index of --n, built if missing)")
    e.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP"),
                   help="broker HOST:PORT (env KAFKA_BOOTSTRAP; default: an embedded Tansu)")
    e.add_argument("--metric", default="cosine")
    e.add_argument("--mode", default="hkmeans", help="mode of the rate and burst phases (default %(default)s)")
    e.add_argument("--rates", type=lambda t: tuple(float(v) for v in t.split(",")), default=(10.0, 100.0),
                   help="steady rates, queries/s (default 10,100)")
    e.add_argument("--rate-seconds", type=float, default=30.0)
    e.add_argument("--burst", type=int, default=1000)
    e.add_argument("--bursts", type=int, default=3, help="times the burst is sent, 2 s apart (default %(default)s)")
    e.add_argument("--sustained", type=_mode_counts, default=(("hkmeans", 4000), ("transform", 4000), ("exact", 400)),
                   help="MODE:QUERIES,... drained as a backlog (default hkmeans:4000,transform:4000,exact:400)")
    e.add_argument("--sustained-metrics", type=lambda t: tuple(m for m in t.split(",") if m),
                   default=("euclidean", "manhattan", "dot"),
                   help="hkmeans backlogs in these metrics too (default euclidean,manhattan,dot; '' for none)")
    e.add_argument("--master", default="local[2]")
    e.add_argument("--serve-arg", action="append", default=[], help="extra `streaming serve` flag, repeatable "
                   "(e.g. --serve-arg=--executor-min-batch=0)")
    return parser


def _size(text: str) -> int:
    """One corpus size such as ``1e5``."""
    sizes = _sizes(text)
    if len(sizes) != 1:
        raise argparse.ArgumentTypeError(f"expected one size like 1e5; got {text!r}")
    return sizes[0]


def _mode_counts(text: str) -> tuple[tuple[str, int], ...]:
    out = []
    for part in text.split(","):
        mode, _, n = part.partition(":")
        if mode not in MODES or not n.isdigit():
            raise argparse.ArgumentTypeError(f"expected MODE:QUERIES with MODE exact|transform|hkmeans, got {part!r}")
        out.append((mode, int(n)))
    return tuple(out)


def _command(argv: Sequence[str]) -> str:
    return "python -m bench " + " ".join(shlex.quote(a) for a in argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.study == "recall":
            return _recall(args, parser, argv)
        if args.study == "scaling":
            from bench import scaling

            scaling.run(scaling.ScalingConfig(
                sizes=args.sizes, n_queries=args.queries, metrics=parse_metrics(args.metrics), efs=args.ef,
                n_probe=args.n_probe, target=args.target, repeats=args.repeats, engine=args.engine,
                reuse_builds=args.reuse_builds, seed=args.seed,
                workdir=args.workdir, out=args.out),
                _command(argv))
            return 0
        if args.study == "routing":
            from bench import routing

            rcfg = routing.RoutingConfig(n=args.n, shards=args.shards, n_queries=args.queries, seed=args.seed,
                                         workdir=args.workdir, out=args.out)
            if args.cells_per_shard:
                rcfg = routing.replace(rcfg, cells_per_shard=args.cells_per_shard)
            if args.growth:
                rcfg = routing.replace(rcfg, growth_sizes=tuple(int(float(v)) for v in args.growth.split(",")),
                                       shard_rows=args.shard_rows)
                routing.run_growth(rcfg, _command(argv))
            else:
                routing.run(rcfg, _command(argv))
            return 0
        if args.study == "distributed":
            from bench import distributed

            distributed.run(distributed.DistributedConfig(
                n=args.n, masters=tuple(args.masters.split(",")), partitions=args.partitions, repeats=args.repeats,
                seed=args.seed, workdir=args.workdir, out=args.out), _command(argv))
            return 0
        if args.study == "first-search":
            from bench import first_search

            path = first_search.run(first_search.FirstSearchConfig(
                wfdb_dir=args.wfdb_dir, metric=args.metric, mode=args.mode, repeats=args.repeats,
                workdir=args.workdir, out=args.out), _command(argv))
            print(f"study 5 report: {path}")
            return 0
        if args.study == "exact":
            from bench import exact_study

            path = exact_study.run(exact_study.ExactConfig(
                wfdb_dir=args.wfdb_dir, n=args.n, n_queries=args.queries,
                datasets=tuple(t for t in args.datasets.split(",") if t), metrics=parse_metrics(args.metrics),
                reuse_index=args.reuse_index, seed=args.seed, workdir=args.workdir, out=args.out), _command(argv))
            print(f"study 6 report: {path}")
            return 0
        if args.study == "shape":
            from bench import shape

            cfg = shape.ShapeConfig(n=args.n, n_queries=args.queries, efs=args.ef, reranks=args.rerank,
                                    wfdb_dir=args.wfdb_dir, seed=args.seed, workdir=args.workdir, out=args.out)
            print(f"study 7 report: {shape.run(cfg, _command(argv))}")
            return 0
        if args.study == "ucr":
            from bench import shape

            names = tuple(t.strip() for t in args.datasets.split(",") if t.strip())
            if not args.ucr_dir.is_dir():
                parser.error(f"--ucr-dir {args.ucr_dir} is not a folder")
            print(f"UCR report: {shape.run_ucr(args.ucr_dir, names, args.out, _command(argv), args.max_lag_fraction)}")
            return 0
        if args.study == "report":
            from bench.report import rerender_recall

            print(f"study 1 report: {rerender_recall(args.out)}")
            return 0
        from bench import e2e

        e2e.run(e2e.E2EConfig(
            n=args.n, metric=args.metric, mode=args.mode, rates=args.rates, rate_seconds=args.rate_seconds,
            burst=args.burst, bursts=args.bursts, sustained=args.sustained, sustained_metrics=args.sustained_metrics,
            master=args.master, serve_args=tuple(args.serve_arg),
            index=args.index, bootstrap=args.bootstrap, seed=args.seed, workdir=args.workdir, out=args.out),
            _command(argv))
        return 0
    except EcgSearchError as e:
        logger.error("%s", e)
        return 1


def _recall(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    from bench.recall import RecallConfig, run
    from bench.systems import Sweep

    kinds = tuple(t for t in args.datasets.split(",") if t)
    if not kinds or set(kinds) - {"synthetic", "real"}:
        parser.error(f"--datasets takes synthetic and/or real, got {args.datasets!r}")
    if "real" in kinds and not (args.wfdb_dir / "100.hea").is_file():
        parser.error(f"real records not found in {args.wfdb_dir} (set --wfdb-dir or {ENV_WFDB_DIR})")
    if args.n < 100 or args.queries < 1 or args.repeats < 1:
        parser.error("need --n >= 100, --queries >= 1, --repeats >= 1")
    from bench.systems import PEERS as KNOWN_PEERS

    peers = tuple(p for p in args.peers.split(",") if p)
    if set(peers) - set(KNOWN_PEERS):
        parser.error(f"--peers takes {','.join(KNOWN_PEERS)}; got {args.peers!r}")
    sweep = Sweep(ef=args.ef, n_probe=args.n_probe, hk_rerank=args.hk_rerank, rerank=args.rerank,
                  ivf_nprobe=args.ivf_nprobe,
                  ivf_nlist=args.ivf_nlist, hnsw_ef=args.hnsw_ef, hnsw_m=args.hnsw_m,
                  hnsw_ef_construction=args.hnsw_ef_construction)
    cfg = RecallConfig(n=args.n, n_queries=args.queries, datasets=kinds, metrics=parse_metrics(args.metrics),
                       sweep=sweep, cells=args.cells, repeats=args.repeats, min_time=args.min_time,
                       target=args.target, margin=args.margin, faiss=not args.no_faiss, peers=peers,
                       reuse_index=args.reuse_index, seed=args.seed,
                       stride_s=args.stride, wfdb_dir=args.wfdb_dir, workdir=args.workdir, out=args.out)
    path = run(cfg, _command(argv))
    print(f"study 1 report: {path}")
    return 0
