#!/usr/bin/env python
"""Fault injection at scale: the 10,000-query versions of the reliability promises (issue 5).

Runs ``python -m streaming serve`` as a real child process against an embedded broker (Tansu) and,
while queries flow at a steady rate, injects:

- ``kill``: SIGKILLs of the job at random moments (the first of its Python driver only, the rest of
  its whole process group), each followed by a restart from the same checkpoint;
- ``outage``: the broker frozen (SIGSTOP: unreachable, log kept), then restarted (memory wiped: every
  topic comes back empty under a new id) while clients keep sending;
- ``fuzz``: 10,000 hostile messages of every kind, with hostile Kafka metadata (timestamps at both
  ends of the range and beyond, ~0.5 MB of binary headers, 1 MiB keys), interleaved with valid
  queries; the broker must hold the same topics after the run as before it;
- ``upgrade``: a new index version published mid-stream, then a corrupt one.

It prints one row per scenario: injected faults, queries sent, answered, lost, duplicated (extra
replies, the at-least-once price), wrong (a wrong answer, or two different answers to one query),
dead-lettered, and the job's peak resident memory (driver + JVM + Python workers). Every wait is
bounded, so it stops by itself. Usage::

    .venv/bin/python tools/fault_injection.py                       # everything, ~10-15 min
    .venv/bin/python tools/fault_injection.py --only kill --queries 2000
    .venv/bin/python tools/fault_injection.py --markdown docs/fault_injection.md

Exit code 0 when no query was lost or answered wrongly in any scenario, 1 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from batch_index.build.shards import BuildConfig, build_index
from batch_index.corpus.synthetic import SynthConfig, generate
from batch_index.engine.metrics import DEFAULT_METRICS as METRICS
from batch_index.engine.metrics import scores
from batch_index.search import SearchIndex
from devtools.broker import ControllableBroker
from devtools.hostile import HOSTILE_KINDS, hostile_messages
from devtools.processes import RssSampler, ServeProcess
from streaming.admin import create_topics
from streaming.client import StreamClient
from streaming.codec import Result, decode_dead_letter

REPO = Path(__file__).resolve().parents[1]
K = 5
SCENARIOS = ("kill", "outage", "fuzz", "upgrade")
log = logging.getLogger("fault_injection")


@dataclass
class Row:
    scenario: str
    faults: str = ""
    sent: int = 0
    answered: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    dead_lettered: int = 0
    peak_rss_mib: float = 0.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.wrong == 0


class Workload:
    """Query signals (noisy copies of indexed rows) and the exact top-k each must get, per index version."""

    def __init__(self, ids: list[str], signals: np.ndarray, n_distinct: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        rows = rng.integers(0, len(ids), n_distinct)
        self.queries = signals[rows] + rng.normal(0, 0.05, (n_distinct, signals.shape[1])).astype(np.float32)
        self.metrics = [METRICS[i % len(METRICS)] for i in range(n_distinct)]
        self._truth: dict[tuple[str, int], tuple[np.ndarray, dict[str, float]]] = {}
        self.versions: dict[str, tuple[list[str], np.ndarray]] = {}

    def add_version(self, version: str, ids: list[str], signals: np.ndarray) -> None:
        self.versions[version] = (ids, signals)

    def truth(self, version: str, j: int) -> tuple[np.ndarray, dict[str, float]]:
        """Exact top-k scores of query ``j`` against ``version``, and every id's exact score."""
        key = (version, j)
        if key not in self._truth:
            ids, signals = self.versions[version]
            s = scores(self.queries[j], signals, self.metrics[j])
            self._truth[key] = (np.sort(s)[::-1][:K], dict(zip(ids, s.tolist())))
        return self._truth[key]

    def is_right(self, j: int, res: Result) -> bool:
        """A correct exact top-k: the right scores (ties may order ids either way) for the version named."""
        if not res.ok or res.index_version not in self.versions or len(res.matches) != K:
            return False
        top, every = self.truth(res.index_version, j)
        got = np.array([m[1] for m in res.matches])
        exact = np.array([every.get(m[0], np.nan) for m in res.matches])
        return bool(np.allclose(got, top, rtol=1e-4, atol=1e-4) and np.allclose(exact, got, rtol=1e-4, atol=1e-4))


