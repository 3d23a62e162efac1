"""The thin Spark layer: wires DataFrames to the pure-numpy steps in ``builder``, ``synth`` and ``search``.

Raw signals never reach the driver: generation runs in ``mapInArrow`` from row numbers, and the build
sends each partition's rows to an executor that writes its shard's files to the (shared) index
directory and returns only counts, checksums and its compact trees. The driver sees a sample for the
references and the small per-shard results.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch_index.build.shards import (
    SHARD_ROWS,
    BuildConfig,
    build_shard,
    finish_index,
    fit_transform,
    prepare_output,
    shape_max_lag,
)
from batch_index.corpus.files import ID_COL, LABEL_COL, SIGNAL_COL, signals_from_arrow
from batch_index.corpus.synthetic import SynthConfig, generate_record_batches
from batch_index.engine.partition import Partition, fit_partition
from batch_index.engine.transform import ReferenceTransform
from batch_index.errors import InvalidInputError
from batch_index.index_files import ShardInfo, shard_dir
from batch_index.search import SearchIndex, SearchParams

logger = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema([("query_id", pa.string()), ("rank", pa.int32()), ("id", pa.string()),
                           ("score", pa.float64())])


def spark_session(master: str = "local[2]", app_name: str = "ecg-similarity", driver_memory: str = "4g",
                  conf: Mapping[str, str] | None = None):
    """The SparkSession every job here uses (Arrow, Python worker reuse); ``conf`` adds or overrides."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors need this venv's packages
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if master.strip().startswith("local"):  # one machine: bind to loopback instead of warning that it did
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    log_config = Path(__file__).resolve().parents[1] / "log4j2.properties"  # quiet what is ours to quiet
    builder = (SparkSession.builder.master(master).appName(app_name)
               .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{log_config}")
               .config("spark.driver.memory", driver_memory)
               .config("spark.python.worker.reuse", "true")  # off: ~5 s per streaming batch (docs/kafka.md)
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", "1024")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "8"))
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


class Progress:
    """Logs stage progress (tasks done, ETA) every ``every`` seconds while a long job runs."""

    def __init__(self, spark, label: str, every: float = 10.0) -> None:
        self._sc, self._label, self._every = spark.sparkContext, label, every
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=1)
        logger.info("%s: done in %.1f s", self._label, time.monotonic() - self._t0)

    def _run(self) -> None:
        tracker = self._sc.statusTracker()
        while not self._stop.wait(self._every):
            for sid in tracker.getActiveStageIds():
                info = tracker.getStageInfo(sid)
                if info is None or not info.numTasks:
                    continue
                done, total = info.numCompletedTasks, info.numTasks
                elapsed = time.monotonic() - self._t0
                eta = f"ETA {elapsed / done * (total - done):.0f} s" if done else "ETA after the first task"
                logger.info("%s: stage %d %s: %d/%d tasks done, %d running, %.0f s elapsed, %s",
                            self._label, sid, info.name.split(" at ")[0], done, total, info.numActiveTasks,
                            elapsed, eta)


