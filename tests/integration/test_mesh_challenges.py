"""Challenge mode over a live mesh (docs/design.md §10): the node commits (statement, trace.json,
outputs), the coordinator samples after the commitment and asks for those steps' tensors only, the
node opens them before a deadline. An honest node is paid for fewer bytes; a cheat the sample hits
is slashed from its opening alone; a node cannot fish for another sample, answer late, answer with
other bytes, or walk away from a commitment for free."""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import input_path, model_path
from tests.integration.mesh_harness import Mesh, _cli, _node_id
from verimesh.core.container import container_bytes, read_container
from verimesh.core.packing import MAGIC, pack
from verimesh.jobs.bundle import read_bundle, write_opening
from verimesh.jobs.job import Job
from verimesh.ledger.store import Ledger
from verimesh.mesh import Node
from verimesh.mesh.client import MeshError
from verimesh.mesh.state import MAX_MISSED
from verimesh.signing.keys import generate_key, load_secret_key
from verimesh.spot.spotcheck import commitment_members

pytestmark = pytest.mark.slow


class Committer(Node):
    """A node that proves and commits, then does what ``answer`` says instead of opening."""

    def __init__(self, *args: Any, answer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answer = answer
        self.seen: list[tuple[str, str, Path, Job, dict[str, Any]]] = []

    def _answer_challenge(self, task_id: str, lease_id: str, bundle: Path, job: Job,
                          challenge: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
        full = read_bundle(bundle, version=job.version)
        challenge = challenge or self.client.commit(task_id, lease_id, write_opening(full, commitment_members(job)))
        self.seen.append((task_id, lease_id, bundle, job, challenge))
        return dict(self.answer(self, task_id, lease_id, full, job, challenge) or {"state": "committed"})


def trusted_mesh(root: Path, *extra: str, accepts: int = 10, names: tuple[str, ...] = ("honest", "other")) -> Mesh:
    """A mesh whose ``names`` nodes are registered with a streak of ``accepts`` accepted jobs in the
    ledger: audit level 1 at 10, 4 (the lowest share checked) at 40. A node at level 0 has every
    step checked and is leased full transfers: nothing to challenge."""
    from tests.integration.test_ledger import history, join

    mesh = Mesh(root, extra=extra, settings={"operator_key_path": str(root / "op.key")})
    led = Ledger.open(mesh.db)
    for name in names:
        key = load_secret_key(root / f"{name}.key")
        join(led, key, 1000)
        history(led, key, accepts)
    return mesh


def _blob_count(mesh: Mesh) -> int:
    with sqlite3.connect(mesh.db.removeprefix("sqlite:///")) as conn:
        return int(conn.execute("SELECT count(*) FROM mesh_blobs").fetchone()[0])


def _done(mesh: Mesh, job_id: str, timeout: float = 90) -> dict[str, Any]:
    return dict(mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] in ("done", "failed") and d, "the job",
                              timeout))  # fmt: skip