class Flow:
    """Sends queries at a steady rate while polling replies; ``tick`` callbacks inject the faults."""

    def __init__(self, client: StreamClient, work: Workload, rate: float, prefix: str) -> None:
        self.client, self.work, self.rate, self.prefix = client, work, rate, prefix
        self.sent: dict[str, int] = {}  # correlation id -> workload query index
        self.order: list[str] = []
        self.sent_at: dict[str, float] = {}

    def send_one(self) -> None:
        i = len(self.order)
        j = i % len(self.work.queries)
        cid = self.client.send(self.work.queries[j], self.work.metrics[j], k=K, mode="exact",
                               correlation_id=f"{self.prefix}-{i}")
        self.sent[cid], self.sent_at[cid] = j, time.monotonic()
        self.order.append(cid)

    def run(self, n: int, tick: Callable[[int], None] = lambda i: None, *, deadline_s: float) -> None:
        """Send ``n`` queries; ``tick(sent_so_far)`` is called about every 10 ms."""
        start = next_send = time.monotonic()
        while len(self.order) < n:
            now = time.monotonic()
            if now > start + deadline_s:
                raise TimeoutError(f"sending {n} queries took longer than {deadline_s:.0f} s")
            while len(self.order) < n and now >= next_send:
                self.send_one()
                next_send += 1 / self.rate
            self.client.poll(0.005)
            tick(len(self.order))

    def wait(self, pred: Callable[[], bool], timeout: float, tick: Callable[[int], None] = lambda i: None) -> bool:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                return False
            self.client.poll(0.05)
            tick(len(self.order))
        return True

    def score(self, row: Row, timeout: float) -> None:
        replies = self.client.collect(self.order, timeout)
        row.sent += len(self.order)
        row.answered += len(replies)
        row.lost += len(self.order) - len(replies)
        row.duplicated += self.client.duplicates
        wrong = [cid for cid, r in replies.items() if not self.work.is_right(self.sent[cid], r.result)]
        row.wrong += len(wrong) + len(self.client.conflicts)
        if wrong:
            row.notes.append(f"wrong e.g. {wrong[:3]}")
        if self.client.conflicts:
            row.notes.append(f"{len(self.client.conflicts)} answered twice differently")
        if self.client.undelivered:
            row.notes.append(f"{len(self.client.undelivered)} not accepted by the broker")


class Job:
    """One serve process (restartable) on ``broker``, with memory sampling and its metrics file."""

    def __init__(self, broker: ControllableBroker, index: Path, work_dir: Path, name: str, *extra: str) -> None:
        self.queries, self.replies, self.dlq = f"{name}-q", f"{name}-r", f"{name}-dlq"
        self.metrics = work_dir / f"{name}-metrics.jsonl"
        create_topics(broker.bootstrap, [self.queries, self.replies, self.dlq])
        self.proc = ServeProcess(["--bootstrap", broker.bootstrap, "--index", str(index), "--queries-topic",
                                  self.queries, "--replies-topic", self.replies, "--dead-letter-topic", self.dlq,
                                  "--checkpoint", str(work_dir / f"{name}-ck"), "--metrics-file", str(self.metrics),
                                  *extra], work_dir / f"{name}-serve.log", cwd=REPO)
        self.rss = RssSampler(0.5).start()

    def start(self) -> Job:
        self.proc.start()
        self.rss.target = self.proc
        return self

    def wait_serving(self, client: StreamClient, work: Workload, timeout: float) -> None:
        """Send one warm-up query (not counted) and wait for its reply: the job is up and answering."""
        cid = client.send(work.queries[0], work.metrics[0], k=K, mode="exact", correlation_id=f"warm-up-{self.queries}")
        if cid not in client.collect([cid], timeout):
            raise RuntimeError(f"the job did not answer within {timeout:.0f} s: see {self.proc.log}")
        client.replies.pop(cid)

    def stop(self, row: Row) -> None:
        rc = self.proc.stop()
        self.rss.stop()
        row.peak_rss_mib = max(row.peak_rss_mib, self.rss.peak / 2**20)
        text = self.proc.text()
        if rc != 0 or "stopped cleanly" not in text.rsplit("===== start", 1)[-1]:
            row.notes.append(f"serve did not stop cleanly (exit {rc}; see {self.proc.log})")
        if "streaming query failed" in text:
            row.notes.append("the streaming query failed at least once")
        samples = [r for _, r in self.rss.samples]
        if len(samples) > 4:
            n = len(samples)
            row.notes.append("peak RSS per quarter of the run (MiB): " + "/".join(
                f"{max(samples[i * n // 4:(i + 1) * n // 4]) / 2**20:.0f}" for i in range(4)) + "; at the peak: " +
                ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(self.rss.peak_by_role.items())))

    def batch_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]


