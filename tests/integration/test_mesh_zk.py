"""zk jobs over a live mesh: the owner's circuit travels with the job, a node proves with ezkl,
the coordinator checks the proofs with its own SRS (the one the circuit pins) and settles; a
proof that does not hold is refused and its task redone by another node; a coordinator without
the SRS refuses zk jobs; a node without it gives zk tasks back."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import FIXTURES
from tests.integration.mesh_harness import Mesh, _cli, _node_id
from verimesh.jobs.bundle import read_bundle
from verimesh.jobs.job import Job
from verimesh.mesh import Node
from verimesh.signing.keys import load_secret_key

pytestmark = pytest.mark.slow

SRS = FIXTURES / "srs" / "kzg15.test-only.srs"
CIRCUIT = FIXTURES.parent / "circuits" / "mlp"


def test_a_zk_job_is_proven_on_a_node_and_its_proof_checked_by_the_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VERIMESH_CACHE", str(tmp_path / "cache"))  # proving keys, for the node processes too
    (tmp_path / "plain").mkdir()
    plain = Mesh(tmp_path / "plain")
    try:  # a coordinator without an SRS checks no zk proofs: the job is refused at submission
        refused = plain.submit("--mode", "zk", "--circuit", str(CIRCUIT))
        assert refused.returncode == 3 and "no-srs" in refused.stderr + refused.stdout, refused.stderr
    finally:
        plain.close()
    mesh = Mesh(tmp_path, extra=("--srs", str(SRS)))
    try:
        mesh.node("other")  # no SRS: it gives the zk task back, and is not offered it again
        sent = mesh.submit("--mode", "zk", "--circuit", str(CIRCUIT))
        assert sent.returncode == 0, sent.stderr
        job_id = json.loads(sent.stdout)["job_id"]
        mesh.wait_for(lambda: mesh.status(job_id)["tasks"][0]["history"], "the node without an SRS", 90)
        first = mesh.status(job_id)["tasks"][0]["history"][0]
        assert first["node_id"] == _node_id(mesh, "other") and "released" in first["outcome"], first
        mesh.node("honest", "--srs", str(SRS))
        done = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "done" and d, "the zk proof", 240)
        task = done["tasks"][0]
        assert task["node_id"] == _node_id(mesh, "honest") and "challenge" not in task
        assert done["transfer"] == "full"
        owner = _cli("submit", FIXTURES / "mlp.onnx", "--input", FIXTURES / "mlp.input.npy", "--mode", "zk",
                     "--circuit", CIRCUIT, "--coordinator", mesh.url, "--key", "owner.key", "--deposit", "11",
                     "--wait", "-o", "out", "--timeout", "240s", "--verifier-key", "op.key.pub", "--json",
                     cwd=tmp_path, timeout=300)  # fmt: skip
        assert owner.returncode == 0, owner.stderr
        assert _cli("receipt", "check", "out/receipt.json", "--verifier-key", "op.key.pub",
                    cwd=tmp_path).returncode == 0  # fmt: skip
        values = np.load(tmp_path / "out" / "outputs.npz")
        assert set(values) == {"logits"} and np.isfinite(values["logits"]).all()
        usage = _cli("submit", FIXTURES / "mlp.onnx", "--input", FIXTURES / "mlp.input.npy", "--mode", "zk",
                     "--coordinator", mesh.url, "--key", "owner.key", cwd=tmp_path)  # fmt: skip
        assert usage.returncode == 2 and "--circuit" in usage.stderr
    finally:
        mesh.close()


def test_a_zk_proof_that_does_not_hold_is_refused_and_its_task_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that signs outputs its proof does not prove (the proof is ezkl's, the output tensor
    the node's own): the check fails and is never accepted; another node redoes the task. The
    cheat is not excluded for it: the check reads the owner's circuit, so a failed proof is not
    evidence against the node (the next test); it is never offered the task again and is paid
    nothing."""
    monkeypatch.setenv("VERIMESH_CACHE", str(tmp_path / "cache"))
    mesh = Mesh(tmp_path, extra=("--srs", str(SRS)))
    key = load_secret_key(tmp_path / "other.key")

    def other_output(bundle: Path, job: Job) -> None:
        from verimesh.core.container import write_container
        from verimesh.jobs.bundle import sealed_root
        from verimesh.signing.envelope import make_statement, sign_statement

        parsed = read_bundle(bundle, version=job.version)
        members: list[tuple[str, Any]] = []
        for name, data in parsed.members:
            if name == "tensors/000000.bin":  # the output (a zk trace holds the outputs): nudged, sealed, signed
                raw = np.frombuffer(bytes(data), dtype="<f8").copy()
                raw[0] += 1.0
                data = raw.tobytes()
            members.append((name, bytes(data)))
        from verimesh.core.digest import member_leaf, tensor_digest

        statement = parsed.envelope.statement()
        predicate = dict(statement["predicate"])
        leaves = [member_leaf(n, d) for n, d in members]
        predicate["commitment"] = {**predicate["commitment"], "root": "sha256:" + sealed_root(leaves).hex()}
        out = np.frombuffer(members[0][1], dtype="<f8").reshape(job.model_outputs[0].shape)
        subjects = {"logits": tensor_digest("logits", out)}
        envelope = sign_statement(make_statement(subjects, statement["predicateType"], predicate), key)
        write_container(bundle, [*members, ("envelope.json", envelope.to_bytes())])

    cheat = Node(mesh.url, key, isolate=False, srs=SRS, on_bundle=other_output)
    try:
        sent = mesh.submit("--mode", "zk", "--circuit", str(CIRCUIT))
        assert sent.returncode == 0, sent.stderr
        job_id = json.loads(sent.stdout)["job_id"]
        cheat.join()
        threading.Thread(target=cheat._beat, daemon=True).start()  # proving outlasts the heartbeat timeout
        assert cheat.run_one()
        mesh.wait_for(lambda: mesh.status(job_id)["tasks"][0]["history"], "the refusal", 120)
        first = mesh.status(job_id)["tasks"][0]["history"][0]
        assert first["node_id"] == key.node_id and first["outcome"].startswith("error: the zk proof does not hold")
        mesh.node("honest", "--srs", str(SRS))
        done = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "done" and d, "the redo", 240)
        assert done["tasks"][0]["node_id"] == _node_id(mesh, "honest")
        assert "reward" not in mesh.ledger_kinds(key.node_id)
    finally:
        cheat.close()
        mesh.close()