def test_a_challenged_job_moves_less_than_the_bundle_and_its_verdict_is_the_challenged_sample(tmp_path: Path) -> None:
    mesh = trusted_mesh(tmp_path, accepts=40, names=("honest",))
    try:
        fresh = Node(mesh.url, load_secret_key(tmp_path / "other.key"), isolate=False)
        fresh.join()
        probe = json.loads(mesh.submit("--deposit", "9").stdout)["job_id"]
        lease = fresh.client.lease()  # a fresh node has every step checked: it uploads its full bundle
        assert lease is not None and lease["job_id"] == probe and lease["transfer"] == "full"
        fresh.client.release(lease["task_id"], lease["lease_id"], "the test only looks")
        fresh.close()
        mesh.node("honest")
        sent = mesh.submit("--wait", "-o", "out", "--timeout", "120s", "--verifier-key", "op.key.pub", model="rescnn")
        assert sent.returncode == 0, sent.stderr
        doc = json.loads(sent.stdout)
        task = mesh.status(doc["job_id"])["tasks"][0]
        assert task["state"] == "done" and task["node_id"] == _node_id(mesh, "honest")
        challenge = task["challenge"]
        moved = challenge["bytes"]["commitment"] + challenge["bytes"]["answer"]
        shown = _cli("status", "--coordinator", mesh.url, doc["job_id"], cwd=tmp_path)
        assert shown.returncode == 0 and f"challenged steps {challenge['steps']} ({moved} bytes up)" in shown.stdout
        short = _cli("status", "--coordinator", mesh.url, doc["job_id"][7:19], cwd=tmp_path)  # a prefix, no sha256:
        assert short.returncode == 0 and short.stdout == shown.stdout
        unknown = _cli("status", "--coordinator", mesh.url, "ffff", cwd=tmp_path)
        assert unknown.returncode == 3 and "unknown-job" in unknown.stderr
        # The full bundle of the same job, for comparison: what --transfer full would have moved.
        local = _cli("job", "new", model_path("rescnn"), "--input", input_path("rescnn"), "-o", "j.json",
                     cwd=tmp_path)  # fmt: skip
        assert local.returncode == 0
        assert _cli("prove", "j.json", "--key", "other.key", "-o", "full.vmb", cwd=tmp_path).returncode == 0
        full = (tmp_path / "full.vmb").stat().st_size
        assert moved < full, (moved, full)
        # The ledger's verdict is the challenge's sample, and the receipt holds offline.
        verdicts = [
            e.event for e in Ledger.open(mesh.db).entries(kinds=["verdict"]) if e.event["job_id"] == doc["job_id"]
        ]
        assert len(verdicts) == 1 and verdicts[0]["sampled_steps"] == challenge["steps"]
        assert challenge["samples"] < len(challenge["steps"]) + 1 < 8  # the last step and 1/16 of the others
        check = _cli("receipt", "check", "out/receipt.json", "--verifier-key", "op.key.pub", cwd=tmp_path)
        assert check.returncode == 0, check.stderr
        again = mesh.submit("--wait", "-o", "out", model="rescnn")  # refused before anything is posted
        assert again.returncode == 3 and "already exists" in again.stderr and len(mesh.status()["jobs"]) == 2
        # --transfer full still ships the whole bundle (kept for offline audit).
        sent = mesh.submit("--wait", "--transfer", "full", "--timeout", "120s", "--deposit", "11", model="rescnn")
        assert sent.returncode == 0, sent.stderr
        task = mesh.status(json.loads(sent.stdout)["job_id"])["tasks"][0]
        assert task["state"] == "done" and "challenge" not in task
        refused = mesh.submit("--transfer", "challenge", "--replicas", "2")
        assert refused.returncode == 2 and "whole spot jobs" in refused.stderr
    finally:
        mesh.close()


def perturb_final(key: Any) -> Any:
    """A bundle hook: the final output nudged, re-sealed and signed by the node (a real cheat)."""
    import numpy as np

    from verimesh.jobs.runtime import StepRunner
    from verimesh.workflows import seal_trace

    def hook(bundle: Path, job: Job) -> None:
        parsed = read_bundle(bundle, version=job.version)
        trace = {n: np.array(a) for n, a in parsed.tensors.items()}
        name = job.final_output_names[0]
        trace[name] = trace[name] + np.asarray(0.5, dtype=trace[name].dtype)
        seal_trace(job, trace, key=key, runner=StepRunner(device="cpu"), out=bundle)

    return hook


def test_a_cheat_the_challenge_hits_is_slashed_from_its_opening_and_the_task_redone(tmp_path: Path) -> None:
    mesh = trusted_mesh(tmp_path)
    cheat_key = load_secret_key(tmp_path / "other.key")
    cheater = Node(mesh.url, cheat_key, isolate=False, on_bundle=perturb_final(cheat_key))
    try:
        sent = mesh.submit()
        assert sent.returncode == 0, sent.stderr
        job_id = json.loads(sent.stdout)["job_id"]
        cheater.join()
        assert cheater.run_one()  # the last step is always challenged
        mesh.wait_for(lambda: "slash" in mesh.ledger_kinds(cheat_key.node_id), "the slash", 90)
        mesh.node("honest")
        done = _done(mesh, job_id)
        assert done["state"] == "done" and done["tasks"][0]["node_id"] == _node_id(mesh, "honest")
        first = done["tasks"][0]["history"][0]
        assert first["node_id"] == cheat_key.node_id and first["outcome"].startswith("rejected and slashed"), first
        slash = next(e.event for e in Ledger.open(mesh.db).entries(kinds=["slash"]))
        assert slash["evidence_digest"] is not None
        with pytest.raises(MeshError) as refused:
            cheater.client.lease()
        assert refused.value.status == 403
    finally:
        cheater.close()
        mesh.close()


