"""Replicas over the live mesh: a whole job run by R distinct nodes, each answer spot-checked
(agreement never stands in for it), agreeing answers settled by the quorum, a disagreement
settled by a referee that verifies every answer in full, slashes the failing ones and accepts a
passing one. The receipt and the status view say who decided."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from tests.conftest import input_path, model_path
from tests.integration.mesh_harness import Mesh, _cli, _free_port, _node_id
from verimesh.assurance.mesh_redteam import cheat_hook
from verimesh.jobs.job import Job
from verimesh.ledger.store import Ledger
from verimesh.mesh import Client, Coordinator, Node
from verimesh.mesh.owner import collect, submit
from verimesh.signing.keys import generate_key, load_public_key, load_secret_key, write_key_pair
from verimesh.subtasks.receipt import check_receipt, load_receipt

pytestmark = pytest.mark.slow


def test_replicas_agree_and_the_quorum_decides_after_each_spot_check(mesh: Mesh) -> None:
    """Three replicas: a cheater among the first nodes is caught by its own spot check (slashed,
    excluded, its replica redone by another node); the three accepted answers agree and the
    quorum decides; each replica's node is paid once."""
    cheater = subprocess.Popen(
        [sys.executable, "-m", "verimesh", "redteam", "--mesh", mesh.url, "--strategy", "perturb-final",
         "--nodes", "1", "--keys-dir", "rk", "--idle-exit", "30"],
        cwd=mesh.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    mesh.procs.append(cheater)
    mesh.wait_for(lambda: mesh.status()["nodes"], "the cheater to register")
    for name in ("honest", "other"):
        mesh.node(name)
    refused = mesh.submit("--replicas", "3", "--segments", "2")
    assert refused.returncode == 2 and "--segments" in refused.stderr
    sent = mesh.submit("--replicas", "3")
    assert sent.returncode == 0, sent.stderr
    job_id = json.loads(sent.stdout)["job_id"]

    def caught() -> bool:
        return any(h["outcome"].startswith("rejected and slashed") for t in mesh.status(job_id)["tasks"]
                   for h in t["history"])  # fmt: skip

    mesh.wait_for(caught, "the cheater's spot check", timeout=120)
    mesh.node("third")  # honest and other hold a replica each: the cheater's goes to a third node
    doc = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "done" and d, "the quorum", timeout=150)
    cheater_id = load_public_key(mesh.root / "rk" / "cheater-0.key.pub").node_id
    assert doc["replicas"] == 3 and [t["replica"] for t in doc["tasks"]] == [0, 1, 2]
    honest = {_node_id(mesh, n) for n in ("honest", "other", "third")}
    assert {t["node_id"] for t in doc["tasks"]} == honest
    assert all(t["state"] == "done" and t["verdict"]["decided_by"] == "quorum" for t in doc["tasks"])
    history = [h for t in doc["tasks"] for h in t["history"]]
    assert any(h["node_id"] == cheater_id and h["outcome"].startswith("rejected and slashed") for h in history)
    with Client(mesh.url, load_secret_key(mesh.root / "owner.key")) as owner:
        collected = collect(owner, job_id, mesh.root / "q", verifier_key=load_public_key(mesh.root / "op.key.pub"))
    receipt = load_receipt(Path(collected["receipt"]))
    sub = receipt["receipt"]["subtasks"][0]
    assert sub["decided_by"] == "quorum" and [r["verdict"] for r in sub["replicas"]] == ["accept"] * 3
    assert {r["node_id"] for r in sub["replicas"]} == honest
    assert check_receipt(receipt, [load_public_key(mesh.root / "op.key.pub")]).ok
    checked = _cli("receipt", "check", str(collected["receipt"]), "--verifier-key", "op.key.pub", cwd=mesh.root)
    assert checked.returncode == 0, checked.stderr
    for node_id in honest:
        assert mesh.ledger_kinds(node_id).count("reward") == 1
    assert "slash" in mesh.ledger_kinds(cheater_id) and "reward" not in mesh.ledger_kinds(cheater_id)
    shown = _cli("status", "--coordinator", mesh.url, job_id, cwd=mesh.root)
    assert shown.returncode == 0 and "replica 2" in shown.stdout and "decided by: quorum" in shown.stdout
    # A receipt that claims a quorum over a replica that was not accepted does not hold.
    forged = json.loads(json.dumps(receipt))
    forged["receipt"]["subtasks"][0]["replicas"][1]["verdict"] = "reject"
    assert not check_receipt(forged, [load_public_key(mesh.root / "op.key.pub")]).ok