# ---- scenarios ----------------------------------------------------------------------------------------
def scenario_kill(a: argparse.Namespace, ctx: dict) -> Row:
    row = Row("kill", faults=f"{a.kills} SIGKILLs of the job (1 driver-only, {a.kills - 1} whole process group) "
                            "+ restarts from the checkpoint")
    rng = random.Random(a.seed)
    with ControllableBroker() as broker:
        job = Job(broker, ctx["v1"], ctx["dir"], "kill").start()
        with StreamClient(broker.bootstrap, job.queries, job.replies) as client:
            job.wait_serving(client, ctx["work"], a.reply_timeout)
            flow = Flow(client, ctx["work"], a.rate, "kill")
            # kill moments spread over the send period, each at least when the incarnation has answered
            plan = sorted(rng.uniform(0.05, 0.9) * a.queries for _ in range(a.kills))
            state = {"answered_at_start": 0, "started": time.monotonic(), "kills": 0}

            def tick(n: int) -> None:
                serving = len(client.replies) > state["answered_at_start"]
                if state["kills"] < len(plan) and n >= plan[state["kills"]] and serving:
                    job.proc.kill(driver_only=state["kills"] == 0)
                    state["kills"] += 1
                    job.proc.start()
                    state["answered_at_start"], state["started"] = len(client.replies), time.monotonic()
                if not job.proc.alive:
                    raise RuntimeError(f"serve exited by itself: see {job.proc.log}")

            flow.run(a.queries, tick, deadline_s=a.queries / a.rate + 120 * (a.kills + 1))
            flow.wait(lambda: state["kills"] >= len(plan) or len(client.replies) >= a.queries, 300, tick)
            flow.score(row, a.reply_timeout)
            row.notes.append(f"{state['kills']} kills done")
        job.stop(row)
    return row


def scenario_outage(a: argparse.Namespace, ctx: dict) -> Row:
    timeout_ms = int(a.pause_s * 1000 / 4)  # the freeze outlasts every in-flight delivery attempt
    row = Row("outage", faults=f"broker frozen {a.pause_s:.0f} s (SIGSTOP; the job's message.timeout.ms "
                               f"{timeout_ms}); broker restarted, {a.down_s:.0f} s down, memory wiped (topics "
                               "recreated, offsets back to 0)")
    with ControllableBroker() as broker:
        job = Job(broker, ctx["v1"], ctx["dir"], "outage", "--kafka-option",
                  f"message.timeout.ms={timeout_ms}").start()
        with StreamClient(broker.bootstrap, job.queries, job.replies) as client:
            job.wait_serving(client, ctx["work"], a.reply_timeout)
            flow = Flow(client, ctx["work"], a.rate, "outage")
            flow.run(int(a.queries * 0.3), deadline_s=a.queries / a.rate + 300)
            broker.pause()  # frozen: connections hang, the log is kept; clients keep sending
            flow.run(len(flow.order) + int(a.rate * a.pause_s), _after(a.pause_s, broker.resume), deadline_s=600)
            broker.resume()
            flow.run(int(a.queries * 0.6), deadline_s=a.queries / a.rate + 300)
            # a memory-only broker loses what it holds: drain first, so that any loss would be the job's
            if not flow.wait(lambda: set(flow.order) <= client.replies.keys(), a.reply_timeout):
                row.notes.append("did not drain before the restart")
            broker.stop()
            flow.run(len(flow.order) + int(a.rate * a.down_s), _after(a.down_s, broker.start), deadline_s=600)
            if broker.pid is None:
                broker.start()
            flow.run(a.queries, deadline_s=a.queries / a.rate + 300)
            flow.score(row, a.reply_timeout)
        job.stop(row)
        text = job.proc.text()
        row.notes.append("recreated topics noticed" if "was recreated" in text else "NO recreation logged")
    return row