# ---- generate ---------------------------------------------------------------------------------------
def generate(spark, output: str | Path, n: int, cfg: SynthConfig, partitions: int | None = None) -> int:
    """Write ``n`` synthetic windows as Parquet, generated on executors from row numbers."""
    from batch_index.corpus.files import corpus_schema

    if n < 1:
        raise InvalidInputError(f"n must be >= 1, got {n}")
    parts = partitions or max(1, min(n // 2000 + 1, 4 * spark.sparkContext.defaultParallelism))

    def gen(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            rows = b.column(0).to_numpy()
            if rows.size:
                yield from generate_record_batches(int(rows.min()), int(rows.max()) + 1, cfg)

    ddl = "id string, label string, signal array<float>"
    assert corpus_schema(True).names == ["id", "label", "signal"]
    df = spark.range(0, n, numPartitions=parts).mapInArrow(gen, ddl)
    with Progress(spark, f"generate {n} signals"):
        df.write.mode("overwrite").parquet(str(output))
    return n


# ---- build ------------------------------------------------------------------------------------------
_SCAN_DDL = "kind string, id string, signal array<float>, info string"


def _scan_partition(dim: int, fraction: float, seed: int):
    """``mapInArrow`` adapter: check every row of a partition and draw a Bernoulli sample of the good ones.

    One pass over the signals does both the corpus checks and the reference sample (at 10^6 x 2,500
    the separate Spark SQL check and sample scans cost ~250 s). Yields the sampled rows, then one
    ``stats`` row: counts of rows, null ids, wrong lengths and non-finite signals, with an example id each.
    """

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        rng = np.random.default_rng([seed, TaskContext.get().partitionId()])
        stats: dict[str, Any] = {"rows": 0, "null_ids": 0, "bad_len": 0, "non_finite": 0}
        for b in batches:
            ids, sig = b.column(ID_COL), b.column(SIGNAL_COL)
            stats["rows"] += b.num_rows
            stats["null_ids"] += ids.null_count
            lengths = pc.fill_null(pc.list_value_length(sig), -1).to_numpy(zero_copy_only=False)
            ok = lengths == dim
            if not ok.all():
                stats["bad_len"] += int((~ok).sum())
                i = int(np.flatnonzero(~ok)[0])
                stats.setdefault("bad_len_example", [ids[i].as_py(), int(max(lengths[i], 0))])
            good = sig.filter(pa.array(ok)) if not ok.all() else sig
            rows = np.flatnonzero(ok)
            values = np.asarray(good.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
            finite = np.isfinite(values.reshape(len(rows), dim)).all(axis=1) if len(rows) else np.ones(0, bool)
            if not finite.all():
                stats["non_finite"] += int((~finite).sum())
                stats.setdefault("non_finite_example", ids[int(rows[np.flatnonzero(~finite)[0]])].as_py())
            picked = rows[finite & (rng.random(len(rows)) < fraction)]
            if picked.size:
                take = pa.array(picked)
                yield pa.RecordBatch.from_arrays(
                    [pa.array(["sample"] * picked.size), ids.take(take), sig.take(take),
                     pa.nulls(picked.size, pa.string())], names=["kind", "id", "signal", "info"])
        yield pa.RecordBatch.from_pylist([{"kind": "stats", "id": None, "signal": None, "info": json.dumps(stats)}],
                                         schema=pa.schema([("kind", pa.string()), ("id", pa.string()),
                                                           ("signal", pa.list_(pa.float32())),
                                                           ("info", pa.string())]))

    return run


def _check_corpus(df, path: str, sample_size: int = 0, seed: int = 0
                  ) -> tuple[int, int, np.ndarray]:
    """Distributed checks (columns, one signal length, no null/NaN/inf, unique ids) and a sample.

    Returns (signal length, rows, up to ``sample_size`` checked signals drawn at random).
    """
    from pyspark.sql import functions as F

    for col in (ID_COL, SIGNAL_COL):
        if col not in df.columns:
            raise InvalidInputError(f"{path!r} has no column {col!r}; found {df.columns} (expected id, signal)")
    first = df.select(F.size(SIGNAL_COL).alias("n")).where(F.col("n") > 0).limit(1).collect()
    if not first:
        raise InvalidInputError(f"{path!r} holds no rows with a non-empty signal")
    dim = int(first[0]["n"])
    ids = df.select(ID_COL).agg(F.count(F.lit(1)).alias("rows"), F.countDistinct(ID_COL).alias("distinct")).first()
    fraction = min(1.0, 1.2 * sample_size / max(1, ids["rows"]))
    scanned = df.select(ID_COL, SIGNAL_COL).mapInArrow(_scan_partition(dim, fraction, seed), _SCAN_DDL).toArrow()
    stats = [json.loads(v) for k, v in zip(scanned.column("kind").to_pylist(), scanned.column("info").to_pylist())
             if k == "stats"]
    total = {key: sum(s[key] for s in stats) for key in ("rows", "null_ids", "bad_len", "non_finite")}
    if total["null_ids"]:
        raise InvalidInputError(f"{path!r}: {total['null_ids']} row(s) have a null id")
    if total["bad_len"]:
        bad_id, bad_n = next(s["bad_len_example"] for s in stats if "bad_len_example" in s)
        raise InvalidInputError(f"{path!r}: {total['bad_len']} signal(s) do not have {dim} samples "
                                f"(e.g. id {bad_id!r} has {bad_n})")
    if total["non_finite"]:
        bad_id = next(s["non_finite_example"] for s in stats if "non_finite_example" in s)
        raise InvalidInputError(f"{path!r}: {total['non_finite']} signal(s) contain NaN or infinite values "
                                f"(e.g. id {bad_id!r})")
    if ids["distinct"] != ids["rows"]:
        dup = df.groupBy(ID_COL).count().where("count > 1").first()
        raise InvalidInputError(f"{path!r}: ids must be unique; {ids['rows'] - ids['distinct']} duplicate(s), "
                                f"e.g. {dup[ID_COL]!r} appears {dup['count']} times")
    sample = scanned.filter(pc.equal(scanned.column("kind"), "sample")).sort_by("id")
    if sample.num_rows > sample_size:  # the Bernoulli draw overshoots by ~20% on purpose
        keep = np.sort(np.random.default_rng(seed).choice(sample.num_rows, size=sample_size, replace=False))
        sample = sample.take(pa.array(keep))
    logger.info("corpus %s: %d signals of %d samples, checks passed", path, total["rows"], dim)
    return dim, total["rows"], signals_from_arrow(sample.column(SIGNAL_COL), expected_len=dim)


_SHARD_COL = "_shard"


def _assign_partition(partition: Partition, transform: ReferenceTransform, dim: int):
    """``mapInArrow`` adapter: each row's shard under a content partition, appended as ``_shard``."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            shard = partition.assign(transform.apply(signals_from_arrow(b.column(SIGNAL_COL), expected_len=dim))[0])
            yield pa.RecordBatch.from_arrays([*b.columns, pa.array(shard.astype(np.int32))],
                                             names=[*b.schema.names, _SHARD_COL])

    return run


_SHARD_ROW = pa.schema([("part", pa.int32()), ("info", pa.string())])


def _build_partition(out: str, transform: ReferenceTransform, cfg: BuildConfig, dim: int, has_label: bool):
    """``mapInArrow`` adapter: one partition -> one shard on disk, one small summary row."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        part = TaskContext.get().partitionId()
        ids: list[str] = []
        labels: list[str] = []
        blocks, shard_of = [], []
        for b in batches:
            ids.extend(b.column(ID_COL).to_pylist())
            if has_label:
                labels.extend(b.column(LABEL_COL).to_pylist())
            blocks.append(signals_from_arrow(b.column(SIGNAL_COL), expected_len=dim))
            shard_of.append(b.column(_SHARD_COL).to_numpy() if _SHARD_COL in b.schema.names
                            else np.full(b.num_rows, part))
        if not ids:
            return
        x, shard_of = np.concatenate(blocks), np.concatenate(shard_of)
        del blocks
        # a range partition of the shard column holds one shard, but nothing promises it: build each
        for shard in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == shard)
            info = build_shard(Path(out), int(shard), [ids[r] for r in rows],
                               [labels[r] for r in rows] if has_label else None, x[rows], transform, cfg)
            yield pa.RecordBatch.from_pylist([{"part": int(shard), "info": json.dumps(asdict(info))}],
                                             schema=_SHARD_ROW)

    return run


def build(spark, input_path: str | Path, output: str | Path, cfg: BuildConfig, *, partitions: int | None = None,
          shard_rows: int = SHARD_ROWS, sampling_rate: float | None = None, overwrite: bool = False) -> Path:
    """Build an index directory from a Parquet corpus; returns the directory.

    One shard per partition: ``partitions``, or else the fewest shards of at most ``shard_rows`` signals.
    Every query walks every shard, so shards are as large as a build task's memory allows (~3 x the
    shard's raw signals), not one per core: measured at 10^5 signals, one shard answers cosine
    hkmeans queries in 2.0 ms at recall 0.966 where two shards of 5*10^4 (one per core of local[2])
    took 3.6 ms; the build's shard stage then runs on one core (pass ``partitions`` to trade back).
    """
    t0 = time.monotonic()
    logger.info("build: input %s, output %s, parameters %s", input_path, output, asdict(cfg))
    try:
        df = spark.read.parquet(str(input_path))
    except Exception as e:  # AnalysisException: path missing or not Parquet
        raise InvalidInputError(f"cannot read corpus {str(input_path)!r}: {str(e).splitlines()[0]}") from e
    dim, total, sample = _check_corpus(df, str(input_path), cfg.reference_sample, cfg.seed)
    shape_max_lag(cfg, dim)  # a lag bound too long for these signals fails here, not on an executor
    out = prepare_output(output, overwrite=overwrite).resolve()
    has_label = LABEL_COL in df.columns
    df = df.select(ID_COL, *([LABEL_COL] if has_label else []), SIGNAL_COL)
    partitions = partitions or -(-total // shard_rows)
    by_content = partitions > 1 and cfg.partitioning == "kmeans"
    if partitions != df.rdd.getNumPartitions() and not by_content:  # fewer: merge splits, no shuffle
        df = df.coalesce(partitions) if partitions < df.rdd.getNumPartitions() else df.repartition(partitions)
    transform = fit_transform(sample, cfg)
    logger.info("build: references fitted in %.1f s", time.monotonic() - t0)
    partition = None
    if by_content:  # by content: shuffle each row to its shard
        partition = fit_partition(transform.apply(sample)[0], partitions, cfg.cells_per_shard, cfg.seed)
        ddl = ", ".join(f"{f.name} {f.dataType.simpleString()}" for f in df.schema.fields) + f", {_SHARD_COL} int"
        df = df.mapInArrow(_assign_partition(partition, transform, dim), ddl).repartitionByRange(
            partitions, _SHARD_COL)
        logger.info("build: %d shards by content, %d cells", partitions, len(partition.cells))
    bc = spark.sparkContext.broadcast(transform)
    runner = _build_partition(str(out), bc.value, cfg, dim, has_label)
    with Progress(spark, "build shards"):
        rows = df.mapInArrow(runner, "part int, info string").collect()
    bc.unpersist()
    infos = []
    rows = sorted(rows, key=lambda r: r["part"])
    if partition is not None:  # shards no row went to were not built
        partition = partition.renumbered([int(r["part"]) for r in rows])
    for new, row in enumerate(rows):  # renumber shards 0..n-1
        raw = json.loads(row["info"])
        old_dir, new_dir = shard_dir(out, raw["shard"]), shard_dir(out, new)
        if old_dir != new_dir:
            old_dir.rename(new_dir)
        files = {str((new_dir / Path(k).name).relative_to(out)): v for k, v in raw["files"].items()}
        infos.append(ShardInfo(shard=new, count=raw["count"], max_norm=raw["max_norm"], files=files))
    manifest = finish_index(out, transform, infos, cfg, dim=dim, sampling_rate=sampling_rate,
                            extra={"source": str(input_path)}, partition=partition)
    logger.info("build: %d signals in %d shards, %.1f s total -> %s", total, len(infos),
                time.monotonic() - t0, out)
    return manifest.parent


# ---- batch search -----------------------------------------------------------------------------------
_INDEX_CACHE: dict[str, tuple[str, SearchIndex]] = {}


def cached_index(path: str, version: str, shard: int | None = None) -> SearchIndex:
    """One loaded index (or shard) per process, path and version; executors reuse Python workers.

    Loading another version of the same path drops the old one (a serving job moves forward).
    """
    key = f"{path}#{shard}"
    held = _INDEX_CACHE.get(key)
    if held is None or held[0] != version:
        if len(_INDEX_CACHE) >= 8:
            _INDEX_CACHE.clear()
        _INDEX_CACHE.pop(key, None)
        _INDEX_CACHE[key] = (version, SearchIndex.load(path, verify=False,
                                                       shards=None if shard is None else [shard]).warm())
    return _INDEX_CACHE[key][1]


def search(spark, index: SearchIndex, queries_path: str | Path, metric: str, mode: str, k: int,
           threshold: float | None, params: SearchParams, partitions: int | None = None,
           by_shard: bool = False, diagnostics: bool = False) -> pa.Table:
    """Search every row of a Parquet query file on executors; results come back as one small table.

    ``by_shard`` pairs every query with every shard, so each task loads a single shard (an index too
    big for one executor), and keeps the best ``k`` per query over all shards. On a content-partitioned
    index in hkmeans mode a query is paired only with the ``n_shards_probe`` shards it is routed to.
    ``diagnostics`` adds, per match, where it was computed (``DIAGNOSTIC_COLUMNS``), so a test on a real
    cluster can see which executor searched which shard and which shard files it held; off by default.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    df = spark.read.parquet(str(queries_path))
    _check_corpus(df, str(queries_path))
    df = df.select(ID_COL, SIGNAL_COL)
    path, version, dim = str(index.path.resolve()), index.version, index.dim
    n_shards = len(index.manifest["shards"])
    if by_shard and mode == "hkmeans" and index.partition is not None and index.routes(metric, params.n_shards_probe):
        # each query goes only to the shards its routing picks (the driver's cells, shipped in the closure)
        df = df.mapInArrow(_route_queries(index.transform, index.partition, metric, params.n_shards_probe, dim),
                           "id string, signal array<float>, shard long").repartition(n_shards, "shard")
    elif by_shard:
        df = df.crossJoin(spark.range(n_shards).withColumnRenamed("id", "shard")).repartition(n_shards, "shard")
    elif partitions:
        df = df.repartition(partitions)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            shard_ids = b.column("shard").to_numpy() if by_shard else np.zeros(b.num_rows, np.int64)
            for shard in np.unique(shard_ids):
                rows = b.filter(pa.array(shard_ids == shard)) if by_shard else b
                idx = cached_index(path, version, int(shard) if by_shard else None)
                q = signals_from_arrow(rows.column(SIGNAL_COL), expected_len=dim)
                matches = idx.search(q, metric, mode, k, threshold, params)
                batch = results_batch(rows.column(ID_COL).to_pylist(), matches)
                yield _with_diagnostics(batch, int(shard), idx) if diagnostics else batch

    schema = RESULT_SCHEMA if not diagnostics else pa.schema([*RESULT_SCHEMA, *DIAGNOSTIC_COLUMNS])
    out = df.mapInArrow(run, ", ".join(f"{f.name} {_DDL[f.type]}" for f in schema))
    if by_shard:
        best = Window.partitionBy("query_id").orderBy(F.desc("score"), F.asc("id"))
        out = out.withColumn("rank", F.row_number().over(best)).where(F.col("rank") <= k)
    with Progress(spark, "search"):
        return out.toArrow().cast(schema).sort_by([("query_id", "ascending"), ("rank", "ascending")])


#: ``search(..., diagnostics=True)`` extra columns: the shard a task was given, the task's executor
#: (host and working directory: a standalone executor runs in ``work/<app>/<executor id>``), its Python
#: worker's pid, and the shard directories whose signals that worker's cached index holds memory-mapped
DIAGNOSTIC_COLUMNS = [pa.field("shard", pa.int64()), pa.field("executor", pa.string()),
                      pa.field("pid", pa.int64()), pa.field("mapped", pa.string())]
_DDL = {pa.string(): "string", pa.int32(): "int", pa.int64(): "bigint", pa.float64(): "double"}


def _with_diagnostics(batch: pa.RecordBatch, shard: int, idx: SearchIndex) -> pa.RecordBatch:
    import socket

    mapped = ",".join(sorted(Path(s.signals.filename).parent.name if isinstance(s.signals, np.memmap) else "in-memory"
                             for s in idx.shards))
    n = batch.num_rows
    extra = [pa.array([shard] * n, pa.int64()), pa.array([f"{socket.gethostname()}:{Path.cwd()}"] * n),
             pa.array([os.getpid()] * n, pa.int64()), pa.array([mapped] * n)]
    return pa.RecordBatch.from_arrays([*batch.columns, *extra], schema=pa.schema([*batch.schema, *DIAGNOSTIC_COLUMNS]))


def _route_queries(transform: ReferenceTransform, partition: Partition, metric: str, n_shards_probe: int, dim: int):
    """``mapInArrow`` adapter: one (query, shard) row for each shard a query's routing visits."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            if not b.num_rows:
                continue
            routes = partition.route(*transform.apply(signals_from_arrow(b.column(SIGNAL_COL), expected_len=dim)),
                                     metric, n_shards_probe)
            take = pa.array(np.repeat(np.arange(b.num_rows), routes.shape[1]))
            yield pa.RecordBatch.from_arrays([b.column(ID_COL).take(take), b.column(SIGNAL_COL).take(take),
                                              pa.array(routes.reshape(-1).astype(np.int64))],
                                             names=[ID_COL, SIGNAL_COL, "shard"])

    return run


def results_batch(query_ids: list[str], matches) -> pa.RecordBatch:
    """The batch-search result layout: one row per match."""
    rows = [{"query_id": qid, "rank": m.rank, "id": m.id, "score": m.score}
            for qid, ms in zip(query_ids, matches) for m in ms]
    return pa.RecordBatch.from_pylist(rows, schema=RESULT_SCHEMA)