class _Served:
    """An in-process coordinator on a free loopback port (uvicorn in a thread)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(coordinator.app(), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on", access_log=False)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end, "the coordinator did not start"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class _SpotMisses(Coordinator):
    """A coordinator whose spot check of the listed nodes re-runs only the mandatory last step:
    what a high audit level does to a node with a long honest streak. The cheater's perturbed
    intermediate step then passes its spot check, and only the quorum can notice."""

    lenient: frozenset[str] = frozenset()

    def _spot_samples(self, node_id: str, job: Job) -> int:
        return 0 if node_id in self.lenient else super()._spot_samples(node_id, job)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[_SpotMisses, _Served]]:
    op = generate_key()
    write_key_pair(tmp_path / "op.key", op)
    coordinator = _SpotMisses(f"sqlite:///{tmp_path / 'mesh.db'}", op, isolate=False, heartbeat_timeout=30)
    serving = _Served(coordinator)
    try:
        yield coordinator, serving
    finally:
        serving.close()


def _wait(predicate: Any, what: str, timeout: float = 90) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_disagreement_calls_the_referee_which_slashes_the_wrong_replica(
    served: tuple[_SpotMisses, _Served], tmp_path: Path
) -> None:
    coordinator, serving = served
    honest_key, cheat_key, owner_key = generate_key(), generate_key(), generate_key()
    coordinator.lenient = frozenset({cheat_key.node_id})
    honest = Node(serving.url, honest_key, isolate=False)
    cheat = Node(serving.url, cheat_key, isolate=False,
                 on_bundle=cheat_hook("perturb-intermediate", cheat_key, random.Random(7)))  # fmt: skip
    owner = Client(serving.url, owner_key)
    try:
        sent = submit(owner, model_path("transformer"), input_path("transformer"), replicas=2)
        cheat.join()
        assert cheat.run_one()
        first = _wait(lambda: (t := coordinator.state.job(sent.job_id)["tasks"][0])["state"] == "done" and t,
                      "the cheat's spot check")  # fmt: skip
        assert first["node_id"] == cheat_key.node_id  # it passed: only the last step was re-run
        honest.join()
        assert honest.run_one()
        doc = _wait(lambda: (d := owner.status(sent.job_id))["state"] == "done" and d, "the referee")
        by_node = {t["node_id"]: t for t in doc["tasks"]}
        assert by_node[honest_key.node_id]["state"] == "done"
        assert by_node[honest_key.node_id]["verdict"]["decided_by"] == "referee"
        assert by_node[cheat_key.node_id]["state"] == "rejected"
        assert by_node[cheat_key.node_id]["history"][-1]["outcome"].startswith("rejected by the referee and slashed")
        ledger = Ledger.open(coordinator.ledger.url)
        assert [e.kind for e in ledger.entries(node_id=cheat_key.node_id, kinds=["slash"])] == ["slash"]
        assert [e.kind for e in ledger.entries(node_id=cheat_key.node_id, kinds=["reward"])] == []
        assert [e.kind for e in ledger.entries(node_id=honest_key.node_id, kinds=["reward"])] == ["reward"]
        assert coordinator.state.node(cheat_key.node_id)["banned"]
        assert coordinator.state.node(honest_key.node_id)["banned"] is None
        collected = collect(owner, sent.job_id, tmp_path / "out", verifier_key=coordinator.operator.public)
        sub = load_receipt(Path(collected["receipt"]))["receipt"]["subtasks"][0]
        assert sub["decided_by"] == "referee" and sub["node_id"] == honest_key.node_id
        assert {r["node_id"]: r["verdict"] for r in sub["replicas"]} == {cheat_key.node_id: "reject",
                                                                        honest_key.node_id: "accept"}  # fmt: skip
    finally:
        for closing in (honest, cheat, owner):
            closing.close()


def test_a_quorum_cut_short_after_the_ledger_wrote_repeats_without_paying_twice(
    served: tuple[_SpotMisses, _Served], tmp_path: Path
) -> None:
    """The ledger settles each replica before the mesh records the decision; a crash between the
    two (here: the mesh's transaction fails once) leaves the last replica verifying, and the
    decision is taken again: the same verdicts, no second reward."""
    coordinator, serving = served
    keys = [generate_key(), generate_key()]
    real = coordinator.state.decide_replicas
    crashed: list[bool] = []

    def crash_once(job_id: str, decisions: Any, finish: Any) -> None:
        if finish is not None and not crashed:
            crashed.append(True)
            raise RuntimeError("the coordinator died here")
        real(job_id, decisions, finish)

    coordinator.state.decide_replicas = crash_once  # type: ignore[method-assign]
    nodes = [Node(serving.url, key, isolate=False) for key in keys]
    owner = Client(serving.url, generate_key())
    try:
        sent = submit(owner, model_path("mlp"), input_path("mlp"), replicas=2)
        for node in nodes:
            node.join()
            assert node.run_one()
        doc = _wait(lambda: (d := owner.status(sent.job_id))["state"] == "done" and d, "the quorum")
        assert crashed and all(t["verdict"]["decided_by"] == "quorum" for t in doc["tasks"])
        ledger = Ledger.open(coordinator.ledger.url)
        for key in keys:
            settled = [e.kind for e in ledger.entries(node_id=key.node_id, kinds=["verdict", "reward"])]
            assert settled == ["verdict", "reward"]
        collected = collect(owner, sent.job_id, tmp_path / "out", verifier_key=coordinator.operator.public)
        assert load_receipt(Path(collected["receipt"]))["receipt"]["subtasks"][0]["decided_by"] == "quorum"
    finally:
        for closing in (*nodes, owner):
            closing.close()


def _drifted(job: Job, key: Any, out: Path, step: int = 2) -> None:
    """An answer that passes a full verification yet drifts: step ``step``'s output nudged inside
    its tolerance along the direction the rest of the model amplifies most, every later step
    computed exactly from it (the largest such nudge that still verifies with samples=all)."""
    import numpy as np

    from verimesh.jobs.runtime import StepRunner
    from verimesh.spot.spotcheck import run_steps
    from verimesh.workflows import seal_trace, verify

    runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
    models = job.read_step_models()
    honest = run_steps(job, models, job.read_input(), runner)
    name, final = job.steps[step].outputs[0], job.output_names[0]
    base = honest[name].astype(np.float64)

    def downstream(value: np.ndarray) -> dict[str, np.ndarray]:
        trace = {**honest, name: value.astype(honest[name].dtype)}
        for later in job.steps[step + 1 :]:
            trace.update(runner.run(later.digest, models[later.index], {n: trace[n] for n in later.inputs},
                                    later.outputs))  # fmt: skip
        return trace

    eps = 1e-2 * (np.linalg.norm(base) / np.sqrt(base.size) + 1e-3)
    f0 = downstream(base)[final].astype(np.float64).ravel()
    jac = np.stack([(downstream(base + eps * np.eye(base.size)[j].reshape(base.shape))[final].ravel() - f0) / eps
                    for j in range(base.size)], axis=1)  # fmt: skip
    direction = np.linalg.svd(jac)[2][0].reshape(base.shape)
    tol = job.policy.tolerance_for(step)
    cap = 0.95 * (tol.atol + tol.rtol * np.abs(base))
    lo, hi, best = 0.0, 1e-3 * float(np.linalg.norm(base)), None
    for i in range(16):
        mid = (lo + hi) / 2
        candidate = out.with_name(f"drift-{i}.vmb")
        seal_trace(job, downstream(base + np.clip(mid * direction, -cap, cap)), key=key, runner=runner, out=candidate)
        if verify(candidate, job=job, node_key=key.public, samples="all", seed=1).status == "accept":
            lo, best = mid, candidate.read_bytes()
        else:
            hi = mid
    assert best is not None
    out.write_bytes(best)


def test_the_referee_takes_the_answer_nearest_its_own_run_not_the_first(
    served: tuple[_SpotMisses, _Served], tmp_path: Path
) -> None:
    """A drifting answer passes every step's check (its drift stays inside each step's tolerance)
    but disagrees with the honest ones: the referee verifies all three in full, all pass, and it
    hands out the answer closest to its own run of the model, never replica 0's by position."""
    coordinator, serving = served
    drift_key, keys = generate_key(), [generate_key(), generate_key()]
    drifter = Node(serving.url, drift_key, isolate=False,
                   on_bundle=lambda bundle, job: _drifted(job, drift_key, bundle))  # fmt: skip
    nodes = [Node(serving.url, key, isolate=False) for key in keys]
    owner = Client(serving.url, generate_key())
    try:
        sent = submit(owner, model_path("transformer"), input_path("transformer"), replicas=3)
        drifter.join()
        assert drifter.run_one()  # the first to ask: replica 0
        for node in nodes:
            node.join()
            assert node.run_one()
        doc = _wait(lambda: (d := owner.status(sent.job_id))["state"] == "done" and d, "the referee", timeout=120)
        first = next(t for t in doc["tasks"] if t["replica"] == 0)
        assert first["node_id"] == drift_key.node_id and first["verdict"]["decided_by"] == "referee"
        assert first["verdict"]["distance_to_referee"] > 1e-4
        collected = collect(owner, sent.job_id, tmp_path / "out", verifier_key=coordinator.operator.public)
        sub = load_receipt(Path(collected["receipt"]))["receipt"]["subtasks"][0]
        assert sub["decided_by"] == "referee" and sub["node_id"] in {k.node_id for k in keys}
    finally:
        for closing in (drifter, *nodes, owner):
            closing.close()