def test_a_circuit_whose_metadata_its_keys_do_not_satisfy_blames_no_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner's circuit.json says another input scale than the settings its proving key was
    built from (found by review): the honest node's proof cannot pass the check, which reads the
    circuit. That is not evidence against the node: the task goes to another node as a judged
    attempt, the job fails when its attempts are used up, and the node is neither excluded nor
    slashed."""
    import shutil

    from verimesh.core.canonical import canonical_json

    monkeypatch.setenv("VERIMESH_CACHE", str(tmp_path / "cache"))
    shutil.copytree(CIRCUIT, tmp_path / "evil")
    doc = json.loads((tmp_path / "evil" / "circuit.json").read_bytes())
    doc["steps"][0]["input_scales"] = [doc["steps"][0]["input_scales"][0] - 1]
    doc["srs"]["path"] = str(SRS)
    (tmp_path / "evil" / "circuit.json").write_bytes(canonical_json(doc))
    mesh = Mesh(tmp_path, extra=("--srs", str(SRS)))
    try:
        sent = mesh.submit("--mode", "zk", "--circuit", str(tmp_path / "evil"), "--max-attempts", "1")
        assert sent.returncode == 0, sent.stderr
        job_id = json.loads(sent.stdout)["job_id"]
        mesh.node("honest", "--srs", str(SRS))
        failed = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "failed" and d, "the job to fail", 240)
        outcome = failed["tasks"][0]["history"][0]["outcome"]
        assert outcome.startswith("error: the zk proof does not hold"), outcome
        honest = next(n for n in mesh.status()["nodes"] if n["node_id"] == _node_id(mesh, "honest"))
        assert not honest["banned"] and "slash" not in mesh.ledger_kinds(honest["node_id"])
    finally:
        mesh.close()