def scenario_fuzz(a: argparse.Namespace, ctx: dict) -> Row:
    n_valid = max(1, a.fuzz // 5)
    row = Row("fuzz", faults=f"{a.fuzz:,} hostile messages ({len(HOSTILE_KINDS)} kinds) interleaved with "
                             f"{n_valid:,} valid queries")
    max_bytes = 64 << 10
    hostile = hostile_messages(a.fuzz, dim=ctx["dim"], max_bytes=max_bytes, max_k=100, queries_topic="fuzz-q",
                               seed=a.seed)
    with ControllableBroker() as broker:
        job = Job(broker, ctx["v1"], ctx["dir"], "fuzz", "--max-message-bytes", str(max_bytes),
                  "--max-k", "100").start()
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        topics_before = set(admin.list_topics(timeout=10).topics)
        with StreamClient(broker.bootstrap, job.queries, job.replies) as client:
            job.wait_serving(client, ctx["work"], a.reply_timeout)
            flow = Flow(client, ctx["work"], a.rate, "fuzz")
            raw = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5, "message.max.bytes": 8 << 20,
                            "queue.buffering.max.kbytes": 1 << 20})
            for h in hostile:
                if h.reply_id:
                    client.track(h.reply_id)
            per_valid = len(hostile) / n_valid
            state = {"next": 0}

            def tick(n: int) -> None:  # after each valid query, the hostile messages due by then
                due = min(len(hostile), int(n * per_valid))
                for h in hostile[state["next"]:due]:
                    while True:
                        try:
                            raw.produce(job.queries, h.value, h.key, **h.produce_kwargs)
                            break
                        except BufferError:
                            raw.poll(0.05)
                state["next"] = due
                raw.poll(0)

            flow.rate = a.rate / (1 + per_valid)  # the same message rate as the other scenarios
            flow.run(n_valid, tick, deadline_s=(a.fuzz + n_valid) / a.rate + 300)
            tick(n_valid)
            raw.flush(60)
            flow.score(row, a.reply_timeout)
            expected = {h.reply_id: h for h in hostile if h.reply_id}
            got = client.collect(list(expected), a.reply_timeout)
            bad = [cid for cid, h in expected.items() if cid in got and (
                got[cid].result.status != "error" or got[cid].result.error_code not in h.codes)]
            row.sent += len(hostile)
            row.answered += len(got)
            row.wrong += len(bad)
            dead = _read_all(broker.bootstrap, job.dlq, len(hostile), a.reply_timeout)
            codes = [decode_dead_letter(v)["error_code"] for v in dead]
            row.dead_lettered = len(dead)
            row.lost += len(expected) - len(got) + max(0, len(hostile) - len(dead))
            row.notes.append(f"{len(expected):,} error replies expected, {len(got):,} came; "
                             f"{len(hostile) - len(expected):,} dead-letter only")
            if bad:
                row.notes.append(f"{len(bad)} hostile ones answered wrongly, e.g. {bad[:3]}")
            if len(codes) != len(hostile):
                row.notes.append(f"dead letters: {len(codes)} of {len(hostile)}")
            row.notes.append(f"max batch {max((m['records'] for m in job.batch_metrics()), default=0)} records")
            created = set(admin.list_topics(timeout=10).topics) - topics_before
            row.wrong += len(created)
            row.notes.append(f"topics created by senders: {len(created)}" + (f" ({sorted(created)[:5]})"
                                                                            if created else ""))
        job.stop(row)
    return row