def test_the_challenge_protocol_refuses_fishing_late_foreign_and_partial_answers(tmp_path: Path) -> None:
    mesh = trusted_mesh(tmp_path, "--answer-within", "4s")
    nodes: list[Node] = []
    try:
        full_job = json.loads(mesh.submit("--transfer", "full").stdout)["job_id"]
        job_id = json.loads(mesh.submit("--deposit", "12").stdout)["job_id"]

        def probe(node: Node, task_id: str, lease_id: str, full: Any, job: Job, challenge: dict[str, Any]) -> None:
            client = node.client
            client.heartbeat()
            # The same commitment again gets the same challenge; another one is refused (no fishing).
            again = client.commit(task_id, lease_id, write_opening(full, commitment_members(job)))
            assert again == challenge
            # However it travels (plain, or packed either way), it is the same commitment: the seed is
            # drawn over the commitment itself, so packing cannot fish for another sample.
            plain, path = write_opening(full, commitment_members(job)), f"/v1/tasks/{task_id}/commit/{lease_id}"
            for body in (plain, pack(plain, widths=(4,)), pack(plain, widths=(1,), level=3)):
                assert client._json(client._call("POST", path, body))["challenge"] == challenge
            bomb = MAGIC + b"\x01" + (1 << 40).to_bytes(8, "big") + b"x"
            zeros = MAGIC + b"\x01" + (1 << 20).to_bytes(8, "big") + zlib.compress(bytes(1 << 20))  # 1000x
            for body, status in ((bomb, 413), (zeros, 400), (pack(plain)[:-5], 400)):  # refused; the lease stands
                with pytest.raises(MeshError) as refused:
                    client._call("POST", path, body)
                assert refused.value.status == status
            # Another commitment (one member's bytes changed) is refused and not kept: review, a node
            # could fill the coordinator's disk with refused commitments, each kept forever.
            members = read_container(plain, what="commitment")
            other = [(n, bytes(members[n]) + (b"\x00" if n.startswith("sealed/") else b"")) for n in members]
            blobs_before = _blob_count(mesh)
            with pytest.raises(MeshError) as refused:
                client._call("POST", path, container_bytes(other))
            assert refused.value.status == 409 and _blob_count(mesh) == blobs_before
            empty = MAGIC + b"\x01" + (0).to_bytes(8, "big") + zlib.compress(b"")
            with pytest.raises(MeshError) as refused:  # packed nothing is no bundle either
                client._call("POST", f"/v1/tasks/{task_id}/result/{lease_id}", empty)
            assert refused.value.status in (400, 409)
            names = list(commitment_members(job))
            with pytest.raises(MeshError) as refused:
                client.commit(task_id, lease_id, write_opening(full, [names[0]]))
            assert refused.value.status == 422  # not a commitment's members
            with pytest.raises(MeshError) as refused:
                client.result(task_id, lease_id, full_bytes(full, job, names))
            assert refused.value.status == 409  # a full bundle now would answer a sample of its choosing
            # Too few members, or other ones: 422, and the lease still stands.
            if challenge["members"]:
                with pytest.raises(MeshError) as refused:
                    client.open(task_id, lease_id, write_opening(full, challenge["members"][:-1]))
                assert refused.value.status == 422
            stranger = Node(mesh.url, generate_key(), stake=5, isolate=False)
            nodes.append(stranger)
            stranger.join()
            with pytest.raises(MeshError) as refused:
                stranger.client.open(task_id, lease_id, write_opening(full, challenge["members"]))
            assert refused.value.status in (403, 409)
            time.sleep(max(0.0, challenge["deadline"] - time.time()) + 0.5)
            with pytest.raises(MeshError) as refused:  # too late: the lease is lost
                client.open(task_id, lease_id, write_opening(full, challenge["members"]))
            assert refused.value.status == 409

        def full_bytes(full: Any, job: Job, names: list[str]) -> bytes:
            return write_opening(full, names)

        prober = Committer(mesh.url, load_secret_key(tmp_path / "other.key"), isolate=False, answer=probe)
        nodes.append(prober)
        prober.join()
        # Its first lease is the full-transfer job: commit is refused there.
        lease = prober.client.lease()
        assert lease is not None and lease["job_id"] == full_job and lease["transfer"] == "full"
        with pytest.raises(MeshError) as refused:
            prober.client.commit(lease["task_id"], lease["lease_id"], b"x")
        assert refused.value.status == 409
        prober.client.release(lease["task_id"], lease["lease_id"], "the test does not run it")
        assert prober.run_one()
        assert prober.client.lease() is None  # its lease call finds the challenge lapsed (a strike), nothing else left
        task = mesh.status(job_id)["tasks"][0]
        assert task["state"] == "pending" and task["history"], task
        assert task["history"][0]["outcome"].startswith("lease lost: challenge not answered"), task
        mine = next(n for n in mesh.status()["nodes"] if n["node_id"] == prober.key.node_id)
        assert mine["missed"] == 1 and not mine["banned"]
        assert "slash" not in mesh.ledger_kinds(prober.key.node_id)
    finally:
        for node in nodes:
            node.close()
        mesh.close()


