"""``python -m streaming serve`` as a child process, for tests, tools and benchmarks (never the service).

:class:`ServeProcess` runs it in its own process group, so that a SIGKILL takes the Python driver, its
JVM and Spark's Python workers down together (a crashed container), and so that their memory can be
summed (:meth:`ServeProcess.rss_bytes`); :class:`RssSampler` samples that sum over a run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO


class ServeProcess:
    """``python -m streaming serve ARGS`` in its own process group, its output appended to ``log``."""

    def __init__(self, args: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.args = list(args)
        self.log = log
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def start(self) -> ServeProcess:
        self._out = open(self.log, "ab")
        self._out.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
        self._out.flush()
        self.proc = subprocess.Popen([sys.executable, "-m", "streaming", "serve", *self.args], cwd=self.cwd,
                                     env=self.env, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """Every live process of this serve: its process group (driver, JVM) and every descendant.

        Descendants too: Spark's Python worker daemon, which the JVM forks, moves itself and its
        workers into a process group of their own, and they hold most of a serving index's memory.
        """
        if self.proc is None:
            return []
        table: dict[int, tuple[int, int]] = {}  # pid -> (parent pid, process group), zombies left out
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()
                if fields[0] != "Z":
                    table[int(d.name)] = (int(fields[1]), int(fields[2]))
        root = self.proc.pid
        out = {pid for pid, (_, pgrp) in table.items() if pgrp == root}
        frontier = set(out) | {root}
        while frontier:
            frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - out
            out |= frontier
        return sorted(out)

    def rss_bytes(self) -> int:
        """Resident memory of the whole process group now (the sum over its processes)."""
        return sum(self.rss_by_role().values())

    def rss_by_role(self) -> dict[str, int]:
        """Resident memory now by role: ``driver``, ``jvm``, ``source`` (Spark's streaming source
        runner, where the Kafka reader lives) and ``workers`` (Spark's other Python workers)."""
        out: dict[str, int] = {}
        for pid in self.pids():
            try:
                rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:"))
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, StopIteration):
                continue
            role = ("driver" if self.proc is not None and pid == self.proc.pid else "jvm" if "java" in cmd
                    else "source" if "streaming_source_runner" in cmd else "workers")
            out[role] = out.get(role, 0) + rss
        return out

    def kill(self, *, driver_only: bool = False, drain_s: float = 20.0) -> None:
        """SIGKILL: every process of the serve, or only the Python driver (then its JVM must exit by itself)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if driver_only:
            self.proc.kill()
            self.proc.wait()
            deadline = time.monotonic() + drain_s
            while self.pids() and time.monotonic() < deadline:  # the JVM notices its parent is gone
                time.sleep(0.1)
        for pid in [*self.pids(), pgid]:  # the group, and descendants that left it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        deadline = time.monotonic() + drain_s
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._close()

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM and wait for a clean exit (SIGKILL of the group after ``timeout``); the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        rc = self.proc.returncode
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers, if any
        except ProcessLookupError:
            pass
        self._close()
        return rc

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class RssSampler:
    """Samples :meth:`ServeProcess.rss_bytes` every ``interval_s`` in a thread; keeps the peak."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self.peak_by_role: dict[str, int] = {}
        self.samples: list[tuple[float, int]] = []
        self.target: ServeProcess | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.interval_s):
            if self.target is not None and self.target.alive:
                by_role = self.target.rss_by_role()
                rss = sum(by_role.values())
                if rss > self.peak:
                    self.peak, self.peak_by_role = rss, by_role
                self.samples.append((time.monotonic() - t0, rss))