def scenario_upgrade(a: argparse.Namespace, ctx: dict) -> Row:
    row = Row("upgrade", faults="new index version published mid-stream, then a corrupt one")
    root = ctx["dir"] / "upgrade-index"
    for name in ("v1", "v2"):  # copies: a version symlinked from outside the pointer's directory is refused
        shutil.copytree(ctx[name], root / name)
    (root / "CURRENT").write_text("v1\n")
    with ControllableBroker() as broker:
        job = Job(broker, root, ctx["dir"], "upgrade").start()
        with StreamClient(broker.bootstrap, job.queries, job.replies) as client:
            job.wait_serving(client, ctx["work"], a.reply_timeout)
            flow = Flow(client, ctx["work"], a.rate, "upgrade")
            marks: dict[str, int] = {}

            def publish(n: int) -> None:
                if "v2" not in marks and n >= a.queries * 0.3:
                    marks["v2"] = n
                    _point(root, "v2")
                if "v3" not in marks and n >= a.queries * 0.7:
                    marks["v3"] = n
                    shutil.copytree(root / "v2", root / "v3")
                    with open(next((root / "v3").rglob("signals.npy")), "r+b") as f:
                        f.seek(256)
                        f.write(b"\xff" * 64)
                    _point(root, "v3")

            flow.run(a.queries, publish, deadline_s=a.queries / a.rate + 300)
            flow.score(row, a.reply_timeout)
            versions = [client.replies[c].result.index_version if c in client.replies else None for c in flow.order]
            seen = [v for v in versions if v is not None]
            switches = sum(1 for x, y in itertools.pairwise(seen) if x != y)
            v1, v2 = ctx["versions"]
            after_v3 = {versions[i] for i in range(marks.get("v3", len(versions)), len(versions))} - {None}
            row.notes.append(f"answered by v1: {seen.count(v1):,}, v2: {seen.count(v2):,}; version switches {switches}")
            if switches != 1 or after_v3 - {v2}:
                row.wrong += 1
                row.notes.append(f"versions not monotone or corrupt one served: {after_v3}")
        job.stop(row)
        metrics = job.batch_metrics()
        refused = max((m.get("index_refused", 0) for m in metrics), default=0)
        row.notes.append(f"corrupt version refused {refused}x" + (
            " (logged)" if "refusing new index version" in job.proc.text() else " (NOT logged)"))
    return row


def _after(seconds: float, action: Callable[[], object]) -> Callable[[int], None]:
    """A tick that runs ``action`` once, ``seconds`` after it is made."""
    at, done = time.monotonic() + seconds, []

    def tick(_n: int) -> None:
        if not done and time.monotonic() >= at:
            done.append(action())

    return tick


def _point(root: Path, name: str) -> None:
    (root / "CURRENT.tmp").write_text(name + "\n")
    (root / "CURRENT.tmp").replace(root / "CURRENT")


def _read_all(bootstrap: str, topic: str, n: int, timeout: float) -> list[bytes]:
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "fault-injection", "enable.auto.commit": False,
                  "enable.partition.eof": True, "fetch.message.max.bytes": 8 << 20})
    parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        for m in c.consume(1000, 0.2):
            if m.error() is None:
                out.append(m.value())
            elif m.error().code() != KafkaError._PARTITION_EOF:
                log.warning("reading %s: %s", topic, m.error())
    c.close()
    return out


