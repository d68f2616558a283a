"""Generate jobs over a live mesh: the owner's decoder and prompt travel with the job (the model
from wherever the owner keeps it), a node decodes, the coordinator checks every generated
position with one prefill pass and settles; a steered answer (one token the node chose, the rest
generated on from it) is slashed and its task redone by another node; the owner's verified
answer is the model's own greedy answer; what a generate job cannot be is refused in one line."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FIXTURES
from tests.integration.mesh_harness import Mesh, _cli, _node_id
from verimesh.assurance.mesh_redteam import MESH_STRATEGIES, cheat_hook
from verimesh.jobs.generate_job import new_generate_job
from verimesh.mesh import Node
from verimesh.mesh.client import Client, MeshError
from verimesh.mesh.owner import Generation, submit
from verimesh.signing.keys import generate_key, load_secret_key
from verimesh.workflows import Worker, committed_outputs, verify

pytestmark = pytest.mark.slow

LM, PROMPT = FIXTURES / "lm.onnx", FIXTURES / "lm.prompt.json"
TOKENS = 12


def _owner(mesh: Mesh, *extra: str | Path) -> list[str | Path]:
    return ["submit", LM, "--input", PROMPT, "--mode", "generate", "--max-new-tokens", str(TOKENS),
            "--coordinator", mesh.url, "--key", "owner.key", "--json", *extra]  # fmt: skip


def test_a_generate_job_is_decoded_on_a_node_and_every_position_checked(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path)
    key = load_secret_key(tmp_path / "other.key")

    # What this node ships: the red team's steered answer (`redteam --mesh --strategy perturb-intermediate`).
    cheat = Node(mesh.url, key, isolate=False, on_bundle=cheat_hook("perturb-intermediate", key, random.Random(11)))
    try:
        sent = _cli(*_owner(mesh), cwd=tmp_path, timeout=180)
        assert sent.returncode == 0, sent.stderr
        job_id = json.loads(sent.stdout)["job_id"]
        cheat.join()
        threading.Thread(target=cheat._beat, daemon=True).start()
        assert cheat.run_one()
        mesh.wait_for(lambda: mesh.status(job_id)["tasks"][0]["history"], "the steered answer's verdict", 120)
        first = mesh.status(job_id)["tasks"][0]["history"][0]
        assert first["node_id"] == key.node_id and first["outcome"].startswith("rejected"), first
        assert "slash" in mesh.ledger_kinds(key.node_id) and "reward" not in mesh.ledger_kinds(key.node_id)
        mesh.node("honest")
        done = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "done" and d, "the redo", 180)
        task = done["tasks"][0]
        assert task["node_id"] == _node_id(mesh, "honest") and done["transfer"] == "full"
        assert task["verdict"]["samples_in_force"] == TOKENS - 1  # every position beside the last

        # The owner waits for a second job: its verified answer is the model's greedy answer.
        owner = _cli(*_owner(mesh, "--deposit", "11", "--wait", "-o", "out", "--timeout", "180s",
                             "--verifier-key", "op.key.pub"), cwd=tmp_path, timeout=240)  # fmt: skip
        assert owner.returncode == 0, owner.stderr
        answer = json.loads(owner.stdout)
        assert _cli("receipt", "check", "out/receipt.json", "--verifier-key", "op.key.pub",
                    cwd=tmp_path).returncode == 0  # fmt: skip
        local = new_generate_job(LM, PROMPT, tmp_path / "local" / "job.json", max_new_tokens=TOKENS)
        proved = Worker(generate_key()).prove(local, out=tmp_path / "local.vmb")
        expected = committed_outputs(proved.bundle, local)["tokens"]
        assert answer["token_ids"] == expected.reshape(-1).tolist() and len(answer["token_ids"]) == TOKENS
        assert np.array_equal(np.load(tmp_path / "out" / "outputs.npz")["tokens"], expected)
    finally:
        cheat.close()
        mesh.close()


def test_what_a_generate_job_cannot_be_is_refused(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path)
    try:
        for extra in (("--segments", "2"), ("--replicas", "2"), ("--transfer", "challenge")):
            usage = _cli(*_owner(mesh, *extra), cwd=tmp_path)
            assert usage.returncode == 2 and "generate job runs whole" in usage.stderr, usage.stderr
        bare = _cli("submit", LM, "--input", PROMPT, "--mode", "generate", "--coordinator", mesh.url,
                    "--key", "owner.key", cwd=tmp_path)  # fmt: skip
        assert bare.returncode == 2 and "--max-new-tokens" in bare.stderr
        stray = _cli("submit", FIXTURES / "mlp.onnx", "--input", FIXTURES / "mlp.input.npy", "--max-new-tokens",
                     "4", "--coordinator", mesh.url, "--key", "owner.key", cwd=tmp_path)  # fmt: skip
        assert stray.returncode == 2 and "go with --mode generate" in stray.stderr
        # Past the command line, the coordinator refuses it too (the API asked for replicas).
        with Client(mesh.url, load_secret_key(tmp_path / "owner.key")) as client:
            with pytest.raises(MeshError) as refused:
                submit(client, LM, PROMPT, mode="generate", generation=Generation(4), replicas=2, samples=None,
                       deposit=20)  # fmt: skip
        assert refused.value.status == 422 and refused.value.code == "bad-mode"
    finally:
        mesh.close()


@pytest.mark.parametrize("strategy", MESH_STRATEGIES)
def test_every_mesh_cheat_on_a_generate_job_is_rejected(tmp_path: Path, strategy: str) -> None:
    job = new_generate_job(LM, PROMPT, tmp_path / "job.json", max_new_tokens=TOKENS)
    key = generate_key()
    bundle = Worker(key).prove(job, out=tmp_path / "answer.vmb").bundle
    cheat_hook(strategy, key, random.Random(5))(bundle, job)
    verdict = verify(bundle, job=job, node_key=key.public)
    assert verdict.status == "reject" and verdict.evidence is not None, verdict.reason
