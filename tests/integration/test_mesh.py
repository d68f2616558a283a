"""The live mesh with real processes: a coordinator (uvicorn on a free loopback port), node
daemons, a job owner's `submit`; nodes killed with SIGKILL, the coordinator killed and restarted,
a cheating node slashed and excluded, and every refusal of the HTTP API."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import input_path, model_path
from tests.integration.mesh_harness import HEARTBEAT_TIMEOUT, Mesh, _cli, _node_id
from verimesh.core.canonical import canonical_json
from verimesh.ledger.store import Ledger
from verimesh.mesh.auth import HEADER_SIGNATURE, HEADER_TIME, sign_headers
from verimesh.mesh.client import Client, MeshError
from verimesh.signing.keys import generate_key, load_public_key, load_secret_key

pytestmark = pytest.mark.slow


def test_a_job_runs_on_a_node_and_comes_back_verified(mesh: Mesh) -> None:
    mesh.node("honest")
    done = mesh.submit("--wait", "-o", "out", "--timeout", "120s", "--verifier-key", "op.key.pub")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["state"] == "done" and doc["tasks"][0]["node_id"] == _node_id(mesh, "honest")
    # The outputs are the model's, and the receipt holds offline against the operator's key only.
    local = _cli("job", "new", model_path("mlp"), "--input", input_path("mlp"), "-o", "j.json", cwd=mesh.root)
    assert local.returncode == 0
    assert _cli("prove", "j.json", "--key", "other.key", "-o", "r.vmb", cwd=mesh.root).returncode == 0
    assert _cli("outputs", "r.vmb", "--job", "j.json", "--node-key", "other.key.pub", "-o", "mine.npz",
                cwd=mesh.root).returncode == 0  # fmt: skip
    theirs, mine = np.load(mesh.root / "out" / "outputs.npz"), np.load(mesh.root / "mine.npz")
    assert set(theirs) == set(mine) and all(np.allclose(theirs[k], mine[k], rtol=1e-5) for k in mine)
    assert _cli("receipt", "check", "out/receipt.json", "--verifier-key", "op.key.pub", cwd=mesh.root).returncode == 0
    wrong = _cli("receipt", "check", "out/receipt.json", "--verifier-key", "other.key.pub", cwd=mesh.root)
    assert wrong.returncode == 1
    # The settlement, proven from the ledger: the node's receipt, verdict and reward under a signed checkpoint.
    assert sorted(p.name for p in (mesh.root / "out" / "ledger").iterdir()) == ["receipt-0.json", "reward-0.json",
                                                                                "verdict-0.json"]  # fmt: skip
    for name in ("verdict-0.json", "reward-0.json"):
        proof = _cli("ledger", "check-proof", f"out/ledger/{name}", "--operator-key", "op.key.pub", cwd=mesh.root)
        assert proof.returncode == 0, proof.stderr
        foreign = _cli("ledger", "check-proof", f"out/ledger/{name}", "--operator-key", "other.key.pub", cwd=mesh.root)
        assert foreign.returncode == 1
    # A coordinator that drops the reward's proof, or forges an entry, is caught before anything is written.
    from verimesh.errors import VerificationFailedError
    from verimesh.mesh.owner import collect

    with Client(mesh.url, load_secret_key(mesh.root / "owner.key")) as owner:
        real = owner.proofs(doc["job_id"])
        forged = [dict(p) for p in real]
        forged[-1]["entry"] = forged[0]["entry"]
        pinned = load_public_key(mesh.root / "op.key.pub")
        for lie in ([p for p in real if json.loads(base64.b64decode(p["entry"]))["kind"] != "reward"],
                    forged):  # fmt: skip
            owner.proofs = lambda _job, lie=lie: lie  # type: ignore[method-assign]
            with pytest.raises(VerificationFailedError):
                collect(owner, doc["job_id"], mesh.root / "lied", verifier_key=pinned)
            assert not (mesh.root / "lied").exists()
    # The ledger: the node registered with its own signed request, one verdict and one reward.
    kinds = mesh.ledger_kinds(_node_id(mesh, "honest"))
    assert kinds.count("register") == 1 and kinds.count("reward") == 1 and kinds.count("verdict") == 1
    assert _cli("ledger", "verify", "--ledger", mesh.db, "--rules", "--operator-key", "op.key.pub",
                cwd=mesh.root).returncode == 0  # fmt: skip
    shown = _cli("status", "--coordinator", mesh.url, cwd=mesh.root)
    assert shown.returncode == 0 and "done" in shown.stdout and _node_id(mesh, "honest") in shown.stdout
    # The dashboard is served, read-only, and shows nothing secret.
    page = httpx.get(mesh.url + "/", timeout=10)
    assert page.status_code == 200 and "/v1/status" in page.text
    secret_hex = format(load_secret_key(mesh.root / "op.key").secret, "x")
    assert secret_hex not in json.dumps(mesh.status())


def test_a_split_job_runs_segment_by_segment_on_three_nodes(mesh: Mesh) -> None:
    for name in ("honest", "other", "third"):
        mesh.node(name)
    done = mesh.submit("--segments", "3", "--wait", "-o", "out", "--timeout", "120s", "--verifier-key", "op.key.pub",
                       model="transformer")  # fmt: skip
    assert done.returncode == 0, done.stderr
    tasks = json.loads(done.stdout)["tasks"]
    assert [t["position"] for t in tasks] == [0, 1, 2]
    assert len({t["node_id"] for t in tasks}) == 3  # one node never runs two sub-tasks of one job
    assert tasks[-1]["history"][-1]["outcome"] == "accepted (spot check, then the chain)"
    receipt = json.loads((mesh.root / "out" / "receipt.json").read_text())
    assert receipt["receipt"]["kind"] == "segments" and len(receipt["receipt"]["subtasks"]) == 3
    assert _cli("receipt", "check", "out/receipt.json", "--verifier-key", "op.key.pub", cwd=mesh.root).returncode == 0
    # Each node was paid once, for its own segment, and the outputs are the whole model's.
    for name in ("honest", "other", "third"):
        assert mesh.ledger_kinds(_node_id(mesh, name)).count("reward") == 1
    proofs = sorted(p.name for p in (mesh.root / "out" / "ledger").iterdir())
    assert sum(n.startswith("verdict-") for n in proofs) == 3 and sum(n.startswith("reward-") for n in proofs) == 3
    assert _cli("job", "new", model_path("transformer"), "--input", input_path("transformer"), "-o", "j.json",
                cwd=mesh.root).returncode == 0  # fmt: skip
    assert _cli("prove", "j.json", "--key", "owner.key", "-o", "r.vmb", cwd=mesh.root).returncode == 0
    assert _cli("outputs", "r.vmb", "--job", "j.json", "--node-key", "owner.key.pub", "-o", "mine.npz",
                cwd=mesh.root).returncode == 0  # fmt: skip
    theirs, mine = np.load(mesh.root / "out" / "outputs.npz"), np.load(mesh.root / "mine.npz")
    assert set(theirs) == set(mine) and all(np.allclose(theirs[k], mine[k], rtol=1e-4, atol=1e-5) for k in mine)


def test_a_cheating_node_is_slashed_excluded_and_its_task_redone(mesh: Mesh) -> None:
    cheater = mesh.cheater()
    sent = mesh.submit()
    assert sent.returncode == 0, sent.stderr
    job_id = json.loads(sent.stdout)["job_id"]
    cheater_id = load_public_key(mesh.root / "rk" / "cheater-0.key.pub").node_id

    def slashed() -> bool:
        task = mesh.status(job_id)["tasks"][0]
        return any("slashed" in h["outcome"] for h in task["history"])

    mesh.wait_for(slashed, "the cheat to be slashed")
    out, _ = cheater.communicate(timeout=60)  # refused from then on: the node stops
    assert "excluded" in out, out
    mesh.node("honest")
    done = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "done" and d, "the honest node")
    task = done["tasks"][0]
    assert task["node_id"] == _node_id(mesh, "honest") and task["attempts"] == 2
    assert task["history"][0]["node_id"] == cheater_id
    # The status view's standings are at most 2 s old (the verifier's child process slashed it).
    mesh.wait_for(lambda: any(n["node_id"] == cheater_id and n.get("slashed", 0) > 0 for n in mesh.status()["nodes"]),
                  "the slash in the status view", timeout=10)  # fmt: skip
    nodes = {n["node_id"]: n for n in mesh.status()["nodes"]}
    assert nodes[cheater_id]["banned"] and nodes[cheater_id]["slashed"] > 0
    assert "slash" in mesh.ledger_kinds(cheater_id) and "reward" not in mesh.ledger_kinds(cheater_id)
    honest_kinds = mesh.ledger_kinds(_node_id(mesh, "honest"))
    assert "slash" not in honest_kinds and honest_kinds.count("reward") == 1


_HANG = """
import time
from pathlib import Path
from verimesh.mesh import Node
from verimesh.signing.keys import load_secret_key
Node("{url}", load_secret_key(Path("{key}.key")), heartbeat=0.5, poll=0.2,
     on_bundle=lambda bundle, job: time.sleep(3600)).run()