# ---- main ---------------------------------------------------------------------------------------------
def prepare(a: argparse.Namespace, work_dir: Path) -> dict:
    t0 = time.monotonic()
    ids, _, signals = generate(0, a.index_size + a.index_size // 5, SynthConfig(seed=a.seed))
    ids, signals = list(ids), np.asarray(signals, np.float32)
    n1 = a.index_size
    cfg = BuildConfig(n_references=64, seed=a.seed)
    v1 = build_index(ids[:n1], signals[:n1], work_dir / "index-v1", cfg, sampling_rate=250.0)
    v2 = build_index(ids, signals, work_dir / "index-v2", cfg, sampling_rate=250.0)
    work = Workload(ids[:n1], signals[:n1], n_distinct=min(500, a.queries), seed=a.seed)
    versions = (SearchIndex.load(v1).version, SearchIndex.load(v2).version)
    work.add_version(versions[0], ids[:n1], signals[:n1])
    work.add_version(versions[1], ids, signals)
    log.info("indexes of %d and %d synthetic signals built in %.0f s", n1, len(ids), time.monotonic() - t0)
    return {"v1": Path(v1), "v2": Path(v2), "work": work, "versions": versions, "dim": signals.shape[1],
            "dir": work_dir}


def table(rows: list[Row]) -> str:
    head = ("| scenario | injected faults | queries sent | answered | lost | duplicated | wrong | dead-lettered "
            "| peak RSS (MiB) | seconds | notes |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r.scenario} | {r.faults} | {r.sent:,} | {r.answered:,} | {r.lost:,} | {r.duplicated:,} "
                     f"| {r.wrong:,} | {r.dead_lettered:,} | {r.peak_rss_mib:,.0f} | {r.seconds:.0f} "
                     f"| {'; '.join(r.notes)} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated subset of " + ", ".join(SCENARIOS))
    p.add_argument("--queries", type=int, default=10_000, help="valid queries per scenario; default: %(default)s")
    p.add_argument("--fuzz", type=int, default=10_000, help="hostile messages in 'fuzz'; default: %(default)s")
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs in 'kill'; default: %(default)s")
    p.add_argument("--rate", type=float, default=200.0, help="messages per second; default: %(default)s")
    p.add_argument("--pause-s", type=float, default=8.0, help="broker frozen this long; default: %(default)s")
    p.add_argument("--down-s", type=float, default=5.0, help="broker down this long; default: %(default)s")
    p.add_argument("--index-size", type=int, default=2000, help="signals in index v1; default: %(default)s")
    p.add_argument("--reply-timeout", type=float, default=300.0, help="seconds to wait for the last replies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="kept when given (logs, metrics); default: temp")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table (and the command) here")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        build_parser().error(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    if a.kills < 1 or a.queries < 10 or a.fuzz < len(HOSTILE_KINDS):
        build_parser().error("need --kills >= 1, --queries >= 10, --fuzz >= the number of hostile kinds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("streaming.client.librdkafka", "streaming.broker.admin", "streaming.client"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)  # outages are intended here: no reconnect noise
    work_dir = a.workdir or Path(tempfile.mkdtemp(prefix="ecg-faults-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = prepare(a, work_dir)
    run = {"kill": scenario_kill, "outage": scenario_outage, "fuzz": scenario_fuzz, "upgrade": scenario_upgrade}
    rows = []
    for name in only:
        log.info("scenario %s ...", name)
        t0 = time.monotonic()
        try:
            row = run[name](a, ctx)
        except Exception as e:  # report and go on: one broken scenario must not hide the others
            log.exception("scenario %s failed", name)
            row = Row(name, faults="(scenario failed)", lost=-1, notes=[f"{type(e).__name__}: {e}"])
        row.seconds = time.monotonic() - t0
        rows.append(row)
        log.info("%s", table([row]))
    out = table(rows)
    print(out)
    if a.markdown:
        args = list(argv if argv is not None else sys.argv[1:])
        if "--workdir" in args:  # where the logs went is no part of the recipe
            i = args.index("--workdir")
            del args[i:i + 2]
        cmd = "python tools/fault_injection.py " + " ".join(args)
        a.markdown.parent.mkdir(parents=True, exist_ok=True)
        a.markdown.write_text(_markdown(cmd.strip(), out, a, max(r.peak_rss_mib for r in rows)))
    if a.workdir is None and all(r.ok for r in rows):
        shutil.rmtree(work_dir, ignore_errors=True)
    else:
        print(f"\nlogs, metrics and checkpoints kept in {work_dir}")
    return 0 if all(r.ok for r in rows) else 1


def _markdown(cmd: str, out: str, a: argparse.Namespace, peak_mib: float) -> str:
    return f"""# Fault injection: results

Regenerate with (about 10 minutes on a busy 2-core machine; `--help` for smaller runs):

```
.venv/bin/{cmd}
```

Run on {time.strftime('%Y-%m-%d')} against the embedded broker (Tansu), `python -m streaming serve` as a
child process with default settings (local[2], at most 2,000 queries per micro-batch), an index of
{a.index_size:,} synthetic ECG windows (v2: {a.index_size + a.index_size // 5:,}), exact-mode queries in all four
metrics at {a.rate:g} messages/s, each answer checked against a numpy brute force.

{out}

## Reading the table

- *queries sent*: valid queries (plus, for fuzz, the hostile messages). *answered*: distinct correlation
  ids that got a reply. *lost*: a query that never got its reply (for fuzz also a hostile message without
  its dead letter). *duplicated*: extra replies, the at-least-once price after a kill (a replayed
  micro-batch); each was checked identical to the first. *wrong*: an answer that is not the exact top-{K}
  of the index version it names, a hostile message answered with anything but its error code, two
  different answers to one query, or (upgrade) versions that went back and forth or a corrupt version
  that served. *peak RSS*: the sum over the job's processes (Python driver, JVM, Spark's Python source
  runner and workers), sampled every 0.5 s.
- **kill**: the job is SIGKILLed at random moments while queries flow (the first time only its Python
  driver, whose JVM then fails its batch and exits; then its whole process group, like a crashed
  container) and restarted from the same checkpoint each time. Queries sent while it is down wait in
  Kafka.
- **outage**: the broker is first frozen (SIGSTOP: connections hang, its log is kept) for four times the
  job's `message.timeout.ms`, so replies being delivered time out and are retried, then restarted.
  Tansu keeps topics in memory, so the restart brings every topic back empty under a new topic id; the
  job re-creates its topics, its source notices the new ids ("recreated topics noticed": the log line
  `topic ... was recreated`) and reads the new logs from offset 0, and the clients' queries sent during the
  downtime are retried by their producer. Because a memory-only broker loses what it holds, the run
  drains the queries sent before the restart first; losses would then be the job's.
- **fuzz**: {len(HOSTILE_KINDS)} kinds of hostile message (random bytes, truncated Avro, valid Avro of another
  schema or an unknown one, a query body without header, wrong lengths, NaN/inf, finite samples beyond
  +-1e12, k huge/negative/zero, unknown metric and mode, a 10,000-character metric, empty, tombstone,
  oversize, over-long correlation id, NaN threshold, illegal, reserved, internal (`__consumer_offsets`)
  or fresh reply topics, trailing bytes, invalid UTF-8, an array block claiming 2^40 floats, keyless
  garbage, garbage under a 1 MiB key) with hostile Kafka metadata (CreateTime at both ends of the
  representable range and beyond it, -1 and 2^63-1; every seventh record with 50 binary headers of
  10 KB) mixed with valid queries. Those whose correlation id is readable get an error reply; all get a
  dead letter; a topic created by anything a sender wrote counts as *wrong*.
- **upgrade**: a new index version is published by replacing the `CURRENT` pointer at 30 % of the run,
  a corrupt one (checksum mismatch) at 70 %: exactly one switch of versions, and the corrupt one refused
  (counted in `index_refused`, logged) while the previous one keeps answering.
- Memory: the job's peak stayed at or below {peak_mib:,.0f} MiB in every scenario, over {a.queries:,} queries
  each. The largest part is the JVM, whose heap is capped by `spark.driver.memory` (1 GiB by
  default; RSS adds metaspace, code and thread stacks); the Python driver and Spark's source runner hold at
  most a couple of micro-batches (`--max-queries-per-batch`, `--max-batch-bytes`). RSS is summed over the
  processes, so pages they share are counted more than once.
"""


if __name__ == "__main__":
    sys.exit(main())
