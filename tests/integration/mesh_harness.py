"""The live-mesh test harness: a coordinator process on a free loopback port and the node
processes started beside it (tests/integration/test_mesh*.py, test_dashboard.py)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import input_path, model_path
from verimesh.ledger.store import Ledger
from verimesh.signing.keys import generate_key, load_public_key, load_secret_key, write_key_pair

HEARTBEAT_TIMEOUT = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "verimesh", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


class Mesh:
    """A coordinator process in ``root`` and the node processes started beside it."""

    def __init__(self, root: Path, *, max_upload_mb: int = 512, extra: tuple[str, ...] = (),
                 settings: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.extra = extra
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = f"sqlite:///{root / 'mesh.db'}"
        self.max_upload_mb = max_upload_mb
        for name in ("op", "owner", "honest", "other", "third"):
            write_key_pair(root / f"{name}.key", generate_key())
        if settings is not None:  # a ledger with these settings, before the coordinator opens it
            Ledger.create(self.db, load_secret_key(root / "op.key"), settings=settings)
        self.coordinator: subprocess.Popen[str] | None = None
        self.procs: list[subprocess.Popen[str]] = []
        self.start()

    def start(self) -> None:
        log = open(self.root / "serve.log", "a")
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "verimesh", "serve", "--ledger", self.db, "--operator-key", "op.key",
             "--port", str(self.port), "--heartbeat-timeout", f"{HEARTBEAT_TIMEOUT}s",
             "--max-upload-mb", str(self.max_upload_mb), *self.extra],
            cwd=self.root, stdout=log, stderr=log, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        end = time.monotonic() + 120  # a coordinator with --verifiers ray starts its cluster first
        while time.monotonic() < end:
            try:
                if httpx.get(self.url + "/v1/info", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("the coordinator did not start: " + (self.root / "serve.log").read_text())

    def kill_coordinator(self) -> None:
        assert self.coordinator is not None
        self.coordinator.send_signal(signal.SIGKILL)
        self.coordinator.wait(timeout=10)

    def node(self, key: str, *extra: str) -> subprocess.Popen[str]:
        log = open(self.root / f"{key}.log", "a")
        proc = subprocess.Popen(
            [sys.executable, "-m", "verimesh", "node", "run", "--coordinator", self.url, "--key", f"{key}.key",
             "--heartbeat", "0.5", "--poll", "0.2", *extra],
            cwd=self.root, stdout=log, stderr=log, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def cheater(self, strategy: str = "perturb-final") -> subprocess.Popen[str]:
        """One cheating node daemon (`verimesh redteam --mesh`, key in rk/cheater-0.key), up and
        registered when this returns; its output is piped."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "verimesh", "redteam", "--mesh", self.url, "--strategy", strategy,
             "--nodes", "1", "--keys-dir", "rk", "--idle-exit", "30"],
            cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.procs.append(proc)
        self.wait_for(lambda: (self.root / "rk" / "cheater-0.key.pub").exists() and self.status()["nodes"],
                      "the cheater")  # fmt: skip
        return proc

    def python(self, code: str) -> subprocess.Popen[str]:
        """A node written against the Python API (a node that hangs mid-task, say)."""
        log = open(self.root / "python.log", "a")
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=self.root, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, text=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def submit(self, *extra: str, model: str = "mlp") -> subprocess.CompletedProcess[str]:
        return _cli("submit", model_path(model), "--input", input_path(model), "--coordinator", self.url,
                    "--key", "owner.key", "--json", *extra, cwd=self.root, timeout=180)  # fmt: skip

    def status(self, job_id: str | None = None) -> Any:
        return httpx.get(self.url + (f"/v1/jobs/{job_id}" if job_id else "/v1/status"), timeout=10).json()

    def wait_for(self, predicate: Any, what: str, timeout: float = 120) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}: {json.dumps(self.status(), indent=1)[:3000]}")

    def ledger_kinds(self, node_id: str | None = None) -> list[str]:
        ledger = Ledger.open(self.db)
        return [e.kind for e in ledger.entries(node_id=node_id)] if node_id else [e.kind for e in ledger.entries()]

    def close(self) -> None:
        for proc in [*self.procs, self.coordinator]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)


def _node_id(mesh: Mesh, name: str) -> str:
    return load_public_key(mesh.root / f"{name}.key.pub").node_id
