"""A real Spark standalone cluster on this machine (a master and N workers), for tests and tools only.

``local[2]`` runs every task in one JVM, so it cannot show that a task ran on another executor or
that an executor held only its own shard. :class:`StandaloneCluster` starts pyspark's bundled master
and workers (``bin/spark-class``) on loopback, each in its own process group so that stopping it takes
their JVMs and the executors they launched down together, and waits until every worker has registered.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def spark_class() -> Path:
    """pyspark's launcher script, bundled with the pip package."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent / "bin" / "spark-class"


class StandaloneCluster:
    """``with StandaloneCluster(workdir) as c: spark_session(c.master_url, conf=c.session_conf())``."""

    def __init__(self, workdir: Path, *, workers: int = 2, cores: int = 1, memory: str = "1g",
                 start_timeout_s: float = 90.0) -> None:
        self.workdir = Path(workdir)
        self.workers, self.cores, self.memory = workers, cores, memory
        self.start_timeout_s = start_timeout_s
        self.port, self.webui_port = free_port(), free_port()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    @property
    def master_url(self) -> str:
        return f"spark://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment of the master, the workers and hence their executors and Python workers."""
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "SPARK_LOCAL_IP": HOST, "PYSPARK_PYTHON": sys.executable, "PYTHONPATH": path,
                "PYARROW_IGNORE_TIMEZONE": "1"}

    def session_conf(self, executor_memory: str | None = None) -> dict[str, str]:
        """Conf for a driver on this machine: one executor per worker, Python workers that import the repo."""
        return {"spark.driver.host": HOST, "spark.driver.bindAddress": HOST,
                "spark.executor.cores": str(self.cores), "spark.cores.max": str(self.cores * self.workers),
                "spark.executor.memory": executor_memory or self.memory,
                "spark.executorEnv.PYTHONPATH": self.env()["PYTHONPATH"],
                "spark.executorEnv.PYSPARK_PYTHON": sys.executable}

    def __enter__(self) -> StandaloneCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> StandaloneCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        launcher = str(spark_class())
        try:
            self._spawn("master", [launcher, "org.apache.spark.deploy.master.Master", "--host", HOST,
                                   "--port", str(self.port), "--webui-port", str(self.webui_port)])
            self._wait(lambda s: s.get("status") == "ALIVE", "the master to come up")
            for i in range(self.workers):
                work = self.workdir / f"worker-{i}"
                work.mkdir(exist_ok=True)
                self._spawn(f"worker-{i}", [launcher, "org.apache.spark.deploy.worker.Worker", self.master_url,
                                            "--cores", str(self.cores), "--memory", self.memory, "--host", HOST,
                                            "--webui-port", str(free_port()), "--work-dir", str(work)])
            self._wait(lambda s: len(self.alive_workers(s)) >= self.workers, f"{self.workers} workers to register")
        except BaseException:
            self.stop()
            raise
        return self

    def state(self) -> dict:
        """The master's JSON status page (workers, applications)."""
        with urllib.request.urlopen(f"http://{HOST}:{self.webui_port}/json", timeout=5) as r:
            return json.loads(r.read())

    @staticmethod
    def alive_workers(state: dict) -> list[dict]:
        return [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]

    def stop(self) -> None:
        """SIGTERM each process group (JVM, executors, Python workers), SIGKILL what outlives 10 s."""
        for p in reversed(self._procs):
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self._procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait(timeout=5)
            _signal_group(p, signal.SIGKILL)  # executors the worker launched share its group
        for log in self._logs:
            log.close()
        self._procs, self._logs = [], []

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "ab")
        self._logs.append(log)
        self._procs.append(subprocess.Popen(argv, env=self.env(), cwd=self.workdir, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True))

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Spark process exited with {p.returncode} while waiting for {what}; "
                                       f"logs in {self.workdir}")
            try:
                if ready(self.state()):
                    return
            except OSError:
                pass  # web UI not listening yet
            time.sleep(0.5)
        raise TimeoutError(f"waited {self.start_timeout_s:.0f} s for {what}; logs in {self.workdir}")


def _signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_executors(spark, n: int, timeout_s: float = 60.0) -> list[str]:
    """Block until ``n`` executors (not counting the driver) have joined ``spark``; their host:port."""
    sc = spark.sparkContext
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        infos = sc._jsc.sc().statusTracker().getExecutorInfos()
        hosts = [f"{e.host()}:{e.port()}" for e in infos]
        if len(hosts) - 1 >= n:  # the driver is listed too
            return hosts
        time.sleep(0.5)
    raise TimeoutError(f"only {len(hosts) - 1} of {n} executors joined in {timeout_s:.0f} s")