"""


def test_a_node_killed_mid_task_loses_its_lease_and_the_task_is_reassigned(mesh: Mesh) -> None:
    hung = mesh.python(_HANG.format(url=mesh.url, key="other"))
    job_id = json.loads(mesh.submit().stdout)["job_id"]
    other = _node_id(mesh, "other")
    mesh.wait_for(lambda: mesh.status(job_id)["tasks"][0]["node_id"] == other, "the lease")
    hung.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    mesh.node("honest")
    done = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "done" and d, "reassignment")
    reassigned_after = time.monotonic() - killed_at
    task = done["tasks"][0]
    assert task["node_id"] == _node_id(mesh, "honest")
    assert task["history"][0] == {**task["history"][0], "node_id": other, "outcome": "lease lost (heartbeat missed)"}
    assert reassigned_after < HEARTBEAT_TIMEOUT + 60  # the timeout, a poll, and a loaded 2-core machine
    assert "slash" not in mesh.ledger_kinds(other)  # a node that died is not a cheat


def test_a_node_that_restarts_resumes_its_own_lease(mesh: Mesh) -> None:
    hung = mesh.python(_HANG.format(url=mesh.url, key="honest"))
    job_id = json.loads(mesh.submit().stdout)["job_id"]
    honest = _node_id(mesh, "honest")
    mesh.wait_for(lambda: mesh.status(job_id)["tasks"][0]["node_id"] == honest, "the lease")
    hung.send_signal(signal.SIGKILL)
    mesh.node("honest", "--max-tasks", "1")  # back within the heartbeat timeout: the lease is still its own
    done = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "done" and d, "the restarted node")
    assert done["tasks"][0]["attempts"] == 1 and done["tasks"][0]["node_id"] == honest


def test_the_coordinator_killed_mid_job_restarts_with_nothing_lost_or_doubled(mesh: Mesh) -> None:
    jobs = []
    for i in range(4):
        sent = mesh.submit("--samples", str(i))  # four different jobs (the samples policy is in the job)
        assert sent.returncode == 0, sent.stderr
        jobs.append(json.loads(sent.stdout)["job_id"])
    mesh.node("honest")
    mesh.wait_for(lambda: any(mesh.status(j)["state"] == "done" for j in jobs), "a first job")
    mesh.kill_coordinator()
    time.sleep(1)
    mesh.start()
    mesh.wait_for(lambda: all(mesh.status(j)["state"] == "done" for j in jobs), "every job", timeout=120)
    honest = _node_id(mesh, "honest")
    ledger = Ledger.open(mesh.db)
    rewards = [e.event["job_id"] for e in ledger.entries(node_id=honest, kinds=["reward"])]
    assert sorted(rewards) == sorted(jobs)  # one reward per job: none lost, none doubled
    assert _cli("ledger", "verify", "--ledger", mesh.db, "--rules", cwd=mesh.root).returncode == 0
    with Client(mesh.url, load_secret_key(mesh.root / "owner.key")) as owner:
        for job_id in jobs:
            assert json.loads(owner.receipt(job_id))["receipt"]["job_id"] == job_id


def _signed(key: Any, coordinator: str, method: str, path: str, body: bytes = b"{}") -> dict[str, str]:
    return sign_headers(key, coordinator=coordinator, method=method, path=path, body=body)


def test_every_refusal_of_the_api(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path, max_upload_mb=1, extra=("--blob-quota-mb", "1"))
    try:
        _refusals(mesh)
    finally:
        mesh.close()


def _refusals(mesh: Mesh) -> None:
    node = load_secret_key(mesh.root / "honest.key")
    stranger = load_secret_key(mesh.root / "other.key")
    http = httpx.Client(base_url=mesh.url, timeout=30)
    coordinator = http.get("/v1/info").json()["coordinator"]
    body = canonical_json({})

    def post(path: str, headers: dict[str, str], content: bytes = body) -> httpx.Response:
        return http.post(path, content=content, headers=headers)

    # Unsigned, badly signed, replayed, expired: 401 with a JSON error.
    refused = post("/v1/lease", {})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
    headers = _signed(node, coordinator, "POST", "/v1/lease")
    assert post("/v1/lease", {**headers, HEADER_SIGNATURE: _signed(node, coordinator, "POST", "/v1/x")[
        HEADER_SIGNATURE]}).status_code == 401  # fmt: skip
    assert post("/v1/lease", headers, canonical_json({"other": 1})).status_code == 401  # body not the one signed
    assert post("/v1/lease", _signed(node, "another-coordinator", "POST", "/v1/lease")).status_code == 401
    stale = {**headers, HEADER_TIME: str(int(time.time()) - 3600)}
    assert post("/v1/lease", stale).status_code == 401
    # A key nobody registered: 403.
    first = post("/v1/lease", headers)
    assert first.status_code == 403 and first.json()["error"]["code"] == "unknown-node"
    replay = post("/v1/lease", headers)
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]["message"]
    # Registration: the ledger request must be the signer's own.
    with Client(mesh.url, node) as client:
        client.register(stake=100, device="cpu")
    with Client(mesh.url, stranger) as client:
        from verimesh.ledger.events import sign_request

        theirs = sign_request(node, action="register", ledger_id=coordinator, amount=5).to_json()
        raw = canonical_json({"request": theirs, "device": "cpu"})
        refused = post("/v1/nodes/register", _signed(stranger, coordinator, "POST", "/v1/nodes/register", raw), raw)
        assert refused.status_code == 403
        for junk in (b"{", b"[]", canonical_json({"request": 1, "device": "cpu"}), b"\x00" * 10):
            answer = post("/v1/nodes/register", _signed(stranger, coordinator, "POST", "/v1/nodes/register", junk),
                          junk)  # fmt: skip
            assert answer.status_code in (400, 422), (junk, answer.text)
            assert "error" in answer.json()
        # Oversized: 413 (this coordinator takes 1 MiB).
        big = b"\x00" * (2 * 1024 * 1024)
        assert http.put(f"/v1/blobs/sha256:{'0' * 64}", content=big,
                        headers=_signed(stranger, coordinator, "PUT", f"/v1/blobs/sha256:{'0' * 64}", big)
                        ).status_code == 413  # fmt: skip
        # A blob whose bytes are not its digest: 422.
        with pytest.raises(MeshError) as bad:
            client._call("PUT", f"/v1/blobs/sha256:{'1' * 64}", b"abc")
        assert bad.value.status == 422
        # Uploads no job refers to count against the uploader's quota (1 MiB here): 413 beyond it.
        client.put_blob(b"\x01" * 600_000)
        with pytest.raises(MeshError) as over:
            client.put_blob(b"\x02" * 600_000)
        assert over.value.status == 413 and "quota" in over.value.message
    # A node answers only its own leases; late answers are refused.
    sent = mesh.submit()
    job_id = json.loads(sent.stdout)["job_id"]
    with Client(mesh.url, node) as client:
        lease = client.lease()
        assert lease is not None and lease["job_id"] == job_id
        assert client.file(lease["task_id"], lease["files"]["job"])
        with pytest.raises(MeshError) as foreign:
            client.file(lease["task_id"], f"sha256:{'2' * 64}")
        assert foreign.value.status == 403
    with Client(mesh.url, stranger) as client:
        client.register(stake=100, device="cpu")
        assert client.lease() is None  # the only task is leased to another node
        with pytest.raises(MeshError) as not_yours:
            client.result(lease["task_id"], lease["lease_id"], b"PK\x03\x04")
        assert not_yours.value.status == 403
        with pytest.raises(MeshError) as not_yours_file:
            client.file(lease["task_id"], lease["files"]["job"])
        assert not_yours_file.value.status == 403
        with pytest.raises(MeshError) as not_owner:
            client.outputs(job_id)
        assert not_owner.value.status == 403
    time.sleep(HEARTBEAT_TIMEOUT + 1.5)  # no heartbeat: the lease is lost
    with Client(mesh.url, node) as client:
        with pytest.raises(MeshError) as late:
            client.result(lease["task_id"], lease["lease_id"], b"PK\x03\x04")
        assert late.value.status == 409
    with Client(mesh.url, stranger) as client:  # reassigned to the other node
        again = client.lease()
        assert again is not None and again["task_id"] == lease["task_id"] and again["lease_id"] != lease["lease_id"]
        # A bundle that is not a bundle: the node excluded from the mesh, nobody slashed, no attempt used up.
        client.result(again["task_id"], again["lease_id"], b"PK\x03\x04 not a bundle")
    task = mesh.wait_for(lambda: (t := mesh.status(job_id)["tasks"][0])["state"] == "pending" and t, "the verdict")
    assert task["history"][-1]["outcome"].startswith("excluded: its upload is not a bundle of its own"), task
    assert "/tmp" not in task["history"][-1]["outcome"]
    assert "slash" not in mesh.ledger_kinds(stranger.node_id)
    with Client(mesh.url, stranger) as client, pytest.raises(MeshError) as banned:
        client.lease()
    assert banned.value.status == 403 and banned.value.code == "banned"
    # Read-only views need no key and hold nothing secret; unknown jobs are 404.
    assert http.get(f"/v1/jobs/sha256:{'3' * 64}").status_code == 404
    assert http.get(f"/v1/jobs/{job_id}/receipt").status_code == 401  # the owner's alone: it pins the outputs
    with Client(mesh.url, stranger) as client, pytest.raises(MeshError) as not_owner_receipt:
        client.receipt(job_id)
    assert not_owner_receipt.value.status == 403
    assert http.get(f"/v1/jobs/{job_id}/proofs").status_code == 401
    with Client(mesh.url, stranger) as client, pytest.raises(MeshError) as not_owner_proofs:
        client.proofs(job_id)
    assert not_owner_proofs.value.status == 403 and not_owner_proofs.value.code == "not-owner"


def _loop_model(path: Path, trips: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [helper.make_node("Add", ["y_in", "one"], ["y_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_out", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.ones((1, 4), np.float32), "one")],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "c", "x"], ["y"], body=body)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.array(trips, np.int64), "M"),
                     numpy_helper.from_array(np.array(True), "c")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_a_job_whose_model_never_ends_fails_alone_and_blames_no_node(tmp_path: Path) -> None:
    """A job owner's Loop with 10^12 trips (a valid 300-byte model): its verification is killed at
    --verify-timeout, that job fails, no node is slashed, and the next job is verified as usual."""
    import secrets

    from verimesh.core.digest import sha256_bytes
    from verimesh.jobs.job import compute_job_id, load_job
    from verimesh.jobs.runtime import StepRunner
    from verimesh.mesh.files import job_files
    from verimesh.workflows import seal_trace

    mesh = Mesh(tmp_path, extra=("--verify-timeout", "5s"))
    try:
        _loop_model(tmp_path / "small.onnx", 3)
        np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
        made = _cli("job", "new", "small.onnx", "--input", "x.npy", "-o", "loop.json", "--steps", "1", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        _loop_model(tmp_path / "bomb.onnx", 10**12)
        bomb = (tmp_path / "bomb.onnx").read_bytes()
        doc = json.loads((tmp_path / "loop.json").read_text())
        (tmp_path / doc["steps"][0]["path"]).write_bytes(bomb)
        doc.pop("job_id")
        doc["nonce"] = secrets.token_hex(16)
        doc["model"]["digest"] = doc["steps"][0]["digest"] = sha256_bytes(bomb)
        doc["model"]["path"] = "bomb.onnx"
        doc["job_id"] = compute_job_id(doc)
        (tmp_path / "loop.json").write_text(json.dumps(doc))
        job = load_job(tmp_path / "loop.json")
        owner = Client(mesh.url, load_secret_key(tmp_path / "owner.key"))
        data = job.resolve(job.input_path).read_bytes()
        for blob in (bomb, data, job.canonical_bytes()):
            owner.put_blob(blob)
        owner.submit_job(job.canonical_bytes(), files=job_files(job, sha256_bytes(data)), deposit=10, deadline=300,
                         max_attempts=3)  # fmt: skip
        attacker = load_secret_key(tmp_path / "other.key")
        with Client(mesh.url, attacker) as node:
            node.register(stake=10, device="cpu")
            lease = node.lease()
            assert lease is not None and lease["job_id"] == job.job_id
            trace = {"x": np.zeros((1, 4), np.float32), "y": np.full((1, 4), 7, np.float32)}
            runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
            seal_trace(job, trace, key=attacker, runner=runner, out=tmp_path / "bomb.vmb")
            node.result(lease["task_id"], lease["lease_id"], (tmp_path / "bomb.vmb").read_bytes())
        failed = mesh.wait_for(lambda: (d := mesh.status(job.job_id))["state"] == "failed" and d, "the timeout",
                               timeout=180)  # fmt: skip
        assert "too costly to verify" in failed["error"]
        assert "slash" not in mesh.ledger_kinds(attacker.node_id)
        mesh.node("honest")
        done = mesh.submit("--wait", "--timeout", "120s")
        assert done.returncode == 0, done.stderr
    finally:
        mesh.close()


def test_a_split_job_redoes_a_segment_whose_node_can_no_longer_answer_for_it(mesh: Mesh) -> None:
    """Node X proves segment 0 honestly, then is slashed to nothing on another job: the chain
    cannot be settled with X, so segment 0 is redone by another node (and segment 1 after it);
    the honest node that answered segment 1 is not blamed, and X is paid nothing for the split."""
    import random

    from verimesh.assurance.mesh_redteam import cheat_hook
    from verimesh.mesh import Node

    x_key = generate_key()
    x = Node(mesh.url, x_key, stake=1, isolate=False)
    try:
        x.join()
        sent = mesh.submit("--segments", "2", model="transformer")
        assert sent.returncode == 0, sent.stderr
        split = json.loads(sent.stdout)["job_id"]
        assert x.run_one()  # segment 0, honestly
        mesh.wait_for(lambda: mesh.status(split)["tasks"][0]["state"] == "done", "segment 0")
        other = json.loads(mesh.submit().stdout)["job_id"]
        x.on_bundle = cheat_hook("perturb-final", x_key, random.Random(7))
        assert x.run_one()  # X may not take segment 1 (it ran segment 0): it takes the other job, and cheats
        mesh.wait_for(lambda: any("slashed" in h["outcome"] for h in mesh.status(other)["tasks"][0]["history"]),
                      "X slashed")  # fmt: skip
    finally:
        x.close()
    mesh.node("honest")
    mesh.node("other")
    done = mesh.wait_for(lambda: (d := mesh.status(split))["state"] == "done" and d, "the split job", timeout=120)
    honest = {_node_id(mesh, "honest"), _node_id(mesh, "other")}
    assert {t["node_id"] for t in done["tasks"]} == honest
    assert any(h["outcome"].startswith("redone") and h["node_id"] == x_key.node_id for h in done["tasks"][0]["history"])
    blamed = [h for t in done["tasks"] for h in t["history"] if h["node_id"] in honest]
    assert not any(h["outcome"].startswith(("error", "rejected")) for h in blamed), blamed
    ledger = Ledger.open(mesh.db)
    assert [e.kind for e in ledger.entries(node_id=x_key.node_id, kinds=["reward"])] == []


def test_a_node_with_no_stake_left_gets_no_tasks_until_it_tops_up(tmp_path: Path) -> None:
    """A node that withdrew all its stake could soon be neither paid nor slashed for an answer: it
    is refused leases (403 no-stake) from the moment of the withdrawal, and takes work again after
    a top-up."""
    from verimesh.ledger.events import sign_request
    from verimesh.mesh import Node
    from verimesh.settlement import release, top_up, withdraw

    mesh = Mesh(tmp_path, settings={"unbonding_seconds": 0})
    key = generate_key()
    node = Node(mesh.url, key, stake=5, isolate=False)
    try:
        node.join()
        op = load_secret_key(tmp_path / "op.key")
        ledger = Ledger.open(mesh.db)
        sent = mesh.submit()
        assert sent.returncode == 0, sent.stderr
        job_id = json.loads(sent.stdout)["job_id"]
        # Withdrawn, it is still slashable while unbonding, but takes no new task it could walk away from.
        withdraw(ledger, sign_request(key, action="withdraw", ledger_id=ledger.ledger_id, amount=5), writer=op)

        def refused() -> bool:
            try:
                node.client.lease()
            except MeshError as exc:
                return exc.status == 403 and exc.code == "no-stake"
            return False

        assert refused()  # at once: the gate reads the ledger again whenever it grew
        release(ledger, key.node_id, writer=op)
        assert refused()
        assert mesh.status(job_id)["tasks"][0]["state"] == "pending"
        top_up(ledger, sign_request(key, action="top-up", ledger_id=ledger.ledger_id, amount=5), writer=op)
        assert node.run_one()
        done = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "done" and d, "the job", timeout=60)
        assert done["tasks"][0]["node_id"] == key.node_id
    finally:
        node.close()
        mesh.close()


def test_sigterm_stops_the_coordinator_cleanly(mesh: Mesh) -> None:
    """SIGTERM is how a service manager stops `serve`: a graceful shutdown and exit 0, not an error."""
    assert mesh.coordinator is not None
    mesh.coordinator.send_signal(signal.SIGTERM)
    assert mesh.coordinator.wait(timeout=30) == 0
    log = (mesh.root / "serve.log").read_text()
    assert "coordinator stopped" in log and "error" not in log


def test_sigterm_stops_a_node_cleanly_and_a_busy_port_is_a_one_line_refusal(mesh: Mesh) -> None:
    """`kill` is how an operator stops `node run`: it says how many tasks it did and exits 0.
    A second coordinator on the same port is refused with verimesh's own one-line error."""
    node = subprocess.Popen([sys.executable, "-m", "verimesh", "node", "run", "--coordinator", mesh.url, "--key",
                             "honest.key", "--poll", "0.2", "--json"], cwd=mesh.root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    mesh.procs.append(node)
    mesh.wait_for(lambda: mesh.status()["nodes"], "the node")
    node.send_signal(signal.SIGTERM)
    out, err = node.communicate(timeout=30)
    assert node.returncode == 0, err
    assert json.loads(out) == {"node_id": _node_id(mesh, "honest"), "tasks": 0} and "error" not in err
    busy = _cli("serve", "--ledger", f"sqlite:///{mesh.root / 'other.db'}", "--operator-key", "op.key", "--port",
                str(mesh.port), cwd=mesh.root)  # fmt: skip
    assert busy.returncode == 3 and "error[cannot-listen]" in busy.stderr and "Traceback" not in busy.stderr


def test_a_job_for_a_device_is_leased_only_to_nodes_of_that_device(mesh: Mesh) -> None:
    from verimesh.mesh import Node

    node = Node(mesh.url, generate_key(), device="cpu", isolate=False)
    try:
        node.join()
        gpu = mesh.submit("--device", "cuda")
        assert gpu.returncode == 0, gpu.stderr
        gpu_job = json.loads(gpu.stdout)["job_id"]
        assert node.client.lease() is None  # a CPU node is never handed a CUDA job
        cpu = mesh.submit("--device", "cpu", model="transformer")
        assert cpu.returncode == 0, cpu.stderr
        lease = node.client.lease()
        assert lease is not None and lease["job_id"] == json.loads(cpu.stdout)["job_id"]
        waiting = mesh.status(gpu_job)
        assert waiting["device"] == "cuda" and waiting["tasks"][0]["state"] == "pending"
    finally:
        node.close()


def test_keys_that_upload_garbage_are_excluded_without_using_up_the_owners_attempts(tmp_path: Path) -> None:
    """Bytes that are no bundle, another node's bundle, a bundle whose seal is broken: no honest
    node uploads them for its own lease. Each such key is excluded from the mesh, nothing is
    slashed (nothing its signature proves), and the job's attempts are not used up: three such
    keys do not fail a job of --max-attempts 3, whose honest node then runs it."""
    from verimesh.mesh import Node

    mesh = Mesh(tmp_path)
    local = _cli("job", "new", model_path("mlp"), "--input", input_path("mlp"), "-o", "j.json", cwd=tmp_path)
    assert local.returncode == 0
    assert _cli("prove", "j.json", "--key", "other.key", "-o", "foreign.vmb", cwd=tmp_path).returncode == 0
    foreign = (tmp_path / "foreign.vmb").read_bytes()

    def garbage(bundle: Path, _job: Any) -> None:
        bundle.write_bytes(b"not a bundle at all")

    def another_nodes(bundle: Path, _job: Any) -> None:
        bundle.write_bytes(foreign)

    def broken_seal(bundle: Path, _job: Any) -> None:
        data = bytearray(bundle.read_bytes())
        data[-40] ^= 0x01  # a byte of the last member: its leaf is no longer the signed one
        bundle.write_bytes(bytes(data))

    cheats: list[Node] = []
    try:
        sent = mesh.submit("--max-attempts", "3", "--transfer", "full")  # uploads of whole bundles
        assert sent.returncode == 0, sent.stderr
        job_id = json.loads(sent.stdout)["job_id"]
        for hook in (garbage, another_nodes, broken_seal):
            node = Node(mesh.url, generate_key(), stake=5, isolate=False, on_bundle=hook)
            cheats.append(node)
            node.join()
            assert node.run_one()
            mesh.wait_for(lambda node=node: any(h["node_id"] == node.key.node_id and h["outcome"].startswith("excluded")
                                                for h in mesh.status(job_id)["tasks"][0]["history"]),
                          "the upload to be refused", timeout=60)  # fmt: skip
            with pytest.raises(MeshError) as refused:
                node.client.lease()
            assert refused.value.status == 403 and refused.value.code == "banned"
        task = mesh.status(job_id)["tasks"][0]
        assert mesh.status(job_id)["state"] == "open" and task["state"] == "pending", task
        honest = Node(mesh.url, load_secret_key(tmp_path / "honest.key"), isolate=False)
        cheats.append(honest)
        honest.join()
        assert honest.run_one()
        done = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "done" and d, "the honest node", 60)
        assert done["tasks"][0]["node_id"] == _node_id(mesh, "honest")
        for node in cheats[:3]:
            assert "slash" not in mesh.ledger_kinds(node.key.node_id)
    finally:
        for node in cheats:
            node.close()
        mesh.close()