def test_a_node_that_walks_away_from_its_commitments_is_excluded(tmp_path: Path) -> None:
    """Selective abort: a node that commits, sees the sample, and answers only when it misses its
    wrong step would lose nothing if walking away were free. Each walk-away is a strike (a lapse
    or a give-back after the challenge); at MAX_MISSED the node is excluded. Nothing is slashed:
    nothing its signature proves."""
    mesh = trusted_mesh(tmp_path, "--answer-within", "2s")
    nodes: list[Node] = []
    try:
        jobs = [json.loads(mesh.submit("--deposit", str(10 + i)).stdout)["job_id"] for i in range(MAX_MISSED)]

        def walk_away(node: Node, task_id: str, lease_id: str, *_: Any) -> None:
            if len(node.seen) == 2:  # the second one given back after its challenge, the others left to lapse
                node.client.release(task_id, lease_id, "the sample hit my wrong step")

        walker = Committer(mesh.url, load_secret_key(tmp_path / "other.key"), isolate=False, answer=walk_away)
        nodes.append(walker)
        walker.join()
        assert walker.run_one()  # 1: commits, lets it lapse
        time.sleep(2.5)
        assert walker.run_one()  # its lease call finds 1 lapsed (strike 1); 2: commits, gives it back (strike 2)
        assert walker.run_one()  # 3: commits, lets it lapse
        time.sleep(2.5)
        mesh.node("honest")  # whose lease calls find 3 lapsed: strike 3
        mesh.wait_for(lambda: next(n for n in mesh.status()["nodes"]
                                   if n["node_id"] == walker.key.node_id)["missed"] >= MAX_MISSED,
                      "the third strike", 60)  # fmt: skip
        with pytest.raises(MeshError) as refused:
            walker.client.lease()
        assert refused.value.status == 403 and refused.value.code == "banned"
        mesh.node("honest")
        for job_id in jobs:
            assert _done(mesh, job_id)["state"] == "done"
        assert "slash" not in mesh.ledger_kinds(walker.key.node_id)
    finally:
        for node in nodes:
            node.close()
        mesh.close()


def test_a_coordinator_outage_mid_challenge_strikes_no_one(tmp_path: Path) -> None:
    """The coordinator is killed after an honest node committed and restarted past the heartbeat
    timeout; another node's request reaches it first. The honest node's answer, inside its
    deadline, is still taken: the time the coordinator was down is no node's (found by review:
    the first request after a restart used to expire every lease as a missed heartbeat)."""
    from tests.integration.mesh_harness import HEARTBEAT_TIMEOUT

    mesh = trusted_mesh(tmp_path)
    bystander = Node(mesh.url, generate_key(), stake=5, isolate=False)
    nodes: list[Node] = [bystander]

    def across_a_restart(node: Node, task_id: str, lease_id: str, full: Any, job: Job,
                         challenge: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        mesh.kill_coordinator()
        time.sleep(HEARTBEAT_TIMEOUT + 2)
        mesh.start()
        assert bystander.client.lease() is None  # the first request after the restart is another node's
        return node.client.open(task_id, lease_id, write_opening(full, challenge["members"]))

    try:
        job_id = json.loads(mesh.submit().stdout)["job_id"]
        bystander.join()
        honest = Committer(mesh.url, load_secret_key(tmp_path / "honest.key"), isolate=False, answer=across_a_restart)
        nodes.append(honest)
        honest.join()
        assert honest.run_one()
        done = _done(mesh, job_id)
        assert done["state"] == "done" and done["tasks"][0]["node_id"] == honest.key.node_id, done
        assert done["tasks"][0]["attempts"] == 1
        mine = next(n for n in mesh.status()["nodes"] if n["node_id"] == honest.key.node_id)
        assert mine["missed"] == 0 and not mine["banned"]
    finally:
        for node in nodes:
            node.close()
        mesh.close()
