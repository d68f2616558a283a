"""`serve --verifiers ray`: the coordinator verifies results on a Ray fleet ahead of settlement
and stays the ledger's only writer. A prefetched verdict is taken only when it was reached on the
very bundle, job, key, samples and seed settlement would use; a prefetched reject slashes only
through evidence that re-checks."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import Keys
from tests.integration.mesh_harness import Mesh, _node_id
from tests.integration.test_fleet import cheat
from tests.integration.test_ledger import join, new_ledger, operator, post
from verimesh.assurance.simulate import copy_job
from verimesh.core.digest import sha256_file
from verimesh.jobs.job import Job
from verimesh.jobs.verdict import Check, Verdict
from verimesh.settlement import Prefetched, node_standing, verify_and_settle
from verimesh.workflows import prove, verify


def _prefetched(bundle: Path, job: Job, keys: Keys, verdict: Verdict, *, seed: int = 7, samples: int = 0,
                digest: str | None = None) -> Prefetched:  # fmt: skip
    return Prefetched(digest or sha256_file(bundle), job.job_id, keys.node.public.key.hex(), samples, seed, verdict,
                      "ray:0")  # fmt: skip


@pytest.fixture()
def ledger_with_node(tmp_path: Path, jobs: dict[str, Job], keys: Keys) -> tuple[object, Job]:
    led = new_ledger(tmp_path / "led.db")
    join(led, keys.node, 1000)
    post(led, jobs["rescnn"].job_id)
    return led, jobs["rescnn"]


def test_a_prefetched_accept_that_does_not_fit_is_not_taken(
    tmp_path: Path, keys: Keys, ledger_with_node: tuple[object, Job]
) -> None:
    """A cheat with a fleet 'accept' beside it: a seed, a sample count or bundle bytes other than
    settlement's own, and the bundle is verified here (and rejected, and slashed)."""
    led, job = ledger_with_node
    bad = cheat(job, keys, tmp_path / "cheat.vmb")
    samples = node_standing(led, keys.node.node_id).samples_for(len(job.steps), job.policy.samples)  # type: ignore[arg-type]
    accept = Verdict("accept", (Check("forged", True, "a fleet verdict for something else"),))
    for wrong in (
        _prefetched(bad, job, keys, accept, seed=8, samples=samples),
        _prefetched(bad, job, keys, accept, seed=7, samples=samples + 1),
        _prefetched(bad, job, keys, accept, seed=7, samples=samples, digest="sha256:" + "0" * 64),
        replace(_prefetched(bad, job, keys, accept, seed=7, samples=samples), job_id="sha256:" + "1" * 64),
    ):
        settled = verify_and_settle(bad, job=job, ledger=led, writer=operator(led), seed=7, prefetched=wrong)  # type: ignore[arg-type]
        assert settled.verified_by == "here"
        assert settled.verdict.status == "reject"
    assert node_standing(led, keys.node.node_id).slashed > 0  # type: ignore[arg-type]


def test_a_fitting_prefetched_verdict_is_taken_and_a_reject_slashes_only_through_its_evidence(
    tmp_path: Path, keys: Keys, ledger_with_node: tuple[object, Job]
) -> None:
    led, job = ledger_with_node
    good = tmp_path / "good.vmb"
    prove(job, key=keys.node, out=good, device="cpu")
    samples = node_standing(led, keys.node.node_id).samples_for(len(job.steps), job.policy.samples)  # type: ignore[arg-type]
    # A fleet 'reject' of an honest bundle, pointing at evidence that proves another node's fraud:
    # the evidence does not re-check against this node's statement, so the bundle is verified
    # here (accepted), and nothing is slashed.
    bad = cheat(job, replace(keys, node=keys.other), tmp_path / "other.vmb")
    real_reject = verify(bad, job=job, node_key=keys.other.public, samples=samples, seed=7)
    assert real_reject.status == "reject" and real_reject.evidence
    wrong = _prefetched(good, job, keys, real_reject, samples=samples)
    settled = verify_and_settle(good, job=job, ledger=led, writer=operator(led), seed=7, prefetched=wrong)  # type: ignore[arg-type]
    assert settled.verified_by == "here" and settled.verdict.status == "accept"
    assert node_standing(led, keys.node.node_id).slashed == 0  # type: ignore[arg-type]
    # So is one whose evidence proves this very node's fraud on this claim, in another statement
    # than this bundle's (review 2): the verdict settled is about this bundle, verified here.
    own_cheat = cheat(job, keys, tmp_path / "own-cheat.vmb")
    own_reject = verify(own_cheat, job=job, node_key=keys.node.public, samples=samples, seed=7)
    assert own_reject.status == "reject" and own_reject.evidence
    settled = verify_and_settle(good, job=job, ledger=led, writer=operator(led), seed=7,  # type: ignore[arg-type]
                                prefetched=_prefetched(good, job, keys, own_reject, samples=samples))  # fmt: skip
    assert settled.verified_by == "here" and settled.verdict.status == "accept"
    assert node_standing(led, keys.node.node_id).slashed == 0  # type: ignore[arg-type]
    # So is a fleet reject with no evidence at all.
    bare = replace(wrong, verdict=replace(real_reject, evidence=None))
    settled = verify_and_settle(good, job=job, ledger=led, writer=operator(led), seed=7, prefetched=bare)  # type: ignore[arg-type]
    assert settled.verified_by == "here"
    # The fleet's accept of the honest bundle (on a fresh job) is taken as it is, with the outputs
    # read from the bundle.
    fresh = copy_job(job)
    post(led, fresh.job_id)  # type: ignore[arg-type]
    again = tmp_path / "again.vmb"
    prove(fresh, key=keys.node, out=again, device="cpu")
    samples = node_standing(led, keys.node.node_id).samples_for(len(job.steps), job.policy.samples)  # type: ignore[arg-type]
    honest = verify(again, job=fresh, node_key=keys.node.public, samples=samples, seed=7)
    outputs = tmp_path / "outputs.npz"
    settled = verify_and_settle(again, job=fresh, ledger=led, writer=operator(led), seed=7, outputs_out=outputs,  # type: ignore[arg-type]
                                prefetched=_prefetched(again, fresh, keys, honest, samples=samples))  # fmt: skip
    assert settled.verified_by == "ray:0" and settled.verdict.status == "accept" and outputs.stat().st_size > 0
    assert "reward" in [k for _, k in settled.appended]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_turn")
