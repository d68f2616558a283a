"""Bounded load on a live mesh (loopback only): 20 node daemons and 500 small jobs, none lost or
doubled. VERIMESH_LOAD_TASKS sets a smaller count for a quick local run."""

from __future__ import annotations

import os
import threading

import pytest

from tests.conftest import input_path, model_path
from tests.integration.mesh_harness import Mesh, _cli
from verimesh.jobs.job import new_job
from verimesh.ledger.store import Ledger
from verimesh.mesh import Node
from verimesh.mesh.client import Client, upload_job
from verimesh.signing.keys import generate_key, load_secret_key

pytestmark = pytest.mark.slow
LOAD_TASKS = int(os.environ.get("VERIMESH_LOAD_TASKS", "500"))
LOAD_NODES = 20


def test_load_twenty_nodes_five_hundred_tasks_none_lost_or_doubled(mesh: Mesh) -> None:
    """20 node daemons (threads here, one key each, proving in place) and 500 small jobs."""
    owner = Client(mesh.url, load_secret_key(mesh.root / "owner.key"))
    jobs = [
        new_job(model_path("mlp"), input_path("mlp"), mesh.root / "load" / f"j{i}" / "job.json")
        for i in range(LOAD_TASKS)
    ]
    for job in jobs:
        files = upload_job(owner, job.base_dir / "job.json", input_blob=job.resolve(job.input_path).read_bytes())
        owner.submit_job(job.canonical_bytes(), files=files, deposit=10, deadline=600, max_attempts=5)
    daemons = [Node(mesh.url, generate_key(), device="cpu", poll=0.1, heartbeat=0.5, threads=1, isolate=False)
               for _ in range(LOAD_NODES)]  # fmt: skip
    threads = [threading.Thread(target=d.run, kwargs={"idle_exit": 5.0}, daemon=True) for d in daemons]
    for t in threads:
        t.start()
    try:
        mesh.wait_for(lambda: mesh.status()["tasks"].get("done", 0) == LOAD_TASKS, "every task", timeout=900)
    finally:
        for d in daemons:
            d.stop()
        for t in threads:
            t.join(timeout=60)
        for d in daemons:
            d.close()
    status = mesh.status()
    assert status["tasks"] == {"done": LOAD_TASKS} and all(j["state"] == "done" for j in status["jobs"][:200])
    ledger = Ledger.open(mesh.db)
    rewarded = [e.event["job_id"] for e in ledger.entries(kinds=["reward"])]
    assert sorted(rewarded) == sorted(j.job_id for j in jobs)  # one reward per job: none lost, none doubled
    assert len({e.event["job_id"] for e in ledger.entries(kinds=["verdict"])}) == LOAD_TASKS
    assert _cli("ledger", "verify", "--ledger", mesh.db, "--rules", cwd=mesh.root, timeout=600).returncode == 0