def test_a_job_asking_for_trusted_nodes_goes_only_to_a_node_the_ledger_trusts(tmp_path: Path) -> None:
    """`submit --min-level 1`: a fresh node (audit level 0: every step checked) is not leased the
    task; a node with a streak of accepted jobs in the ledger (level 1) is."""
    from tests.integration.test_ledger import history, join

    mesh = Mesh(tmp_path, settings={"operator_key_path": str(tmp_path / "op.key")})
    try:
        led = Ledger.open(mesh.db)
        trusted = load_secret_key(tmp_path / "honest.key")
        join(led, trusted, 1000)
        history(led, trusted, 10)
        mesh.node("other")
        mesh.wait_for(lambda: mesh.status()["nodes"], "the fresh node")
        sent = mesh.submit("--min-level", "1")
        assert sent.returncode == 0, sent.stderr
        job_id = json.loads(sent.stdout)["job_id"]
        time.sleep(3)  # the fresh node polls every 0.2 s: it would have leased it by now
        job = mesh.status(job_id)
        assert job["min_level"] == 1 and job["tasks"][0]["state"] == "pending" and job["tasks"][0]["attempts"] == 0
        mesh.node("honest")
        done = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "done" and d, "the trusted node")
        assert done["tasks"][0]["node_id"] == trusted.node_id
        levels = {n["node_id"]: n["audit_level"] for n in mesh.status()["nodes"]}
        assert levels[trusted.node_id] >= 1 and levels[_node_id(mesh, "other")] == 0
    finally:
        mesh.close()
    assert _cli("submit", "x.onnx", "--min-level", "9", "--coordinator", mesh.url, "--key", "owner.key",
                cwd=tmp_path).returncode == 2  # fmt: skip