def test_serve_with_a_ray_fleet_verifies_there_and_settles_here(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path, extra=("--verifiers", "ray", "--verifier-actors", "1"))
    try:
        assert "verifier fleet: 1 Ray actor(s) on 127.0.0.1:" in (tmp_path / "serve.log").read_text()
        mesh.cheater()
        sent = mesh.submit()
        assert sent.returncode == 0, sent.stderr
        job_id = json.loads(sent.stdout)["job_id"]
        mesh.wait_for(lambda: any("slashed" in h["outcome"] for h in mesh.status(job_id)["tasks"][0]["history"]),
                      "the cheat to be slashed")  # fmt: skip
        rejected = mesh.status(job_id)["tasks"][0]["verdict"]
        assert rejected["verdict"] == "reject" and rejected["verified_by"] == "ray:0", rejected
        mesh.node("honest")
        done = mesh.wait_for(lambda: (d := mesh.status(job_id))["state"] == "done" and d, "the honest node")
        task = done["tasks"][0]
        assert task["node_id"] == _node_id(mesh, "honest")
        assert task["verdict"]["verdict"] == "accept" and task["verdict"]["verified_by"] == "ray:0", task
        honest_kinds = mesh.ledger_kinds(_node_id(mesh, "honest"))
        assert "slash" not in honest_kinds and honest_kinds.count("reward") == 1
        # SIGTERM stops it gracefully (Ray's own handler, which exits at once, is not left in place).
        assert mesh.coordinator is not None
        mesh.coordinator.send_signal(signal.SIGTERM)
        assert mesh.coordinator.wait(timeout=60) == 0
        assert "coordinator stopped" in (tmp_path / "serve.log").read_text()
    finally:
        mesh.close()


class _BrokenFleet:
    name = "ray"

    def __init__(self) -> None:
        self.calls = 0
        self.actors = [object()]

    def run(self, tasks: object, *, timeout: float = 0) -> object:
        self.calls += 1
        raise RuntimeError("the fleet is down")

    def close(self) -> None:
        pass


def test_a_prefetch_that_fails_for_one_result_or_for_all_decides_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong ahead of settlement (a job's files that cannot be written, a fleet that
    fails) leaves the results to the verifier child: no pass dies on it (review: one job with a
    path too long for the prefetch folder stopped every settlement)."""
    from verimesh.mesh import coordinator as module
    from verimesh.mesh.state import Verifying
    from verimesh.signing.keys import generate_key

    fleet = _BrokenFleet()
    coordinator = module.Coordinator(f"sqlite:///{tmp_path / 'c.db'}", generate_key(), isolate=False, fleet=fleet)  # type: ignore[arg-type]
    items = [Verifying(f"t{i}", f"sha256:{i:064x}", "vm-00000000000000000000", f"sha256:{i:064x}") for i in range(2)]

    def too_long(job_id: str) -> None:
        raise OSError(36, "File name too long")

    monkeypatch.setattr(coordinator.state, "job", too_long)
    assert coordinator._prefetch(items, tmp_path / "pre") == {}
    monkeypatch.setattr(coordinator.state, "job", lambda job_id: None)
    assert coordinator._prefetch(items, tmp_path / "pre") == {} and fleet.calls == 2


def test_a_job_naming_a_path_longer_than_any_work_folder_can_hold_is_refused(jobs: dict[str, Job]) -> None:
    from verimesh.errors import InvalidInputError
    from verimesh.jobs.job import MAX_PATH_BYTES, job_from_bytes

    path = jobs["mlp"].base_dir / "mlp.json"
    doc = json.loads(path.read_text())
    for long in ("a/" * (MAX_PATH_BYTES // 2) + "step.onnx", "é/" * (MAX_PATH_BYTES // 3) + "s.onnx", "n" * 256):
        doc["steps"][0]["path"] = long
        with pytest.raises(InvalidInputError, match="bytes long"):
            job_from_bytes(json.dumps(doc).encode(), jobs["mlp"].base_dir, what="job")
    # A local job's model may sit anywhere: its path is not capped (review 2: a job new_job wrote
    # with a model 1,200 characters away no longer loaded).
    doc = json.loads(path.read_text())
    doc["model"]["path"] = "../" * 400 + doc["model"]["path"].lstrip("./")
    with pytest.raises(InvalidInputError) as refused:
        job_from_bytes(json.dumps(doc).encode(), jobs["mlp"].base_dir, what="job")
    assert "bytes long" not in refused.value.message
