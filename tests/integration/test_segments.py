"""One job across several nodes (issue 15): segments, links, chain verification, receipts.

Every accept path has its reject beside it, and every blame the test that an honest node is not
blamed that way."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import MODELS, input_path, model_path, perturbed
from verimesh.cli.app import cli
from verimesh.core.digest import tensor_digest
from verimesh.errors import InvalidInputError
from verimesh.jobs.bundle import read_bundle
from verimesh.jobs.job import Job, Segment, load_job, new_job
from verimesh.jobs.runtime import StepRunner
from verimesh.jobs.segments import plan_segments, segment_view, write_segments
from verimesh.signing.keys import SecretKey, generate_key, write_key_pair
from verimesh.spot.evidence import check_evidence
from verimesh.spot.sealed_evidence import write_link_evidence
from verimesh.spot.spotcheck import run_steps
from verimesh.subtasks.chain import verify_chain
from verimesh.subtasks.receipt import (
    check_receipt,
    cosign_receipt,
    receipt_body,
    recheck_receipt,
    sign_receipt,
)
from verimesh.workflows import Worker, linked_inputs, prove, seal_trace, verify


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> list[SecretKey]:
    return [generate_key() for _ in range(3)]


@dataclasses.dataclass
class Chain:
    job: Job
    job_path: Path
    parts: list[Path]
    views: list[Job]
    bundles: list[Path]
    folder: Path


def make_chain(folder: Path, name: str, nodes: list[SecretKey], *, count: int = 3) -> Chain:
    job_path = folder / f"{name}.json"
    job = new_job(model_path(name), input_path(name), job_path)
    written = write_segments(job_path, count, folder / "parts")
    bundles: list[Path] = []
    for k, (part, view) in enumerate(written):
        out = folder / f"s{k}.vmb"
        assert view.segment is not None
        prove(part, key=nodes[k], out=out, device="cpu", inputs_from=[bundles[j] for j in view.segment.links()])
        bundles.append(out)
    return Chain(job, job_path, [p for p, _ in written], [v for _, v in written], bundles, folder)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, nodes: list[SecretKey]) -> Chain:
    return make_chain(tmp_path_factory.mktemp("chain"), "transformer", nodes)


def publics(nodes: list[SecretKey]) -> list[Any]:
    return [n.public for n in nodes]


# -- accepted ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_three_segment_chain_by_three_nodes_is_accepted_and_equals_the_whole_job(
    tmp_path: Path, name: str, nodes: list[SecretKey]
) -> None:
    c = make_chain(tmp_path, name, nodes)
    verdict, values = verify_chain(c.bundles, job=c.job_path, node_keys=publics(nodes), samples="all")
    assert verdict, verdict.reason
    assert [s.index for s in verdict.segments] == [0, 1, 2]
    assert {s.public.node_id for s in verdict.segments} == {n.node_id for n in nodes}
    # One node running the whole job gets bit for bit the same outputs.
    whole = tmp_path / "whole.vmb"
    prove(c.job_path, key=nodes[0], out=whole, device="cpu")
    parsed = read_bundle(whole, version=2)
    assert set(values) == set(c.job.output_names)
    for out in c.job.output_names:
        assert np.array_equal(values[out], parsed.tensors[out])
        assert verdict.outputs[out] == tensor_digest(out, parsed.tensors[out])


def test_bundles_in_any_order_and_each_segment_alone(chain: Chain, nodes: list[SecretKey]) -> None:
    order = [2, 0, 1]
    verdict, _ = verify_chain(
        [chain.bundles[i] for i in order], job=chain.job, node_keys=[nodes[i].public for i in order]
    )
    assert verdict, verdict.reason
    for k in range(3):  # a job owner may also check one segment against its segment file
        assert verify(chain.bundles[k], job=chain.parts[k], node_key=nodes[k].public)


def test_sampling_spreads_over_the_job_and_always_checks_each_segments_last_step(
    chain: Chain, nodes: list[SecretKey]
) -> None:
    verdict, _ = verify_chain(chain.bundles, job=chain.job, node_keys=publics(nodes), samples=0, seed=7)
    assert verdict
    for seg in verdict.segments:
        assert seg.step_range[1] - 1 in seg.sampled_steps
    sampled = sorted(s for seg in verdict.segments for s in seg.sampled_steps)
    again, _ = verify_chain(chain.bundles, job=chain.job, node_keys=publics(nodes), samples=2, seed=7)
    more = sorted(s for seg in again.segments for s in seg.sampled_steps)
    assert set(sampled) < set(more) and len(more) == len(sampled) + 2


# -- rejected: the chain -------------------------------------------------------------------------


def test_missing_segment_is_rejected(chain: Chain, nodes: list[SecretKey]) -> None:
    verdict, values = verify_chain(chain.bundles[::2], job=chain.job, node_keys=publics(nodes)[::2])
    assert verdict.status == "reject" and not values
    assert verdict.checks[-1].name == "split" and "missing: 1" in verdict.reason


def test_segment_given_twice_is_rejected(chain: Chain, nodes: list[SecretKey]) -> None:
    bundles = [chain.bundles[0], chain.bundles[1], chain.bundles[1]]
    verdict, _ = verify_chain(bundles, job=chain.job, node_keys=[nodes[0].public, nodes[1].public, nodes[1].public])
    assert verdict.status == "reject" and "given twice" in verdict.reason


def test_segment_swapped_from_another_job_is_rejected(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    other = make_chain(tmp_path, "transformer", nodes)  # the same model and input, another job (nonce)
    verdict, _ = verify_chain([chain.bundles[0], other.bundles[1], chain.bundles[2]], job=chain.job,
                              node_keys=publics(nodes))  # fmt: skip
    assert verdict.status == "reject"
    assert verdict.checks[-1].name == "split" and "another job" in verdict.reason


def test_segment_signed_by_another_node_is_rejected(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    resigned = tmp_path / "s1-by-n3.vmb"
    prove(chain.parts[1], key=nodes[2], out=resigned, device="cpu", inputs_from=[chain.bundles[0]])
    verdict, _ = verify_chain([chain.bundles[0], resigned, chain.bundles[2]], job=chain.job, node_keys=publics(nodes))
    assert verdict.status == "reject"
    assert verdict.segments[-1].index == 1 and verdict.segments[-1].verdict.checks[-1].name == "signature"


def test_whole_job_bundle_is_not_a_segment(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    whole = tmp_path / "whole.vmb"
    prove(chain.job_path, key=nodes[0], out=whole, device="cpu")
    verdict, _ = verify_chain([whole], job=chain.job, node_keys=[nodes[0].public])
    assert verdict.status == "reject" and "claims no split" in verdict.reason
    # ... and a segment's bundle is not the whole job's.
    assert verify(chain.bundles[2], job=chain.job, node_key=nodes[2].public).status == "reject"


def _forged(chain: Chain, view: Job, key: SecretKey, out: Path, *, trace_edit: Any = None, links: Any = None) -> Path:
    """A segment bundle sealed with the honest code around whatever trace and links a cheat chooses."""
    runner = StepRunner(device="cpu", precision=view.policy.precision, optimization=view.policy.optimization)
    inputs = view.read_input()
    linked, honest_links = linked_inputs(view, chain.bundles[: view.segment.index] if view.segment else [])
    inputs.update(linked)
    if trace_edit is not None:
        inputs = trace_edit(inputs)
    trace = run_steps(view, None, inputs, runner)
    seal_trace(view, trace, key=key, runner=runner, out=out, links=honest_links if links is None else links(trace))
    return out


def test_overlapping_ranges_are_rejected(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    view = chain.views[0]
    assert view.segment is not None
    # A node claims segment 0 of a split whose ranges overlap: made with the honest sealing code.
    bad = Segment(view.segment.parent_job_id, 0, ((0, 3), (2, 5), (5, 8)), view.segment.linked,
                  view.segment.final_outputs, view.segment.parent)  # fmt: skip
    steps = tuple(dataclasses.replace(s, index=i) for i, s in enumerate(chain.job.steps[:3]))
    forged_view = dataclasses.replace(view, segment=bad, steps=steps, model_outputs=view.model_outputs[:0] + tuple(
        dataclasses.replace(view.model_outputs[0], name=n) for n in chain.job.steps[2].outputs))  # fmt: skip
    out = tmp_path / "overlap.vmb"
    _forged(chain, forged_view, nodes[0], out)
    verdict, _ = verify_chain([out, chain.bundles[1], chain.bundles[2]], job=chain.job, node_keys=publics(nodes))
    assert verdict.status == "reject" and verdict.checks[-1].name == "split"
    assert "another split" in verdict.reason or "contiguous" in verdict.reason


# -- links: the later node answers for what it took; an honest one is never blamed ---------------


def test_link_to_a_tensor_the_predecessor_never_committed_is_the_later_nodes_fault(
    tmp_path: Path, chain: Chain, nodes: list[SecretKey]
) -> None:
    view = chain.views[1]
    name = view.linked_names[0]

    def nudge(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**inputs, name: perturbed(inputs[name], delta=0.25)}

    def own_links(trace: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        statement = read_bundle(chain.bundles[0], version=2).envelope.statement_digest()
        tensors = {n: tensor_digest(n, trace[n]) for n in view.linked_names}
        return [{"segment": 0, "statement": statement, "tensors": tensors}]

    bad = _forged(chain, view, nodes[1], tmp_path / "s1-bad-link.vmb", trace_edit=nudge, links=own_links)
    alone = verify(bad, job=chain.parts[1], node_key=nodes[1].public)
    assert alone, alone.reason  # consistent on its own
    verdict, _ = verify_chain([chain.bundles[0], bad, chain.bundles[2]], job=chain.job, node_keys=publics(nodes),
                              evidence_out=tmp_path / "link.vme")  # fmt: skip
    assert verdict.status == "reject" and verdict.checks[-1].name == "link-0-1"
    result = check_evidence(tmp_path / "link.vme")
    assert result.proves_fraud and result.kind == "link" and result.node_id == nodes[1].node_id
    # The same evidence written over the honest pair proves nothing.
    honest = tmp_path / "honest-link.vme"
    write_link_evidence(honest, job=view, envelope=read_bundle(chain.bundles[1], version=2).envelope,
                        public=nodes[1].public, linked=read_bundle(chain.bundles[0], version=2).envelope,
                        reason="made up", tensor=name)  # fmt: skip
    assert not check_evidence(honest).proves_fraud


def test_committed_input_other_than_the_link_names_is_proven(
    tmp_path: Path, chain: Chain, nodes: list[SecretKey]
) -> None:
    view = chain.views[1]
    name = view.linked_names[0]
    bad = _forged(chain, view, nodes[1], tmp_path / "s1-bad-input.vmb",
                  trace_edit=lambda t: {**t, name: perturbed(t[name], delta=0.25)})  # fmt: skip
    verdict = verify(bad, job=chain.parts[1], node_key=nodes[1].public, evidence_out=tmp_path / "bind.vme")
    assert verdict.status == "reject" and verdict.checks[-1].name == "link-binding"
    result = check_evidence(tmp_path / "bind.vme")
    assert result.proves_fraud and result.node_id == nodes[1].node_id and result.job_id == view.job_id


def test_a_predecessor_that_signs_two_statements_gets_the_later_node_no_blame(
    tmp_path: Path, chain: Chain, nodes: list[SecretKey]
) -> None:
    view = chain.views[0]
    runner = StepRunner(device="cpu", precision=view.policy.precision, optimization=view.policy.optimization)
    trace = run_steps(view, None, view.read_input(), runner)
    other_runtime = SimpleNamespace(provider="SomeOtherProvider", precision=runner.precision,
                                    optimization=runner.optimization)  # fmt: skip
    # A second statement with the same outputs: segment 1 took exactly what it signs, so the
    # chain holds whichever of the two the verifier is given.
    same = tmp_path / "s0-same-outputs.vmb"
    seal_trace(view, trace, key=nodes[0], runner=other_runtime, out=same)  # type: ignore[arg-type]
    verdict, _ = verify_chain([same, chain.bundles[1], chain.bundles[2]], job=chain.job, node_keys=publics(nodes))
    assert verdict, verdict.reason
    # A second statement with other outputs (inside the tolerance, so it verifies on its own):
    # segment 1 built on the first one and is not to blame.
    name = view.output_names[0]
    nudged = {**trace, name: perturbed(trace[name], delta=1e-7)}
    second = tmp_path / "s0-second.vmb"
    seal_trace(view, nudged, key=nodes[0], runner=runner, out=second)
    assert verify(second, job=chain.parts[0], node_key=nodes[0].public, samples="all")
    verdict, _ = verify_chain([second, chain.bundles[1], chain.bundles[2]], job=chain.job, node_keys=publics(nodes))
    assert verdict.status == "reject" and verdict.checks[-1].name == "link-0-1"
    assert verdict.evidence is None


def test_a_tampered_tensor_a_later_segment_consumes_is_always_caught(
    tmp_path: Path, chain: Chain, nodes: list[SecretKey]
) -> None:
    """Every step producing what a later segment builds on, and every segment's first step, is
    re-run whatever the draw (the review found a tampered first-step residual accepted 86% of the time)."""
    view = chain.views[1]
    first = view.steps[0].outputs[0]

    runner = StepRunner(device="cpu", precision=view.policy.precision, optimization=view.policy.optimization)
    inputs = view.read_input()
    linked, links = linked_inputs(view, [chain.bundles[0]])
    inputs.update(linked)
    trace: dict[str, np.ndarray] = dict(inputs)
    for step in view.steps:  # the cheat: step 0 of the segment off by 0.5, the rest honest from it
        produced = runner.run(step.digest, view.read_step_model(step.index), {n: trace[n] for n in step.inputs},
                              step.outputs)  # fmt: skip
        if step.index == 0:
            produced = {**produced, first: perturbed(produced[first], delta=0.5)}
        trace.update(produced)
    bad = tmp_path / "s1-first.vmb"
    seal_trace(view, trace, key=nodes[1], runner=runner, out=bad, links=links)
    for seed in range(10):
        verdict, _ = verify_chain([chain.bundles[0], bad, chain.bundles[2]], job=chain.job,
                                  node_keys=publics(nodes), samples=0, seed=seed)  # fmt: skip
        assert verdict.status == "reject", seed
        assert verdict.segments[-1].index == 1


def test_a_segment_alone_hands_out_no_outputs(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    verdict = verify(chain.bundles[2], job=chain.parts[2], node_key=nodes[2].public)
    assert verdict and "links checked only when the chain is verified" in next(
        c.detail for c in verdict.checks if c.name == "bindings"
    )
    with pytest.raises(InvalidInputError, match="only as part of its chain"):
        verify(chain.bundles[2], job=chain.parts[2], node_key=nodes[2].public, outputs_out=tmp_path / "o.npz")
    assert not (tmp_path / "o.npz").exists()
    from verimesh.workflows import verified_outputs

    alone, values = verified_outputs(chain.bundles[2], job=chain.parts[2], node_key=nodes[2].public)
    assert alone and values == {}
    write_key_pair(tmp_path / "n2.key", nodes[2])
    result = CliRunner().invoke(cli, ["outputs", str(chain.bundles[2]), "--job", str(chain.parts[2]), "--node-key",
                                      str(tmp_path / "n2.key.pub")])  # fmt: skip
    assert result.exit_code == 3 and "only as part of its chain" in result.output


def test_claims_are_json_exact(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    """A segment claiming index true (equal to 1 in Python) is not segment 1."""
    from verimesh.signing.envelope import make_statement, sign_statement

    parsed = read_bundle(chain.bundles[1], version=2)
    statement = parsed.envelope.statement()
    statement["predicate"]["segment"]["index"] = True
    subjects = {s["name"]: "sha256:" + s["digest"]["sha256"] for s in statement["subject"]}
    envelope = sign_statement(make_statement(subjects, statement["predicateType"], statement["predicate"]), nodes[1])
    from verimesh.jobs.bundle import write_bundle

    out = tmp_path / "s1-bool.vmb"
    write_bundle(out, envelope, parsed.trace, dict(parsed.tensors), version=2)
    verdict, _ = verify_chain([chain.bundles[0], out, chain.bundles[2]], job=chain.job, node_keys=publics(nodes))
    assert verdict.status == "reject"


def test_wrong_step_in_a_segment_is_that_nodes_fault(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    view = chain.views[2]
    runner = StepRunner(device="cpu", precision=view.policy.precision, optimization=view.policy.optimization)
    inputs = view.read_input()
    inputs.update(linked_inputs(view, [chain.bundles[1]])[0])
    trace = run_steps(view, None, inputs, runner)
    last = view.steps[-1].outputs[0]
    trace[last] = perturbed(trace[last], delta=5.0)
    _, links = linked_inputs(view, [chain.bundles[1]])
    bad = tmp_path / "s2-bad.vmb"
    seal_trace(view, trace, key=nodes[2], runner=runner, out=bad, links=links)
    verdict, values = verify_chain([*chain.bundles[:2], bad], job=chain.job, node_keys=publics(nodes),
                                   evidence_out=tmp_path / "step.vme")  # fmt: skip
    assert verdict.status == "reject" and not values
    assert [s.verdict.status for s in verdict.segments] == ["accept", "accept", "reject"]
    result = check_evidence(tmp_path / "step.vme")
    assert result.proves_fraud and result.node_id == nodes[2].node_id and result.job_id == view.job_id
    # Evidence made up over the honest segments proves nothing against them.
    from tests.conftest import step_evidence

    for k in (0, 1):
        made_up = step_evidence(chain.views[k], chain.bundles[k], nodes[k].public, tmp_path / f"made-up-{k}.vme")
        assert not check_evidence(made_up).proves_fraud


# -- the prover's side --------------------------------------------------------------------------


def test_prove_checks_what_it_builds_on(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    worker = Worker(nodes[1], device="cpu")
    with pytest.raises(InvalidInputError, match="takes inputs from segment"):
        worker.prove(chain.parts[1], out=tmp_path / "a.vmb")
    with pytest.raises(InvalidInputError, match="not a bundle of a segment this one takes inputs from"):
        worker.prove(chain.parts[1], out=tmp_path / "b.vmb", inputs_from=[chain.bundles[2]])
    with pytest.raises(InvalidInputError, match="takes no inputs from other segments"):
        worker.prove(chain.parts[0], out=tmp_path / "c.vmb", inputs_from=[chain.bundles[0]])
    with pytest.raises(InvalidInputError, match="not whole jobs"):
        worker.prove(chain.job_path, out=tmp_path / "d.vmb", inputs_from=[chain.bundles[0]])
    # A predecessor whose sealed bytes were changed is refused before anything runs.
    data = bytearray(chain.bundles[0].read_bytes())
    parsed = read_bundle(chain.bundles[0], version=2)
    name = chain.views[1].linked_names[0]
    member = bytes(parsed.tensors[name].tobytes())
    at = bytes(data).find(member[:64])
    data[at + 8] ^= 0x40
    tampered = tmp_path / "s0-tampered.vmb"
    tampered.write_bytes(bytes(data))
    with pytest.raises(InvalidInputError):
        worker.prove(chain.parts[1], out=tmp_path / "e.vmb", inputs_from=[tampered])
    assert not (tmp_path / "e.vmb").exists()


def test_split_refuses_what_cannot_be_split(chain: Chain) -> None:
    with pytest.raises(InvalidInputError, match="zk jobs cannot be split"):
        plan_segments(dataclasses.replace(chain.job, mode="zk"), 2)
    with pytest.raises(InvalidInputError, match="--segments must be"):
        plan_segments(chain.job, len(chain.job.steps) + 1)
    with pytest.raises(InvalidInputError, match="already a sub-job"):
        plan_segments(chain.views[0], 2)
    with pytest.raises(InvalidInputError, match="contiguous"):
        segment_view(chain.job, ((0, 3), (2, 8)), 0)
    with pytest.raises(InvalidInputError, match="missing"):
        segment_view(chain.job, ((0, 3), (3, 7)), 0)


def test_segment_file_must_match_its_job(tmp_path: Path, chain: Chain) -> None:
    doc = json.loads(chain.parts[1].read_text())
    for edit in ({"index": 2}, {"segments": [[0, 4], [4, 5], [5, 8]]}, {"job_id": "sha256:" + "0" * 64}):
        bad = chain.parts[1].with_name("edited.json")
        bad.write_text(json.dumps({**doc, **edit}))
        with pytest.raises(InvalidInputError):
            load_job(bad)
    assert load_job(chain.parts[1]).job_id == doc["segment_id"]


# -- receipts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verifiers() -> list[SecretKey]:
    return [generate_key(), generate_key()]


def test_receipt_signed_cosigned_and_checked(chain: Chain, nodes: list[SecretKey], verifiers: list[SecretKey]) -> None:
    verdict, _ = verify_chain(chain.bundles, job=chain.job, node_keys=publics(nodes))
    doc = sign_receipt(receipt_body(verdict), verifiers[0])
    assert check_receipt(doc, [verifiers[0].public]).ok
    both = cosign_receipt(doc, verifiers[1])
    assert check_receipt(both, [v.public for v in verifiers]).ok
    assert not check_receipt(both, [verifiers[0].public]).ok  # a signer the checker does not pin
    assert not check_receipt(doc, [v.public for v in verifiers]).ok  # a pinned verifier that did not sign
    assert recheck_receipt(both, job=chain.job_path, bundles=chain.bundles).ok
    assert not recheck_receipt(both, job=chain.job_path, bundles=chain.bundles[:2]).ok
    with pytest.raises(InvalidInputError, match="already signed"):
        cosign_receipt(both, verifiers[1])


def test_tampered_receipts_fail(chain: Chain, nodes: list[SecretKey], verifiers: list[SecretKey]) -> None:
    verdict, _ = verify_chain(chain.bundles, job=chain.job, node_keys=publics(nodes))
    doc = sign_receipt(receipt_body(verdict), verifiers[0])
    pinned = [verifiers[0].public]
    dropped = json.loads(json.dumps(doc))
    dropped["receipt"]["subtasks"].pop(1)
    assert not check_receipt(dropped, pinned).ok
    foreign = {**doc, "signature": sign_receipt(receipt_body(verdict), verifiers[1])["signature"]}
    assert not check_receipt(foreign, pinned).ok
    edited = json.loads(json.dumps(doc))
    name = next(iter(edited["receipt"]["outputs"]))
    edited["receipt"]["outputs"][name] = "sha256:" + "1" * 64
    assert not check_receipt(edited, pinned).ok
    with pytest.raises(InvalidInputError):
        receipt_body(dataclasses.replace(verdict, status="reject", segments=()))


def test_receipt_byte_flip_from_the_cli(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    runner = CliRunner()
    for i, key in enumerate([*nodes, generate_key()]):
        write_key_pair(tmp_path / f"k{i}.key", key)
    keys = ",".join(str(tmp_path / f"k{i}.key.pub") for i in range(3))
    receipt = tmp_path / "receipt.json"
    args = [
        "verify",
        *map(str, chain.bundles),
        "--job",
        str(chain.job_path),
        "--node-keys",
        keys,
        "--receipt-out",
        str(receipt),
        "--key",
        str(tmp_path / "k3.key"),
        "--outputs-out",
        str(tmp_path / "o.npz"),
    ]
    result = runner.invoke(cli, args)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o.npz").exists()
    check = ["receipt", "check", str(receipt), "--verifier-key", str(tmp_path / "k3.key.pub")]
    assert runner.invoke(cli, check).exit_code == 0
    full = [*check, "--full", "--job", str(chain.job_path), *map(str, chain.bundles)]
    assert runner.invoke(cli, full).exit_code == 0, runner.invoke(cli, full).output
    data = bytearray(receipt.read_bytes())
    flips = [data.find(b'"seed":') + 8, data.find(b'"statement":"sha256:') + 25, data.find(b'"signature":"') + 20]
    for at in flips:
        flipped = bytearray(data)
        flipped[at] = ord("2") if flipped[at] != ord("2") else ord("3")
        receipt.write_bytes(bytes(flipped))
        assert runner.invoke(cli, check).exit_code in (1, 3)
    # A reject writes no receipt.
    receipt.unlink()
    args_bad = [*args]
    args_bad[1:4] = [str(chain.bundles[0]), str(chain.bundles[2]), str(chain.bundles[1])]
    args_bad[args.index("--node-keys") + 1] = ",".join(str(tmp_path / f"k{i}.key.pub") for i in (0, 1, 2))
    result = runner.invoke(cli, args_bad)
    assert result.exit_code == 1 and not receipt.exists()


def test_split_and_chain_from_the_cli(tmp_path: Path, chain: Chain) -> None:
    runner = CliRunner()
    out = tmp_path / "parts"
    result = runner.invoke(cli, ["job", "split", str(chain.job_path), "--segments", "2", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["segments"]
    assert [r["step_range"] for r in rows] == [[0, rows[0]["step_range"][1]], [rows[0]["step_range"][1], 8]]
    assert rows[1]["inputs_from"] == [0]
    again = runner.invoke(cli, ["job", "split", str(chain.job_path), "--segments", "2", "-o", str(out)])
    assert again.exit_code == 3 and "already exists" in again.output
    usage = runner.invoke(cli, ["verify", *map(str, chain.bundles), "--job", str(chain.job_path)])
    assert usage.exit_code == 2 and "--node-keys" in usage.output


# -- shards: one sub-job per row of a batch --------------------------------------------------------

BATCH = Path(__file__).resolve().parents[2] / "fixtures" / "mlp_batch.rows.npz"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, nodes: list[SecretKey]) -> tuple[Chain, list[SecretKey]]:
    from verimesh.jobs.segments import write_shards

    folder = tmp_path_factory.mktemp("shards")
    job_path = folder / "bjob.json"
    job = new_job(model_path("mlp_batch"), input_path("mlp_batch"), job_path)
    written = write_shards(job_path, BATCH, folder / "parts")
    owners = [nodes[k % 3] for k in range(len(written))]
    bundles = []
    for k, ((part, _), key) in enumerate(zip(written, owners, strict=True)):
        prove(part, key=key, out=folder / f"sh{k}.vmb", device="cpu")
        bundles.append(folder / f"sh{k}.vmb")
    return Chain(job, job_path, [p for p, _ in written], [v for _, v in written], bundles, folder), owners


def test_shards_of_a_batch_reassemble_to_plain_onnxruntime_on_the_batch(sharded: tuple[Chain, list[SecretKey]]) -> None:
    import onnxruntime as ort

    from verimesh.subtasks.chain import verify_shards

    c, owners = sharded
    verdict, values = verify_shards(c.bundles, job=c.job, node_keys=[k.public for k in owners], batch=BATCH)
    assert verdict, verdict.reason
    assert len(verdict.segments) == 16 and verdict.kind == "shards"
    rows = dict(np.load(BATCH))["input"]
    session = ort.InferenceSession(str(model_path("mlp_batch")), providers=["CPUExecutionProvider"])
    (batched,) = session.run(None, {"input": rows})
    assert values["logits"].shape == batched.shape == (16, 10)
    np.testing.assert_allclose(values["logits"], batched, rtol=1e-5, atol=1e-6)
    one_by_one = np.concatenate([session.run(None, {"input": rows[k : k + 1]})[0] for k in range(16)])
    np.testing.assert_allclose(values["logits"], one_by_one, rtol=1e-6, atol=1e-7)
    assert verdict.outputs["logits"] == tensor_digest("logits", values["logits"])
    doc = sign_receipt(receipt_body(verdict), owners[0])
    assert check_receipt(doc, [owners[0].public]).ok and doc["receipt"]["kind"] == "shards"
    assert recheck_receipt(doc, job=c.job_path, bundles=c.bundles, batch=BATCH).ok
    with pytest.raises(InvalidInputError, match="batch that was split"):
        recheck_receipt(doc, job=c.job_path, bundles=c.bundles)


def test_missing_duplicated_or_misplaced_shards_are_rejected(
    tmp_path: Path, sharded: tuple[Chain, list[SecretKey]]
) -> None:
    from verimesh.subtasks.chain import verify_shards

    c, owners = sharded
    keys = [k.public for k in owners]
    verdict, _ = verify_shards(c.bundles[:-1], job=c.job, node_keys=keys[:-1], batch=BATCH)
    assert verdict.status == "reject" and "missing shards: [15]" in verdict.reason
    dup = [*c.bundles[:-1], c.bundles[0]]
    verdict, _ = verify_shards(dup, job=c.job, node_keys=[*keys[:-1], keys[0]], batch=BATCH)
    assert verdict.status == "reject" and "given twice" in verdict.reason
    # Another batch: every row's shard id differs, so the first bundle already names another job.
    other = dict(np.load(BATCH))
    other["input"] = other["input"][::-1].copy()
    verdict, _ = verify_shards(c.bundles, job=c.job, node_keys=keys, batch=other)
    assert verdict.status == "reject" and verdict.segments[-1].verdict.checks[-1].name == "job-binding"
    # A bundle made for row 3 proven over row 5's input does not pass as shard 3.
    forged = tmp_path / "sh3-row5.vmb"
    view = dataclasses.replace(c.views[3], input_tensors=c.views[5].input_tensors, input_path=c.views[5].input_path)
    runner = StepRunner(device="cpu", precision=view.policy.precision, optimization=view.policy.optimization)
    trace = run_steps(view, None, view.read_input(), runner)
    seal_trace(view, trace, key=owners[3], runner=runner, out=forged)
    bundles = [*c.bundles[:3], forged, *c.bundles[4:]]
    verdict, _ = verify_shards(bundles, job=c.job, node_keys=keys, batch=BATCH)
    assert verdict.status == "reject" and verdict.segments[-1].index == 3


def test_wrong_row_output_is_that_nodes_fault(tmp_path: Path, sharded: tuple[Chain, list[SecretKey]]) -> None:
    from verimesh.subtasks.chain import verify_shards

    c, owners = sharded
    view = c.views[7]
    runner = StepRunner(device="cpu", precision=view.policy.precision, optimization=view.policy.optimization)
    trace = run_steps(view, None, view.read_input(), runner)
    trace["logits"] = perturbed(trace["logits"], delta=3.0)
    bad = tmp_path / "sh7-bad.vmb"
    seal_trace(view, trace, key=owners[7], runner=runner, out=bad)
    bundles = [*c.bundles[:7], bad, *c.bundles[8:]]
    verdict, values = verify_shards(bundles, job=c.job, node_keys=[k.public for k in owners], batch=BATCH,
                                    evidence_out=tmp_path / "shard.vme")  # fmt: skip
    assert verdict.status == "reject" and not values
    result = check_evidence(tmp_path / "shard.vme")
    assert result.proves_fraud and result.node_id == owners[7].node_id and result.job_id == view.job_id
    from tests.conftest import step_evidence

    made_up = step_evidence(c.views[6], c.bundles[6], owners[6].public, tmp_path / "made-up.vme")
    assert not check_evidence(made_up).proves_fraud


def test_shards_need_a_dynamic_batch_axis(tmp_path: Path, chain: Chain) -> None:
    from verimesh.jobs.segments import write_shards

    batch = tmp_path / "rows.npz"
    np.savez(batch, input=np.zeros((4, 8, 32), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="no dynamic leading batch axis"):
        write_shards(chain.job_path, batch, tmp_path / "parts")


def test_shards_from_the_cli(tmp_path: Path, sharded: tuple[Chain, list[SecretKey]]) -> None:
    c, owners = sharded
    runner = CliRunner()
    out = tmp_path / "parts"
    result = runner.invoke(cli, ["job", "split", str(c.job_path), "--shards", str(BATCH), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["shards"]) == 16
    both = runner.invoke(cli, ["job", "split", str(c.job_path), "--shards", str(BATCH), "--segments", "2", "-o", "x"])
    assert both.exit_code == 2
    for i, key in enumerate(owners[:3]):
        write_key_pair(tmp_path / f"n{i}.key", key)
    keys = ",".join(str(tmp_path / f"n{k % 3}.key.pub") for k in range(16))
    outputs = tmp_path / "batch.npz"
    args = ["verify", *map(str, c.bundles), "--job", str(c.job_path), "--shards", str(BATCH), "--node-keys", keys,
            "--outputs-out", str(outputs)]  # fmt: skip
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert np.load(outputs)["logits"].shape == (16, 10)


def test_full_recheck_pairs_bundles_by_statement_and_checks_the_samples_and_a_fresh_seed(
    chain: Chain, nodes: list[SecretKey], verifiers: list[SecretKey]
) -> None:
    verdict, _ = verify_chain(chain.bundles, job=chain.job, node_keys=publics(nodes))
    body = receipt_body(verdict)
    doc = sign_receipt(body, verifiers[0])
    assert recheck_receipt(doc, job=chain.job_path, bundles=chain.bundles[::-1]).ok  # any order
    # A receipt the verifier signed over sampled steps it did not re-run holds offline (the
    # signature is the verifier's word) but not under --full, which replays the verification.
    inflated = json.loads(json.dumps(body))
    for sub in inflated["subtasks"]:
        sub["sampled_steps"] = list(range(*sub["step_range"]))
    claimed = sign_receipt(inflated, verifiers[0])
    assert check_receipt(claimed, [verifiers[0].public]).ok
    assert not recheck_receipt(claimed, job=chain.job_path, bundles=chain.bundles).ok
    assert not recheck_receipt(
        doc, job=chain.job_path, bundles=[chain.bundles[0], chain.bundles[0], chain.bundles[1]]
    ).ok


def test_link_evidence_has_one_spelling(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    from verimesh.core.canonical import canonical_json
    from verimesh.core.container import read_container_file, write_container

    view, name = chain.views[1], chain.views[1].linked_names[0]
    path = tmp_path / "link.vme"
    write_link_evidence(path, job=view, envelope=read_bundle(chain.bundles[1], version=2).envelope,
                        public=nodes[1].public, linked=read_bundle(chain.bundles[0], version=2).envelope,
                        reason="made up", tensor=name)  # fmt: skip
    members = {k: bytes(v) for k, v in read_container_file(path, what="evidence").items()}
    doc = json.loads(members["evidence.json"])
    doc["members"] = [{"name": "trace.json", "index": 0, "inclusion_proof": []}]
    members["evidence.json"] = canonical_json(doc)
    write_container(path, list(members.items()))
    with pytest.raises(InvalidInputError, match="no sealed members"):
        check_evidence(path)


def test_pointer_files_do_not_chain(tmp_path: Path, chain: Chain) -> None:
    doc = json.loads(chain.parts[1].read_text())
    looped = tmp_path / "loop.json"
    looped.write_text(json.dumps({**doc, "job": "loop.json"}))
    with pytest.raises(InvalidInputError, match="sub-job itself"):
        load_job(looped)


# -- second review: the ledger, per-shard draws, receipts' inputs, pipes ---------------------------


def test_the_ledger_settles_no_segment_alone(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    from tests.integration.test_ledger import join, new_ledger, post, settle

    led = new_ledger(tmp_path / "mesh.db")
    join(led, nodes[2], 100)
    post(led, chain.views[2].job_id)  # posting a segment is how its node gets paid
    with pytest.raises(InvalidInputError, match="settled only with its chain"):
        settle(chain.bundles[2], chain.views[2], led)


def _chain_ledger(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> Any:
    from tests.integration.test_ledger import join, new_ledger, post

    led = new_ledger(tmp_path / "mesh.db", reward=3, fraud_fraction="0.5")
    for node in nodes:
        join(led, node, 100)
    for view in chain.views:
        post(led, view.job_id, deposit=10)
    return led


def _standings(led: Any, nodes: list[SecretKey]) -> list[tuple[int, int, int]]:
    from verimesh.settlement import node_standing

    out = []
    for node in nodes:
        st = node_standing(led, node.node_id)
        out.append((st.accepted, st.rewards, st.stake))
    return out


def test_a_chain_is_settled_segment_by_segment_with_each_node(
    tmp_path: Path, chain: Chain, nodes: list[SecretKey]
) -> None:
    from tests.integration.test_ledger import operator
    from verimesh.settlement import audit_ledger, settle_chain

    led = _chain_ledger(tmp_path, chain, nodes)
    settled = settle_chain(chain.bundles, job=chain.job, ledger=led, writer=operator(led))
    assert settled.verdict, settled.verdict.reason
    kinds = [k for _, k in settled.appended]
    assert kinds.count("receipt") == kinds.count("verdict") == kinds.count("reward") == 3
    assert _standings(led, nodes) == [(1, 3, 100)] * 3
    report = audit_ledger(led)
    assert report.ok, report
    # Settling the same chain again pays nobody twice.
    again = settle_chain(chain.bundles, job=chain.job, ledger=led, writer=operator(led))
    assert again.verdict and not [k for _, k in again.appended if k != "commit"]
    assert _standings(led, nodes) == [(1, 3, 100)] * 3


def test_a_chain_with_a_cheat_slashes_only_the_cheat(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    from tests.integration.test_ledger import operator
    from verimesh.settlement import audit_ledger, settle_chain

    view = chain.views[2]
    runner = StepRunner(device="cpu", precision=view.policy.precision, optimization=view.policy.optimization)
    inputs = view.read_input()
    linked, links = linked_inputs(view, [chain.bundles[1]])
    inputs.update(linked)
    trace = run_steps(view, None, inputs, runner)
    last = view.steps[-1].outputs[0]
    trace[last] = perturbed(trace[last], delta=5.0)
    bad = tmp_path / "s2-bad.vmb"
    seal_trace(view, trace, key=nodes[2], runner=runner, out=bad, links=links)
    led = _chain_ledger(tmp_path, chain, nodes)
    settled = settle_chain([*chain.bundles[:2], bad], job=chain.job, ledger=led, writer=operator(led))  # fmt: skip
    assert settled.verdict.status == "reject"
    assert [k for _, k in settled.appended if k != "commit"].count("slash") == 1
    (s0, s1, s2) = _standings(led, nodes)
    assert s0 == s1 == (0, 0, 100)  # the honest segments: neither paid (no result) nor slashed
    assert s2[2] == 50
    assert audit_ledger(led).ok


def test_a_broken_link_slashes_the_later_node_only(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    from tests.integration.test_ledger import operator
    from verimesh.settlement import audit_ledger, settle_chain

    view = chain.views[1]
    name = view.linked_names[0]

    def own_links(trace: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        statement = read_bundle(chain.bundles[0], version=2).envelope.statement_digest()
        return [{"segment": 0, "statement": statement,
                 "tensors": {n: tensor_digest(n, trace[n]) for n in view.linked_names}}]  # fmt: skip

    bad = _forged(chain, view, nodes[1], tmp_path / "s1-bad-link.vmb",
                  trace_edit=lambda t: {**t, name: perturbed(t[name], delta=0.25)}, links=own_links)  # fmt: skip
    led = _chain_ledger(tmp_path, chain, nodes)
    settled = settle_chain([chain.bundles[0], bad, chain.bundles[2]], job=chain.job, ledger=led,
                           writer=operator(led))  # fmt: skip
    assert settled.verdict.status == "reject" and settled.verdict.checks[-1].name == "link-0-1"
    (s0, s1, s2) = _standings(led, nodes)
    assert s0[2] == s2[2] == 100 and s1[2] == 50
    assert audit_ledger(led).ok


def test_a_chain_verified_through_the_ledger_from_the_cli(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    from tests.integration.test_ledger import operator

    led = _chain_ledger(tmp_path, chain, nodes)
    op = tmp_path / "op.key"
    write_key_pair(op, operator(led))
    url = f"sqlite:///{tmp_path / 'mesh.db'}"
    args = ["verify", *map(str, chain.bundles), "--job", str(chain.job_path), "--ledger", url,
            "--verifier-key", str(op), "--outputs-out", str(tmp_path / "o.npz"), "--json"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert [e["kind"] for e in payload["ledger_entries"]].count("reward") == 3
    assert set(np.load(tmp_path / "o.npz")) == set(chain.job.output_names)


def test_every_shard_draws_its_own_steps(sharded: tuple[Chain, list[SecretKey]]) -> None:
    from verimesh.subtasks.chain import verify_shards

    c, owners = sharded
    verdict, _ = verify_shards(c.bundles, job=c.job, node_keys=[k.public for k in owners], batch=BATCH, seed=3)
    assert verdict
    draws = {seg.sampled_steps for seg in verdict.segments}
    assert len(draws) > 1  # 16 shards of one job would otherwise all re-check the same steps
    again, _ = verify_shards(c.bundles, job=c.job, node_keys=[k.public for k in owners], batch=BATCH, seed=3)
    assert [s.sampled_steps for s in again.segments] == [s.sampled_steps for s in verdict.segments]


def test_full_recheck_compares_the_recorded_inputs(sharded: tuple[Chain, list[SecretKey]]) -> None:
    from verimesh.subtasks.chain import verify_shards

    c, owners = sharded
    verdict, _ = verify_shards(c.bundles, job=c.job, node_keys=[k.public for k in owners], batch=BATCH)
    body = receipt_body(verdict)
    body["subtasks"][0]["input_digest"], body["subtasks"][1]["input_digest"] = (
        body["subtasks"][1]["input_digest"],
        body["subtasks"][0]["input_digest"],
    )
    doc = sign_receipt(body, owners[0])
    assert check_receipt(doc, [owners[0].public]).ok  # offline: the signer's word
    assert not recheck_receipt(doc, job=c.job_path, bundles=c.bundles, batch=BATCH).ok


def test_a_pipe_is_refused_not_waited_on(tmp_path: Path, chain: Chain, nodes: list[SecretKey]) -> None:
    import os

    fifo = tmp_path / "pipe.vmb"
    os.mkfifo(fifo)
    verdict = verify(fifo, job=chain.parts[0], node_key=nodes[0].public)
    assert verdict.status == "error" and "pipe" in verdict.reason
    with pytest.raises(InvalidInputError, match="pipe"):
        load_job(fifo)
