"""Random sequences of what nodes, job owners and verifiers do (register, post a job, verify honest,
fraudulent, equivocating and replayed bundles, slash with evidence, top up, withdraw, release), all
through the library: after every step no stake is negative, and at the end every rule holds
(`ledger verify --rules`), each (node, job) is rewarded at most once and never beyond the job's
deposit, and each fraud claim slashed at most once."""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Keys, input_path, model_path
from tests.integration.test_ledger import OWNER, fraud_bundle
from verimesh.errors import VerimeshError
from verimesh.jobs.job import Job, new_job
from verimesh.ledger.events import sign_request
from verimesh.ledger.store import Ledger
from verimesh.settlement import (
    audit_ledger,
    node_standing,
    register_job,
    register_node,
    release,
    slash_with_evidence,
    top_up,
    verify_and_settle,
    withdraw,
)
from verimesh.signing.keys import SecretKey, generate_key
from verimesh.workflows import prove, verify


class World:
    """Keys, two jobs and the bundles and evidence the steps draw from (a plain class: hypothesis
    would print a dataclass field by field)."""

    def __init__(self, nodes: dict[str, SecretKey], jobs: dict[str, Job], bundles: dict[str, tuple[Path, str]],
                 evidence: dict[str, Path]) -> None:  # fmt: skip
        self.nodes, self.jobs, self.bundles, self.evidence = nodes, jobs, bundles, evidence

    def __repr__(self) -> str:
        return "World()"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> World:
    d = tmp_path_factory.mktemp("invariants")
    jobs = {j: new_job(model_path("mlp"), input_path("mlp"), d / f"{j}.json") for j in ("j1", "j2")}
    nodes = {"a": keys.node, "b": keys.other}
    bundles: dict[str, tuple[Path, str]] = {}
    for who in nodes:
        for j, job in jobs.items():
            bundles[f"{who}-{j}"] = (prove(job, key=nodes[who], out=d / f"{who}-{j}.vmb", device="cpu").bundle, j)
    bundles["a-j2-fraud"] = (fraud_bundle(jobs["j2"], keys.node, d / "fraud.vmb"), "j2")
    bundles["a-j1-replayed-to-j2"] = (bundles["a-j1"][0], "j2")
    verdict = verify(bundles["a-j2-fraud"][0], job=jobs["j2"], node_key=keys.node.public, evidence_out=d / "f.vme")
    assert verdict.status == "reject"
    return World(nodes, jobs, bundles, {"fraud": d / "f.vme"})


@dataclass(frozen=True)
class Step:
    what: str
    who: str = "a"
    amount: int = 0
    name: str = ""


steps = st.one_of(
    st.builds(Step, st.just("register"), st.sampled_from("ab"), st.integers(1, 200)),
    st.builds(Step, st.just("post"), amount=st.integers(1, 7), name=st.sampled_from(["j1", "j2"])),
    st.builds(Step, st.just("top-up"), st.sampled_from("ab"), st.integers(1, 100)),
    st.builds(Step, st.just("withdraw"), st.sampled_from("ab"), st.integers(1, 150)),
    st.builds(Step, st.just("release"), st.sampled_from("ab")),
    st.builds(
        Step,
        st.just("verify"),
        name=st.sampled_from(["a-j1", "a-j2", "b-j1", "b-j2", "a-j2-fraud", "a-j1-replayed-to-j2"]),
    ),
    st.builds(Step, st.just("slash"), name=st.just("fraud")),
)


def play(led: Ledger, op: SecretKey, world: World, step: Step) -> None:
    key = world.nodes[step.who]
    if step.what in ("register", "top-up", "withdraw"):
        request = sign_request(key, action=step.what, ledger_id=led.ledger_id, amount=step.amount)
        {"register": register_node, "top-up": top_up, "withdraw": withdraw}[step.what](led, request, writer=op)
    elif step.what == "post":
        job_id = world.jobs[step.name].job_id
        request = sign_request(OWNER, action="job", ledger_id=led.ledger_id, amount=step.amount, job_id=job_id)
        register_job(led, request, writer=op)
    elif step.what == "release":
        release(led, key.node_id, writer=op)
    elif step.what == "verify":
        bundle, job = world.bundles[step.name]
        verify_and_settle(bundle, job=world.jobs[job], ledger=led, writer=op)
    else:
        slash_with_evidence(led, world.evidence[step.name], writer=op)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(steps, min_size=3, max_size=12))
def test_the_rules_hold_over_any_sequence(world: World, plan: list[Step]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        op = generate_key()
        led = Ledger.create(str(Path(tmp) / "mesh.db"), op, settings={"unbonding_seconds": 0, "reward": 2})
        for step in plan:
            try:
                play(led, op, world, step)
            except VerimeshError:
                pass  # a refusal: nothing was written (checked below by the rules)
            for key in world.nodes.values():
                standing = node_standing(led, key.node_id)
                assert standing.stake >= 0 and all(u.amount >= 0 for u in standing.unbonding), (step, standing)
        report = audit_ledger(led)
        assert report.ok, (plan, report.problems, report.violations)
        events = [e.event for e in led.entries()]
        rewards = Counter((e["node_id"], e["job_id"]) for e in events if e["kind"] == "reward")
        slashes = Counter((e["reason"], e["node_id"], e["job_id"], tuple(e["step_range"]))
                          for e in events if e["kind"] == "slash")  # fmt: skip
        assert all(n == 1 for n in rewards.values()) and all(n == 1 for n in slashes.values())
        for job in world.jobs.values():
            posted = [e for e in events if e["kind"] == "job" and e["job_id"] == job.job_id]
            paid = sum(e["amount"] for e in events if e["kind"] == "reward" and e["job_id"] == job.job_id)
            assert paid <= sum(e["deposit"] for e in posted[:1])
        assert not any(e["kind"] == "reward" and e["node_id"] == OWNER.node_id for e in events)