def test_a_batch_runs_as_shards_on_three_nodes_and_a_cheating_shard_is_slashed_and_redone(tmp_path: Path) -> None:
    """`submit --shards`: each row is the whole job on that row, run by its own node in parallel,
    settled on arrival; after the last, the batch is verified as one and the receipt (kind
    shards) and the batch of outputs come back. A cheat on a row is slashed and the row redone."""
    import onnxruntime as ort

    mesh = Mesh(tmp_path)
    try:
        rows = np.load(model_path("mlp_batch").with_name("mlp_batch.rows.npz"))["input"][:3]
        np.savez(tmp_path / "batch.npz", input=rows)
        mesh.cheater()
        sent = subprocess.Popen(
            [sys.executable, "-m", "verimesh", "submit", str(model_path("mlp_batch")), "--input",
             str(input_path("mlp_batch")), "--shards", "batch.npz", "--coordinator", mesh.url, "--key", "owner.key",
             "--wait", "-o", "out", "--verifier-key", "op.key.pub", "--json"],
            cwd=mesh.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        mesh.procs.append(sent)
        job_id = mesh.wait_for(lambda: next((j["job_id"] for j in mesh.status()["jobs"]), None), "the job")

        def slashed() -> bool:
            return any("slashed" in h["outcome"] for t in mesh.status(job_id)["tasks"] for h in t["history"])

        mesh.wait_for(slashed, "the cheating shard to be slashed")
        for name in ("honest", "other", "third"):
            mesh.node(name)
        _, err = sent.communicate(timeout=180)
        assert sent.returncode == 0, err[-2000:]
        job = mesh.status(job_id)
        assert job["state"] == "done" and len(job["tasks"]) == 3
        assert len({t["node_id"] for t in job["tasks"]}) == 3
        session = ort.InferenceSession(str(model_path("mlp_batch")), providers=["CPUExecutionProvider"])
        expected = session.run(None, {"input": rows})[0]
        got = np.load(tmp_path / "out" / "outputs.npz")
        assert np.allclose(got[next(iter(got.files))], expected, rtol=1e-4, atol=1e-5)
        receipt = json.loads((tmp_path / "out" / "receipt.json").read_text())
        assert receipt["receipt"]["kind"] == "shards" and len(receipt["receipt"]["subtasks"]) == 3
        check = _cli("receipt", "check", "out/receipt.json", "--verifier-key", "op.key.pub", cwd=tmp_path)
        assert check.returncode == 0, check.stderr
        cheater_id = load_public_key(tmp_path / "rk" / "cheater-0.key.pub").node_id
        assert "slash" in mesh.ledger_kinds(cheater_id) and "reward" not in mesh.ledger_kinds(cheater_id)
        for name in ("honest", "other", "third"):
            kinds = mesh.ledger_kinds(_node_id(mesh, name))
            assert kinds.count("reward") == 1 and "slash" not in kinds, (name, kinds)
    finally:
        mesh.close()


def test_a_batch_job_keeps_its_rows_and_refuses_a_model_whose_outputs_have_no_batch_axis(tmp_path: Path) -> None:
    """Review 3: row blobs were not marked in use (collected an hour after upload, the job stuck);
    a model whose output had no leading batch axis was split, paid per row, then failed (or came
    back reassembled in the wrong shape)."""
    import onnx
    from onnx import TensorProto, helper

    from verimesh.errors import InvalidInputError
    from verimesh.jobs.job import new_job
    from verimesh.jobs.segments import check_batchable
    from verimesh.mesh.state import MeshState

    led = Ledger.create(f"sqlite:///{tmp_path / 's.db'}", generate_key())
    state = MeshState(led.engine)
    digests = [state.upload("owner", payload, quota=1 << 20) for payload in (b"job", b"row-0", b"row-1")]
    files = {"job": digests[0], "model": digests[0], "input": digests[0], "steps": []}
    spec = {"files": files, "shards": [{"input": digests[1], "tensors": []}, {"input": digests[2], "tensors": []}]}
    state.add_job("sha256:" + "1" * 64, "owner", spec, positions=2)
    state.collect_blobs(-1.0)  # everything past its time: only what no job refers to goes
    assert state.has_blobs(digests) == []
    # A model that sums its batch to one value: refused as a batch job.
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "sum.onnx")
    np.save(tmp_path / "x.npy", np.ones((1, 4), dtype=np.float32))
    job = new_job(tmp_path / "sum.onnx", tmp_path / "x.npy", tmp_path / "sum.json")
    with pytest.raises(InvalidInputError, match="output 'y' has no dynamic leading batch axis"):
        check_batchable(job)
