"""Results on disk: raw CSV, Markdown tables (best per system, Pareto frontier, recommended defaults), plots."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bench.systems import FAISS, FAISS_METRIC, PEERS, SYSTEMS

logger = logging.getLogger(__name__)

Row = dict[str, Any]
COLOURS = {"exact": "black", "transform": "tab:olive", "hkmeans": "tab:red", "hkmeans-default": "tab:orange",
           "numpy": "tab:gray",
           "faiss-flat": "tab:purple", "faiss-ivf": "tab:blue", "faiss-hnsw": "tab:green",
           "faiss-pca-hnsw": "tab:cyan", "faiss-pca-ivf-sq8": "tab:brown", "scann": "tab:pink", "usearch": "gold",
           "hnswlib": "darkgreen"}
RIVALS = (*FAISS, *PEERS)  # what hkmeans is judged against


def fmt(v: Any) -> str:
    """Numbers to 3 significant digits (recall to 3 decimals), everything else as text."""
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if 0 <= v <= 1 and v != 0:
            return f"{v:.3f}"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def table(header: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def pareto(rows: list[Row], y: str) -> list[Row]:
    """Rows no other row beats in both recall and ``y`` (queries/s), by recall ascending."""
    ok = [r for r in rows if not math.isnan(r[y])]
    front = [r for r in ok if not any(o["recall"] >= r["recall"] and o[y] >= r[y] and
                                      (o["recall"] > r["recall"] or o[y] > r[y]) for o in ok)]
    return sorted(front, key=lambda r: (r["recall"], -r[y]))


def best_at(rows: list[Row], target: float, y: str) -> dict[str, Row]:
    """Per system, the fastest (by ``y``) configuration with recall >= ``target``."""
    out: dict[str, Row] = {}
    for r in rows:
        if r["recall"] >= target and (r["system"] not in out or r[y] > out[r["system"]][y]):
            out[r["system"]] = r
    return {s: out[s] for s in SYSTEMS if s in out}


def select(rows: list[Row], **eq: Any) -> list[Row]:
    return [r for r in rows if all(r[k] == v for k, v in eq.items())]


def log_best(rows: list[Row], dataset: str, metric: str, target: float, y: str) -> None:
    for qs in dict.fromkeys(r["query_set"] for r in select(rows, dataset=dataset, metric=metric)):
        best = best_at(select(rows, dataset=dataset, metric=metric, query_set=qs), target, y)
        logger.info("%s %s %s, recall >= %g, %s: %s", dataset, metric, qs, target, y,
                    "; ".join(f"{s} {r['params']} {r[y]:.0f}" for s, r in best.items()) or "none")


def _params(text: str) -> dict[str, int]:
    return {} if text == "-" else {k: int(v) for k, v in (p.split("=") for p in text.split(","))}


def recommend(rows: list[Row], system: str, keys: tuple[str, ...], floor: float) -> Row | None:
    """Smallest configuration (ordered by ``keys``) whose recall on every query set is >= ``floor``."""
    by: dict[str, list[Row]] = {}
    for r in select(rows, system=system):
        by.setdefault(r["params"], []).append(r)
    good = [p for p, rs in by.items() if min(r["recall"] for r in rs) >= floor]
    if not good:
        return None
    p = min(good, key=lambda t: tuple(_params(t)[k] for k in keys))
    return {"params": p, "recall": {r["query_set"]: r["recall"] for r in by[p]}, "rows": by[p]}


def plot(rows: list[Row], path: Path, y: str, title: str) -> None:
    """Recall (x) vs queries/s (y, log): a panel per query set (row) and metric (column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qsets = list(dict.fromkeys(r["query_set"] for r in rows))
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    fig, axes = plt.subplots(len(qsets), len(metrics), figsize=(3.6 * len(metrics), 3.1 * len(qsets)),
                             squeeze=False, sharey=True)
    for i, qs in enumerate(qsets):
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            for s in SYSTEMS:
                sub = select(rows, query_set=qs, metric=m, system=s)
                if not sub:
                    continue
                front = pareto(sub, y)
                ax.plot([r["recall"] for r in sub], [r[y] for r in sub], ".", color=COLOURS[s], alpha=0.35)
                ax.plot([r["recall"] for r in front], [r[y] for r in front], "o-", ms=3, color=COLOURS[s], label=s)
            ax.set_yscale("log")
            ax.set_xlim(min(0.5, ax.get_xlim()[0]), 1.005)
            ax.axvline(0.95, color="grey", lw=0.6, ls=":")
            ax.set_title(f"{m}, {qs} queries", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if i == len(qsets) - 1:
                ax.set_xlabel("recall@10")
            if j == 0:
                ax.set_ylabel(y.replace("qps_", "queries/s, ").replace("_", " "))
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def header(title: str, command: str, machine: dict[str, Any], params: dict[str, Any]) -> list[str]:
    return [f"# {title}", "", f"Regenerate with `{command}` (from the repository root).", "",
            "Generated by the `bench` package; every number below was measured in the run that wrote this file.",
            "", "<details><summary>Machine, versions, parameters</summary>", "", "```json",
            json.dumps({"machine": machine, "parameters": params}, indent=1, default=str), "```", "</details>", ""]


def write_recall(rows: list[Row], out: Path, *, command: str, machine: dict[str, Any], params: dict[str, Any],
                 datasets: dict[str, str], primary: str, cells: list[str], target: float, margin: float) -> Path:
    """Study 1's CSV, plots and README.md; returns the README path."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    meta = {"command": command, "machine": machine, "params": params, "datasets": datasets, "primary": primary,
            "cells": cells, "target": target, "margin": margin}
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    md = header("Study 1: recall@10 vs queries/s", command, machine, params)
    md += ["How to read: recall@10 against our `exact` mode (a returned row counts when its exact score is at least "
           "the 10th true score, as in ann-benchmarks). Queries/s columns: `qps_<threads>t_<style>`, `single` = one "
           "call per query, `batch` = one call with every query; threads capped with threadpoolctl and "
           "`faiss.omp_set_num_threads`; median of the timed rounds (rounds visit all systems in turn). "
           f"Plots and the Pareto frontier use `{primary}`. Our index serves all four metrics from one build, "
           "so its build time is that of the whole index; FAISS and numpy build one index per metric. Index MB: "
           "excluding / including the raw vectors kept (for our re-ranking, or as FAISS's flat storage). "
           "FAISS metrics: " + "; ".join(f"{m}: {v}" for m, v in FAISS_METRIC.items()) + ". `hkmeans-default` is "
           "`SearchParams.for_metric(metric)` as shipped. On a 2-core machine shared with other work, the 2-thread "
           "cells suffer most from other load (see the load averages in the details); compare systems within a "
           "column, never across runs.", ""]
    md += ["## Datasets", ""] + [f"- `{k}`: {v}" for k, v in datasets.items()] + [""]

    floor = target + margin
    md += [f"## Recommended hkmeans defaults (smallest ef, then rerank, then n_probe with recall >= {floor:g} on "
           f"every query set of the dataset)", ""]
    rec_rows = []
    for ds in datasets:
        for m in dict.fromkeys(r["metric"] for r in select(rows, dataset=ds)):
            sub = select(rows, dataset=ds, metric=m)
            for system, keys in (("hkmeans", ("ef", "rerank", "n_probe")), ("transform", ("rerank",))):
                rec = recommend(sub, system, keys, floor)
                if rec is None:
                    worst = {}
                    for r in select(sub, system=system):
                        worst[r["params"]] = min(worst.get(r["params"], 1.0), r["recall"])
                    top = max(worst, key=worst.get, default=None)
                    rec_rows.append([ds, m, system, f"none reaches {floor:g} on every query set"
                                     + (f" (best: {top}, worst set {worst[top]:.3f})" if top else ""), "-", "-"])
                    continue
                qps = {r["query_set"]: r[primary] for r in rec["rows"]}
                rec_rows.append([ds, m, system, rec["params"],
                                 ", ".join(f"{q} {v:.3f}" for q, v in rec["recall"].items()),
                                 ", ".join(f"{q} {fmt(v)}" for q, v in qps.items())])
    md += [table(["dataset", "metric", "mode", "parameters", "recall@10", primary], rec_rows), ""]
    md += _sweep_tables(rows, datasets, primary)

    for ds in datasets:
        sub_ds = select(rows, dataset=ds)
        for cell in [primary] + [c for c in cells if c.endswith("2t_batch")]:
            name = f"{ds}-{cell}.png"
            plot(sub_ds, out / name, cell, f"{ds}: recall@10 vs {cell}")
        for qs in dict.fromkeys(r["query_set"] for r in sub_ds):
            md += [f"## {ds}, {qs} queries", "", f"![recall vs q/s]({ds}-{primary}.png)", ""]
            md += [f"### Fastest configuration per system with recall@10 >= {target:g}", ""]
            best_rows, ratio_rows, front_rows = [], [], []
            for m in dict.fromkeys(r["metric"] for r in sub_ds):
                sub = select(sub_ds, query_set=qs, metric=m)
                best = best_at(sub, target, primary)
                best_rows += [[m, s, r["params"], r["recall"], *(r[c] for c in cells), r["build_s"],
                               f"{fmt(r['index_mb'])} / {fmt(r['index_mb_raw'])}"] for s, r in best.items()]
                default = select(sub, system="hkmeans-default")
                for c in cells:
                    ours = best_at(sub, target, c).get("hkmeans")
                    theirs = [r for s, r in best_at(sub, target, c).items() if s in RIVALS]
                    top = max(theirs, key=lambda r: r[c], default=None)
                    dflt = default[0] if default and default[0]["recall"] >= target else None
                    ratio_rows.append([m, c, f"{top['system']} {top['params']}" if top else "none",
                                       top[c] if top else float("nan"), ours[c] if ours else float("nan"),
                                       ours[c] / top[c] if ours and top else float("nan"),
                                       default[0]["recall"] if default else float("nan"),
                                       default[0][c] if default else float("nan"),
                                       dflt[c] / top[c] if dflt and top else float("nan")])
                front_rows += [[m, r["system"], r["params"], r["recall"], r[primary]] for r in pareto(sub, primary)]
            md += [table(["metric", "system", "params", "recall@10", *cells, "build s", "index MB"], best_rows), ""]
            md += [f"### hkmeans vs the best peer at recall@10 >= {target:g} (ratio > 1: ours faster)", "",
                   "Peers: " + ", ".join(RIVALS) + ". `default`: hkmeans at its shipped defaults (its ratio is "
                   f"blank when they miss {target:g}).", "",
                   table(["metric", "cell", "best peer", "peer q/s", "hkmeans best q/s", "ratio",
                          "default recall", "default q/s", "default ratio"], ratio_rows), ""]
            md += [f"### Pareto frontier ({primary})", "",
                   table(["metric", "system", "params", "recall@10", primary], front_rows), ""]
    path = out / "README.md"
    path.write_text("\n".join(md))
    logger.info("wrote %s", path)
    return path


def _sweep_tables(rows: list[Row], datasets: dict[str, str], y: str) -> list[str]:
    """hkmeans recall and q/s per configuration: what the defaults are chosen from."""
    md = []
    for ds in datasets:
        sub = [r for r in select(rows, dataset=ds) if r["system"] in ("hkmeans", "hkmeans-default")]
        metrics = list(dict.fromkeys(r["metric"] for r in sub))
        qsets = list(dict.fromkeys(r["query_set"] for r in sub))
        configs = list(dict.fromkeys((r["system"], r["params"]) for r in sub))
        cell = {(r["system"], r["params"], r["metric"], r["query_set"]): r for r in sub}
        body = []
        for system, params in configs:
            line: list[Any] = [("default " if system != "hkmeans" else "") + params]
            for m in metrics:
                got = [cell.get((system, params, m, q)) for q in qsets]
                line.append(" / ".join(fmt(r["recall"]) if r else "" for r in got) + "; " +
                            " / ".join(fmt(r[y]) if r else "" for r in got) if any(got) else "")
            body.append(line)
        md += [f"### hkmeans sweep, {ds}: recall@10 ({' / '.join(qsets)}); {y} ({' / '.join(qsets)})", "",
               table(["params", *metrics], body), ""]
    return md


def read_csv(path: Path) -> list[Row]:
    """Rows of a results CSV with numbers parsed back into int / float."""
    def parse(v: str) -> Any:
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    with path.open() as f:
        return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def rerender_recall(out: Path) -> Path:
    """Rewrite study 1's README and plots from its ``results.csv`` and ``meta.json`` (no re-measuring)."""
    meta = json.loads((out / "meta.json").read_text())
    return write_recall(read_csv(out / "results.csv"), out, **meta)


def fit_exponent(n: list[float], y: list[float]) -> float:
    """Slope b of log y = a + b log n (least squares); nan with fewer than two sizes."""
    ok = [(a, b) for a, b in zip(n, y) if a > 0 and b > 0 and math.isfinite(b)]
    if len(ok) < 2:
        return float("nan")
    return float(np.polyfit(np.log([a for a, _ in ok]), np.log([b for _, b in ok]), 1)[0])


__all__ = ["best_at", "fit_exponent", "fmt", "header", "pareto", "plot", "read_csv", "recommend", "rerender_recall",
           "table", "write_csv", "write_recall"]
