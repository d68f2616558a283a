"""Worker processes die with the process that started them, even when it is killed with -9: a
node killed mid-proof must leave no ezkl worker proving for no one (seen: orphaned workers piling
up after mesh tests killed their nodes), a coordinator no verifier writing beside its successor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_an_ezkl_worker_dies_with_its_parent_killed_with_sigkill() -> None:
    code = (
        "import os, time\n"
        "from verimesh.zk.ezkl_backend import ZkProver\n"
        "prover = ZkProver()\n"
        "print(prover._executor().submit(os.getpid).result(timeout=120), flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        assert worker != parent.pid and _alive(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        end = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _alive(worker), "the ezkl worker outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
