"""ServeProcess finds every process of a serve, including those that left its process group."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from devtools.processes import ServeProcess

# a parent (new session, like serve) whose child moves to a process group of its own, as Spark's
# Python worker daemon does; the child prints its pid, then both sleep
_TREE = """
import os, sys, time
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    print(os.getpid(), flush=True)
    time.sleep(30)
    os._exit(0)
time.sleep(30)
"""


def test_pids_include_descendants_in_other_process_groups(tmp_path: Path) -> None:
    serve = ServeProcess([], tmp_path / "log")
    serve.proc = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, text=True,
                                  start_new_session=True)
    try:
        child = int(serve.proc.stdout.readline())
        pids = serve.pids()
        assert serve.proc.pid in pids and child in pids
        assert serve.rss_by_role().get("workers", 0) > 0  # the child is neither driver, JVM nor source
    finally:
        serve.kill()
    deadline = time.monotonic() + 10
    while serve.pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not serve.pids()
