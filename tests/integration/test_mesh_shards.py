"""The path of a batch job that only a node with a streak can reach: a row whose cheat the check on
arrival misses (a trusted node has few steps checked) and the batch check then hits. The row is
slashed through its own evidence and redone alone by another node; the row settled before it
stays settled and is paid once; the job comes back done. The cheating node picks its cheat so the
operator's seeds (computed here with the operator's key, as only a test can) land that way."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import input_path, model_path
from tests.integration.mesh_harness import _cli, _node_id
from tests.integration.test_mesh_challenges import trusted_mesh
from verimesh.core.digest import sha256_bytes
from verimesh.jobs.job import Job
from verimesh.jobs.runtime import StepRunner
from verimesh.ledger.store import Ledger
from verimesh.mesh import Node
from verimesh.mesh.coordinator import Coordinator
from verimesh.mesh.state import MeshState
from verimesh.settlement import node_standing
from verimesh.signing.keys import load_secret_key
from verimesh.spot.spotcheck import derived_seed, run_steps, sample_steps, seeded_rng
from verimesh.workflows import seal_trace

pytestmark = pytest.mark.slow

CHEATED_STEP = 1  # a ReLU output: caught only when step 1 or (by the window) step 0 is sampled


def _caught(job: Job, samples: int, seed: int) -> bool:
    sampled = set(sample_steps(job, samples, seeded_rng(seed)))
    return CHEATED_STEP in sampled or CHEATED_STEP - 1 in sampled


def test_a_row_the_arrival_check_misses_and_the_batch_check_hits_is_slashed_and_redone_alone(tmp_path: Path) -> None:
    mesh = trusted_mesh(tmp_path, accepts=40, names=("honest", "other"))
    operator = types.SimpleNamespace(operator=load_secret_key(tmp_path / "op.key"))
    cheat_key = load_secret_key(tmp_path / "other.key")
    tries: list[int] = []

    def cheat(bundle: Path, job: Job) -> None:
        """Nudge step 1's output (the steps after it run from the nudged value) until the seed on
        arrival misses it and the batch's seed for this row hits it."""
        assert job.shard is not None and job.shard.index == 1
        ledger = Ledger.open(mesh.db)
        job_id = next(j["job_id"] for j in mesh.status()["jobs"])
        task_id = next(t["task_id"] for t in mesh.status(job_id)["tasks"] if t["position"] == 1)
        row0 = MeshState(ledger.engine).done_bundles(job_id)[0]
        samples = node_standing(ledger, cheat_key.node_id).samples_for(len(job.steps), job.policy.samples)
        runner = StepRunner(device="cpu")
        honest = run_steps(job, None, job.read_input(), runner)
        name = job.steps[CHEATED_STEP].outputs[0]
        for attempt in range(1, 400):
            trace = dict(honest)
            trace[name] = honest[name] + np.asarray(0.25 * attempt, dtype=honest[name].dtype)
            for later in job.steps[CHEATED_STEP + 1 :]:
                trace.update(runner.run(later.digest, job.read_step_model(later.index),
                                        {n: trace[n] for n in later.inputs}, later.outputs))  # fmt: skip
            seal_trace(job, trace, key=cheat_key, runner=runner, out=bundle)
            digest = sha256_bytes(bundle.read_bytes())
            on_arrival = Coordinator.seed_for(operator, task_id, digest)  # type: ignore[arg-type]
            batch = derived_seed(Coordinator.seed_for(operator, job_id, row0 + digest), 1)  # type: ignore[arg-type]
            if not _caught(job, samples, on_arrival) and _caught(job, samples, batch):
                tries.append(attempt)
                return
        raise AssertionError("no nudge lands the seeds as the test needs")

    cheater = Node(mesh.url, cheat_key, isolate=False, on_bundle=cheat)
    try:
        rows = np.load(model_path("mlp_batch").with_name("mlp_batch.rows.npz"))["input"][:2]
        np.savez(tmp_path / "batch.npz", input=rows)
        posted = _cli("submit", model_path("mlp_batch"), "--input", input_path("mlp_batch"), "--shards", "batch.npz",
                      "--coordinator", mesh.url, "--key", "owner.key", "--json", cwd=tmp_path)  # fmt: skip
        assert posted.returncode == 0, posted.stderr
        job_id = json.loads(posted.stdout)["job_id"]
        first = Node(mesh.url, load_secret_key(tmp_path / "honest.key"), isolate=False)
        first.join()
        assert first.run_one()  # row 0, spot-checked on arrival and waiting for the batch
        mesh.wait_for(lambda: mesh.status(job_id)["tasks"][0]["state"] == "done", "row 0 on arrival", 60)
        first.close()
        cheater.join()
        assert cheater.run_one() and tries  # row 1: passes on arrival, fails the batch check

        def batch_rejected() -> bool:
            return any("rejected with the batch" in h["outcome"] for h in mesh.status(job_id)["tasks"][1]["history"])

        mesh.wait_for(batch_rejected, "the batch check", 90)
        assert "slash" in mesh.ledger_kinds(cheat_key.node_id) and "reward" not in mesh.ledger_kinds(cheat_key.node_id)
        mesh.node("third")  # redoes row 1 alone
        done: Any = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "done" and d, "the redo", 120)
        assert [t["node_id"] for t in done["tasks"]] == [_node_id(mesh, "honest"), _node_id(mesh, "third")]
        for name in ("honest", "third"):  # each row paid once
            kinds = mesh.ledger_kinds(_node_id(mesh, name))
            assert kinds.count("reward") == 1 and "slash" not in kinds, (name, kinds)
    finally:
        cheater.close()
        mesh.close()
