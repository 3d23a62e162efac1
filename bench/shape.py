"""Study 5: the shape metrics. Shifted copies on real records, recall vs q/s at 10^5, build cost, UCR 1-NN.

``python -m bench shape`` runs the first three (results in ``bench/results/shape/``);
``python -m bench ucr --ucr-dir DIR`` the fourth, on the UCR archive's TSV layout
(``DIR/<Name>/<Name>_TRAIN.tsv`` and ``_TEST.tsv``, label first, one series a line), which no PyPI
package here ships (aeon's bundled sets hold no ECG set; tslearn and sktime download from the web).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from batch_index.build.shards import BuildConfig, build_index
from batch_index.corpus.wfdb import IngestConfig, windows_from_record
from batch_index.engine.metrics import scores
from batch_index.engine.shape import default_max_lag
from batch_index.errors import InvalidInputError
from batch_index.search import SearchIndex, SearchParams
from bench.data import REAL_RECORDS, Perturb, synthetic
from bench.measure import capped_threads, machine_info
from bench.report import table

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
SHIFT_METRICS: Final[tuple[str, ...]] = ("cosine", "euclidean", "zeuclidean", "shape")
#: the UCR archive's published 1-NN test error rates (Dau et al., "The UCR Time Series Archive", 2018,
#: arXiv:1810.07758, table of the 128 data sets; also www.cs.ucr.edu/~eamonn/time_series_data_2018):
#: euclidean, DTW with the learned warping window, DTW with no window
UCR_PUBLISHED: Final[dict[str, tuple[float, float, float]]] = {
    "ECG200": (0.120, 0.120, 0.230),
    "ECG5000": (0.075, 0.075, 0.076),
    "ECGFiveDays": (0.203, 0.203, 0.232),
    "TwoLeadECG": (0.253, 0.132, 0.096),
}
UCR_METRICS: Final[tuple[str, ...]] = ("euclidean", "zeuclidean", "shape")


@dataclass(frozen=True)
class ShapeConfig:
    n: int = 100_000
    n_queries: int = 100
    efs: tuple[int, ...] = (128, 256, 512)
    reranks: tuple[int, ...] = (64, 128, 256)
    k: int = 10
    wfdb_dir: Path = Path("../shared/data/wfdb")
    seed: int = 0
    workdir: Path = Path("/tmp/ecg-bench")
    out: Path = Path("bench/results/shape")


# ---- 1: a window's 1-s-shifted copy ------------------------------------------------------------------
def shifted_copies(wfdb_dir: Path, records: tuple[str, ...] = REAL_RECORDS, shift_s: float = 1.0) -> dict[str, Any]:
    """Top-1 rate of a window's shifted copy: corpus = the records' non-overlapping 10-s windows, queries =
    windows cut ``shift_s`` later (and earlier) than a corpus window, whose copy shares 9 of its 10 s."""
    cfg = IngestConfig(stride_s=shift_s)
    ids, corpus, queries, truth = [], [], [], []
    for rec in records:
        rid, _, x = windows_from_record(wfdb_dir / rec, cfg)
        start = np.array([int(i.rsplit("-", 1)[1]) for i in rid])
        step = cfg.stride_len
        base = np.flatnonzero(start % cfg.window_len == 0)
        row_of = {int(s): len(ids) + j for j, s in enumerate(start[base])}
        ids += [rid[i] for i in base]
        corpus.append(x[base])
        pos = {int(s): i for i, s in enumerate(start)}
        for s0 in start[base]:
            for q_start in (s0 + step, s0 - step):
                if int(q_start) in pos:
                    queries.append(x[pos[int(q_start)]])
                    truth.append(row_of[int(s0)])
    x, q, want = np.concatenate(corpus), np.stack(queries), np.array(truth)
    out: dict[str, Any] = {"corpus": len(x), "queries": len(q), "records": list(records), "shift_s": shift_s,
                           "max_lag": default_max_lag(x.shape[1])}
    for metric in SHIFT_METRICS:
        got, copy_score = [], []
        for row, w in zip(q, want):
            s = scores(row, x, metric)
            got.append(int(np.argmax(s)))
            copy_score.append(float(s[w]))
        out[metric] = {"top1": float(np.mean(np.array(got) == want)), "copy_score_median": float(np.median(copy_score))}
        logger.info("shifted copies, %s: top-1 %.3f", metric, out[metric]["top1"])
    return out


# ---- 2 and 3: build cost, recall vs q/s --------------------------------------------------------------
class _Timings(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.took: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        for key, v in getattr(record, "shape_timings", {}).items():
            self.took[key] = self.took.get(key, 0.0) + v


def _build(x: F32, ids: list[str], path: Path) -> dict[str, Any]:
    handler = _Timings()
    log = logging.getLogger("batch_index.engine.shape_index")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        with capped_threads(1):
            build_index(ids, x, path, BuildConfig(metrics=("shape", "zeuclidean")), sampling_rate=250.0,
                        overwrite=True)
    finally:
        log.removeHandler(handler)
    total = time.perf_counter() - t0
    files: dict[str, int] = {}
    for f in path.rglob("*"):
        if f.is_file():
            files[f.name] = files.get(f.name, 0) + f.stat().st_size
    return {"seconds_total": total, "seconds": handler.took, "bytes": files}


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(got, truth)]))


def recall_curves(index: SearchIndex, queries: dict[str, F32], cfg: ShapeConfig,
                  metrics: tuple[str, ...] = ("shape", "zeuclidean")) -> list[dict[str, Any]]:
    rows = []
    with capped_threads(1):
        for metric in metrics:
            for qname, q in queries.items():
                t0 = time.perf_counter()
                truth, _ = index.search_arrays(q, metric, "exact", cfg.k, SearchParams.for_metric(metric))
                exact_s = (time.perf_counter() - t0) / len(q)
                rows.append({"metric": metric, "queries": qname, "mode": "exact", "recall": 1.0,
                             "qps": 1 / exact_s})
                for ef in cfg.efs:
                    for rr in cfg.reranks:
                        p = SearchParams.for_metric(metric, ef=ef, rerank=rr)
                        index.search_arrays(q[:4], metric, "hkmeans", cfg.k, p)
                        t0 = time.perf_counter()
                        got, _ = index.search_arrays(q, metric, "hkmeans", cfg.k, p)
                        took = time.perf_counter() - t0
                        rows.append({"metric": metric, "queries": qname, "mode": "hkmeans", "ef": ef, "rerank": rr,
                                     "recall": _recall(got, truth), "qps": len(q) / took})
                        logger.info("%s %s ef %d rerank %d: recall@%d %.3f, %.0f q/s", metric, qname, ef, rr,
                                    cfg.k, rows[-1]["recall"], rows[-1]["qps"])
    return rows


def run(cfg: ShapeConfig, command: str) -> Path:
    cfg.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"command": command, "config": {k: str(v) for k, v in asdict(cfg).items()},
                              "machine": machine_info()}
    result["shifted"] = shifted_copies(cfg.wfdb_dir)
    data = synthetic(cfg.n, cfg.n_queries, seed=cfg.seed, cache=cfg.workdir / "data",
                     perturb=Perturb(max_shift=250))
    path = cfg.workdir / f"shape-index-{cfg.n}"
    result["build"] = _build(data.corpus, data.ids, path)
    index = SearchIndex.load(path).warm()
    result["curves"] = recall_curves(index, data.queries, cfg)
    (cfg.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return render_shape(cfg.out, result)


# ---- 4: UCR 1-NN ---------------------------------------------------------------------------------------
@dataclass
class UcrSet:
    name: str
    train_x: F32
    train_y: np.ndarray
    test_x: F32
    test_y: np.ndarray = field(default_factory=lambda: np.zeros(0))


def read_ucr(ucr_dir: Path, name: str) -> UcrSet:
    """``<name>/<name>_TRAIN.tsv`` and ``_TEST.tsv``: tab-separated, the class label first."""
    parts = []
    for split in ("TRAIN", "TEST"):
        path = ucr_dir / name / f"{name}_{split}.tsv"
        if not path.is_file():
            raise InvalidInputError(f"UCR set {name!r}: {path} not found (expected the archive's "
                                    f"<Name>/<Name>_TRAIN.tsv and _TEST.tsv under --ucr-dir)")
        try:
            table = np.loadtxt(path, delimiter="\t", ndmin=2)
        except ValueError as e:
            raise InvalidInputError(f"{path}: not a numeric tab-separated table ({e})") from e
        if table.shape[1] < 3 or not np.isfinite(table).all():
            raise InvalidInputError(f"{path}: expected a label and at least 2 finite values per line "
                                    "(variable-length sets, padded with NaN, are not supported)")
        parts.append((table[:, 1:].astype(np.float32), table[:, 0]))
    (trx, try_), (tex, tey) = parts
    if trx.shape[1] != tex.shape[1]:
        raise InvalidInputError(f"UCR set {name!r}: train series have {trx.shape[1]} values, test {tex.shape[1]}")
    return UcrSet(name, trx, try_, tex, tey)


def one_nn_error(data: UcrSet, metric: str, max_lag: int | None = None) -> float:
    """Test error of the 1-nearest-neighbour classifier on the training set under ``metric``."""
    wrong = 0
    for q, y in zip(data.test_x, data.test_y):
        s = scores(q, data.train_x, metric, max_lag=max_lag)
        wrong += int(data.train_y[int(np.argmax(s))] != y)
    return wrong / len(data.test_y)


def run_ucr(ucr_dir: Path, names: tuple[str, ...], out: Path, command: str, max_lag_fraction: float | None = None
            ) -> Path:
    rows = []
    for name in names:
        data = read_ucr(ucr_dir, name)
        lag = None if max_lag_fraction is None else round(max_lag_fraction * data.train_x.shape[1])
        row: dict[str, Any] = {"name": name, "train": len(data.train_y), "test": len(data.test_y),
                               "length": int(data.train_x.shape[1]),
                               "max_lag": default_max_lag(data.train_x.shape[1]) if lag is None else lag}
        for metric in UCR_METRICS:
            t0 = time.perf_counter()
            row[metric] = one_nn_error(data, metric, lag)
            row[f"{metric}_s"] = time.perf_counter() - t0
        row["published"] = UCR_PUBLISHED.get(name)
        rows.append(row)
        logger.info("UCR %s: %s", name, {m: row[m] for m in UCR_METRICS})
    out.mkdir(parents=True, exist_ok=True)
    (out / "ucr.json").write_text(json.dumps({"command": command, "ucr_dir": str(ucr_dir), "rows": rows}, indent=2))
    return render_ucr(out, rows, command, ucr_dir)


# ---- reports -------------------------------------------------------------------------------------------
def render_shape(out: Path, result: dict[str, Any]) -> Path:
    """``README.md`` tables of studies 1-3 and ``recall.png`` (recall@10 vs q/s, 1 thread)."""
    sh = result["shifted"]
    md = ["# Study 5: shape metrics", "", f"`{result['command']}`", "",
          f"## 1. A window's 1-s-shifted copy (real records {', '.join(sh['records'])})", "",
          f"Corpus: the {sh['corpus']} non-overlapping 10-s windows; {sh['queries']} queries cut {sh['shift_s']:g} s "
          f"later or earlier than a corpus window, which shares 9 of their 10 s. Exact scores, shape lag bound "
          f"{sh['max_lag']} samples.", "",
          table(["metric", "copy is top-1", "median score of the copy"],
                [[m, f"{sh[m]['top1']:.3f}", f"{sh[m]['copy_score_median']:.3f}"] for m in SHIFT_METRICS]), ""]
    b = result["build"]
    new = {k: v for k, v in b["bytes"].items() if k.startswith(("shape-", "zstats", "tree-", "graph-"))}
    md += ["## 2. Build cost of the shape spaces (local build, 1 thread)", "",
           f"Whole build (reference transform, signals written, both spaces): {b['seconds_total']:.0f} s.", "",
           table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in b["seconds"].items()]), "",
           table(["file (all shards)", "MB", "bytes per signal"],
                 [[k, f"{v / 1e6:.1f}", f"{v / int(result['config']['n']):.0f}"] for k, v in sorted(new.items())]), ""]
    curves = result["curves"]
    md += ["## 3. Recall@10 against each metric's own exact mode, 1 thread", "",
           table(["metric", "queries", "mode", "ef", "rerank", "recall@10", "q/s"],
                 [[r["metric"], r["queries"], r["mode"], r.get("ef", ""), r.get("rerank", ""), f"{r['recall']:.3f}",
                   f"{r['qps']:.1f}"] for r in curves]), ""]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for metric in ("shape", "zeuclidean"):
            for qname in sorted({r["queries"] for r in curves}):
                pts = sorted((r["qps"], r["recall"]) for r in curves
                             if r["metric"] == metric and r["queries"] == qname and r["mode"] == "hkmeans")
                ax.plot(*zip(*pts), marker="o", label=f"{metric} / {qname}")
        ax.axhline(0.95, color="grey", ls=":")
        ax.axvline(300, color="grey", ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("queries/s (1 thread)")
        ax.set_ylabel("recall@10")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "recall.png", dpi=100)
        plt.close(fig)
        md += ["![recall vs q/s](recall.png)", ""]
    except ImportError:
        pass
    md += ["<details><summary>machine</summary>", "", "```json", json.dumps(result["machine"], indent=1, default=str),
           "```", "</details>", ""]
    (out / "README.md").write_text("\n".join(md))
    return out / "README.md"


def render_ucr(out: Path, rows: list[dict[str, Any]], command: str, ucr_dir: Path) -> Path:
    md = ["# UCR ECG sets: 1-NN test error", "", f"`{command}` (data: `{ucr_dir}`)", "",
          "Published columns: the archive's own figures (Dau et al. 2018): euclidean, DTW with the learned "
          "window, DTW with no window. Ours are 1-NN on the training set, exact scores.", "",
          table(["set", "train/test", "length", "shape lag", "euclidean", "zeuclidean", "shape",
                 "published ED / DTW(w) / DTW"],
                [[r["name"], f"{r['train']}/{r['test']}", r["length"], r["max_lag"], f"{r['euclidean']:.3f}",
                  f"{r['zeuclidean']:.3f}", f"{r['shape']:.3f}",
                  " / ".join(f"{v:.3f}" for v in r["published"]) if r["published"] else "-"] for r in rows]), ""]
    wins = sum(r["shape"] < r["euclidean"] for r in rows)
    md.append(f"shape beats euclidean on {wins} of {len(rows)} set(s).")
    (out / "UCR.md").write_text("\n".join(md) + "\n")
    return out / "UCR.md"
