"""Study 3, end to end through Kafka and Spark: latency and throughput as a user sees them.

The service runs as users run it (``python -m streaming serve`` in its own process group, default
settings) against a real broker (``--bootstrap``, or an embedded Tansu); this process is the user,
sending queries with :class:`streaming.client.StreamClient` and timing each from its ``produce`` call
to its reply being read (one clock). Phases, in order, on an index of ``n`` synthetic windows:

- start-up: from spawning ``serve`` until the first reply to a probe sent every second;
- steady rates (10 and 100 queries/s by default), queries paced on a fixed schedule;
- a burst: ``burst`` queries produced at once; how long until the last reply is read;
- sustained throughput per mode: a backlog produced at once and drained; replies/s over the drain.

Queries are unseen synthetic windows (rows ``n`` ..), so every query is a real search.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import report
from bench.data import _synthetic_rows
from bench.measure import TreeRss, machine_info

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class E2EConfig:
    n: int = 100_000
    metric: str = "cosine"
    mode: str = "hkmeans"  # of the rate and burst phases
    rates: tuple[float, ...] = (10.0, 100.0)
    rate_seconds: float = 30.0
    burst: int = 1000
    bursts: int = 3  # the burst is repeated (2 s apart): one burst says little on a host whose speed drifts
    sustained: tuple[tuple[str, int], ...] = (("hkmeans", 4000), ("transform", 4000), ("exact", 400))
    sustained_metrics: tuple[str, ...] = ("euclidean", "manhattan", "dot")  # hkmeans backlogs in other metrics
    distinct_queries: int = 1000
    master: str = "local[2]"
    serve_args: tuple[str, ...] = ()  # extra `streaming serve` flags, e.g. ("--executor-min-batch", "0")
    index: Path | None = None  # default: the scaling study's Spark-built index of n (built if missing)
    bootstrap: str | None = None  # default: an embedded Tansu broker
    reply_timeout: float = 180.0
    seed: int = 0
    workdir: Path = Path("/tmp/ecg-bench")
    out: Path = Path("bench/results/e2e")


@dataclass
class Phase:
    name: str
    mode: str
    metric: str
    sent: int
    latencies_ms: list[float]
    wall_s: float  # first send -> last reply read
    offered_qps: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.full(1, np.nan)
        return {"phase": self.name, "mode": self.mode, "metric": self.metric, "sent": self.sent,
                "answered": len(self.latencies_ms),
                "missing": self.sent - len(self.latencies_ms), "offered_qps": self.offered_qps,
                "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
                "wall_s": self.wall_s, "answered_qps": len(self.latencies_ms) / self.wall_s if self.wall_s else np.nan,
                **self.extra}


def _index(cfg: E2EConfig) -> Path:
    if cfg.index is not None:
        return cfg.index
    from bench import scaling

    scfg = scaling.ScalingConfig(engine="spark", reuse_builds=True, seed=cfg.seed, workdir=cfg.workdir)
    return scaling.build_or_reuse(cfg.n, scfg)[0]


@contextmanager
def _broker(cfg: E2EConfig) -> Iterator[str]:
    if cfg.bootstrap:
        yield cfg.bootstrap
        return
    from streaming.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.bootstrap


class Driver:
    """Sends queries on a schedule and gathers their replies (absolute times on this process's clock)."""

    def __init__(self, client: Any, queries: np.ndarray, metric: str) -> None:
        self.client, self.queries, self.metric = client, queries, metric
        self.sent_at: dict[str, float] = {}
        self._i = 0

    def send(self, mode: str, tag: str, metric: str | None = None) -> str:
        cid = f"{tag}-{self._i}"
        self.sent_at[cid] = time.monotonic()
        self.client.send(self.queries[self._i % len(self.queries)], metric or self.metric, k=10, mode=mode,
                         correlation_id=cid)
        self._i += 1
        return cid

    def gather(self, name: str, mode: str, cids: list[str], timeout: float, offered: float | None = None,
               metric: str | None = None) -> Phase:
        replies = self.client.collect(cids, timeout)
        bad = [c for c, r in replies.items() if not r.result.ok]
        if bad:
            raise RuntimeError(f"{len(bad)} error replies in phase {name}, e.g. {replies[bad[0]].result}")
        done = [self.sent_at[c] + r.latency_ms / 1e3 for c, r in replies.items()]
        wall = (max(done) - min(self.sent_at[c] for c in cids)) if done else float("nan")
        phase = Phase(name, mode, metric or self.metric, len(cids), [r.latency_ms for r in replies.values()], wall,
                      offered)
        logger.info("%s: %d/%d answered, p50 %.0f ms, p99 %.0f ms, %.1f s", name, len(replies), len(cids),
                    phase.row()["p50_ms"], phase.row()["p99_ms"], wall)
        return phase

    def paced(self, rate: float, seconds: float, mode: str, timeout: float) -> Phase:
        n, t0, cids = int(rate * seconds), time.monotonic(), []
        for i in range(n):
            due = t0 + i / rate
            while (left := due - time.monotonic()) > 0:
                self.client.poll(min(left, 0.005))
            cids.append(self.send(mode, f"rate{rate:g}"))
        return self.gather(f"steady {rate:g} q/s", mode, cids, timeout, offered=rate)

    def burst(self, name: str, n: int, mode: str, timeout: float, metric: str | None = None) -> Phase:
        cids = [self.send(mode, name.replace(" ", "-"), metric) for _ in range(n)]
        return self.gather(name, mode, cids, timeout, metric=metric)


def _startup(client: Any, sample: np.ndarray, metric: str, spawned: float, timeout: float) -> float:
    """Seconds from spawning ``serve`` to the first reply read (a probe is sent every second)."""
    deadline = spawned + timeout
    probes: list[str] = []
    while time.monotonic() < deadline:
        probes.append(client.send(sample, metric, k=10, mode="exact", correlation_id=f"probe-{uuid.uuid4().hex}"))
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            client.poll(0.01)
            if any(cid in client.replies for cid in probes):
                return time.monotonic() - spawned
    raise RuntimeError(f"no reply within {timeout:.0f} s of starting the service")


def _batches(metrics_file: Path) -> list[dict[str, Any]]:
    if not metrics_file.exists():
        return []
    return [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]


def run(cfg: E2EConfig, command: str) -> Path:
    from devtools.processes import ServeProcess
    from streaming.admin import create_topics
    from streaming.client import StreamClient

    info = machine_info()
    index = _index(cfg)
    queries = _synthetic_rows(cfg.n, cfg.distinct_queries, cfg.seed, cfg.workdir / "data")
    run_id = uuid.uuid4().hex[:8]
    work = cfg.workdir / f"e2e-{run_id}"
    work.mkdir(parents=True, exist_ok=True)
    qt, rt, dt = (f"bench-{run_id}-{role}" for role in ("queries", "replies", "dead-letters"))
    phases: list[Phase] = []
    with _broker(cfg) as bootstrap:
        create_topics(bootstrap, [qt, rt, dt])
        serve = ServeProcess(["--bootstrap", bootstrap, "--index", str(index), "--queries-topic", qt,
                              "--replies-topic", rt, "--dead-letter-topic", dt, "--checkpoint", str(work / "ckpt"),
                              "--master", cfg.master, "--metrics-file", str(work / "batches.jsonl"),
                              *cfg.serve_args], work / "serve.log")
        spawned = time.monotonic()
        serve.start()
        assert serve.proc is not None
        sampler = TreeRss(serve.proc.pid)
        try:
            with StreamClient(bootstrap, qt, rt, timeout=60) as client:
                startup = _startup(client, queries[0], cfg.metric, spawned, cfg.reply_timeout)
                logger.info("start-up to first reply: %.1f s", startup)
                drv = Driver(client, queries, cfg.metric)
                for mode, _ in cfg.sustained:  # warm every mode's code path and the executors
                    drv.burst(f"warm-up {mode}", 200 if mode != "exact" else 20, mode, cfg.reply_timeout)
                for metric in cfg.sustained_metrics:  # each metric's space is set up on first use
                    drv.burst(f"warm-up {metric}", 200, "hkmeans", cfg.reply_timeout, metric=metric)
                for rate in cfg.rates:
                    phases.append(drv.paced(rate, cfg.rate_seconds, cfg.mode, cfg.reply_timeout))
                    time.sleep(2)
                for j in range(cfg.bursts):
                    name = f"burst of {cfg.burst}" + (f" #{j + 1}" if cfg.bursts > 1 else "")
                    phases.append(drv.burst(name, cfg.burst, cfg.mode, cfg.reply_timeout))
                    time.sleep(2)
                for mode, n in cfg.sustained:
                    phases.append(drv.burst(f"sustained {mode}", n, mode, cfg.reply_timeout))
                    time.sleep(2)
                for metric in cfg.sustained_metrics:
                    n = dict(cfg.sustained).get("hkmeans", 1000)
                    phases.append(drv.burst(f"sustained hkmeans {metric}", n, "hkmeans", cfg.reply_timeout, metric))
                    time.sleep(2)
        finally:
            rc = serve.stop()
            sampler.stop()
    info["load_average_at_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    extra = {"startup_s": startup, "serve_exit_code": rc, "peak_rss_mb": sampler.peak / 2**20,
             "peak_rss_mb_by_role": {k: round(v / 2**20) for k, v in sampler.peak_by_role.items()},
             "index": str(index), "broker": "external" if cfg.bootstrap else "embedded Tansu"}
    return write(phases, _batches(work / "batches.jsonl"), extra, cfg, command, info)


def write(phases: list[Phase], batches: list[dict[str, Any]], extra: dict[str, Any], cfg: E2EConfig, command: str,
          info: dict[str, Any]) -> Path:
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [p.row() for p in phases]
    report.write_csv(rows, out / "results.csv")
    report.write_csv([{"phase": p.name, "latency_ms": v} for p in phases for v in p.latencies_ms],
                     out / "latencies.csv")
    params = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workdir")}
    md = report.header("Study 3: end to end through Kafka and Spark", command, info, {**params, **extra})
    md += [f"`python -m streaming serve` (master {cfg.master}, default settings"
           + (f" plus `{' '.join(cfg.serve_args)}`" if cfg.serve_args else "")
           + f") on an index of {cfg.n} synthetic windows, {extra['broker']} broker; latency = this client's "
           "produce call -> reply read, one clock, the client on the same machine. Queries: unseen synthetic "
           "windows, k = 10, each metric at its default search settings.", "",
           f"Start-up (spawn `serve` -> first reply read): **{extra['startup_s']:.1f} s**. Peak summed RSS of the "
           f"service's process tree: {extra['peak_rss_mb']:,.0f} MB ({extra['peak_rss_mb_by_role']}); every process "
           "that memory-maps the index counts its pages, which the page cache holds once.", "",
           report.table(["phase", "mode", "metric", "sent", "answered", "offered q/s", "p50 ms", "p95 ms", "p99 ms",
                         "max ms", "first send -> last reply s", "answered q/s"],
                        [[r["phase"], r["mode"], r["metric"], r["sent"], r["answered"],
                          "-" if r["offered_qps"] is None else r["offered_qps"], r["p50_ms"], r["p95_ms"],
                          r["p99_ms"], r["max_ms"], r["wall_s"], r["answered_qps"]] for r in rows]), ""]
    md += ["## Targets", "", report.table(["target", "measured", "met"], _targets(rows)), ""]
    if batches:
        md += ["## Micro-batches (the service's own metrics, all phases)", "",
               report.table(["answered on", "batches", "records", "median records", "median batch ms",
                             "median score ms per record"],
                            [[where, len(bs), sum(b["records"] for b in bs),
                              float(np.median([b["records"] for b in bs])),
                              float(np.median([b["batch_ms"] for b in bs])),
                              float(np.median([b["score_ms"] / max(1, b["records"]) for b in bs]))]
                             for where in ("driver", "executors")
                             if (bs := [b for b in batches if b.get("answered_on") == where])]), "",
               "Score ms on executors is the sum over tasks (CPU time), not wall time.", ""]
    _plot(phases, out / "latency_cdf.png")
    md += ["![latency CDF](latency_cdf.png)", ""]
    path = out / "README.md"
    path.write_text("\n".join(md))
    logger.info("wrote %s", path)
    return path


def _targets(rows: list[dict[str, Any]]) -> list[list[Any]]:
    by = {r["phase"]: r for r in rows}
    out: list[list[Any]] = []
    if (r := by.get("steady 10 q/s")) is not None:
        out += [["p50 <= 600 ms at 10 q/s", f"{r['p50_ms']:.0f} ms", r["p50_ms"] <= 600],
                ["p99 <= 1,000 ms at 10 q/s", f"{r['p99_ms']:.0f} ms", r["p99_ms"] <= 1000]]
    if bursts := [r for r in rows if r["phase"].startswith("burst")]:
        worst = max(r["wall_s"] for r in bursts)
        each = " (each: " + ", ".join(f"{r['wall_s']:.2f}" for r in bursts) + " s)" if len(bursts) > 1 else ""
        out.append([f"{'every ' if len(bursts) > 1 else ''}burst of {bursts[0]['sent']} answered within 2 s",
                    f"{'worst ' if len(bursts) > 1 else ''}{worst:.2f} s{each}",
                    worst <= 2.0 and all(r["missing"] == 0 for r in bursts)])
    if (r := by.get("sustained hkmeans")) is not None:
        out.append([f">= 500 q/s sustained (hkmeans, {r['metric']})", f"{r['answered_qps']:.0f} q/s",
                    r["answered_qps"] >= 500])
    return [[t, m, "yes" if ok else "**no**"] for t, m, ok in out]


def _plot(phases: list[Phase], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for p in phases:
        if p.latencies_ms:
            lat = np.sort(p.latencies_ms)
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=f"{p.name} ({p.mode})")
    ax.set_xscale("log")
    ax.set_xlabel("produce -> reply read, ms (log)")
    ax.set_ylabel("fraction of queries")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
