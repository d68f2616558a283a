"""Every caught cheat is attributable (format 2, sealed bundles).

The node's signature covers a root over every member's BLAKE3 leaf, so a bundle whose bytes are
not the sealed ones is nobody's fault (anyone can change a byte) and is rejected without
evidence, while anything wrong inside sealed bytes is the node's and yields evidence that
`evidence check` proves. Evidence is always written, whatever the bundle is called or where it
lies, and the verifier reads only a private copy of the bundle."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import Keys, input_path, model_path
from verimesh.cli.app import cli
from verimesh.core.canonical import canonical_json
from verimesh.core.container import write_container
from verimesh.core.digest import member_leaf, tensor_digest
from verimesh.errors import InvalidInputError
from verimesh.jobs.bundle import bundle_members, read_bundle, sealed_root
from verimesh.jobs.job import Job, compute_job_id, load_job, new_job
from verimesh.jobs.runtime import StepRunner
from verimesh.signing.envelope import make_statement, sign_statement
from verimesh.signing.keys import SecretKey
from verimesh.spot import spotcheck
from verimesh.spot.evidence import check_evidence, evidence_dir
from verimesh.spot.spotcheck import PREDICATE_TYPES, run_steps, spot_predicate
from verimesh.workflows import prove, seal_trace, verify


@pytest.fixture()
def job(workdir: Path) -> Job:
    return new_job(model_path("mlp"), input_path("mlp"), workdir / "job.json")


def honest_trace(job: Job) -> dict[str, np.ndarray]:
    return run_steps(job, None, job.read_input(), StepRunner(device="cpu"))


def seal_members(
    job: Job, members: list[tuple[str, bytes | memoryview]], key: SecretKey, out: Path, subjects: dict[str, str]
) -> Path:
    """What a node can do: seal and sign any members it likes (they are its own bytes)."""
    leaves = [member_leaf(name, data) for name, data in members]
    predicate = spot_predicate(job, node_id=key.node_id, runner=StepRunner(device="cpu"),
                               root=sealed_root(leaves), leaves=len(leaves))  # fmt: skip
    envelope = sign_statement(make_statement(subjects, PREDICATE_TYPES[2], predicate), key)
    write_container(out, [*members, ("envelope.json", envelope.to_bytes())])
    return out


def trace_members(job: Job, trace: dict[str, np.ndarray]) -> list[tuple[str, bytes | memoryview]]:
    from verimesh.core.tensors import TensorRef

    entries = tuple(TensorRef.of(n, trace[n]) for n in job.trace_names)
    return bundle_members(entries, trace, version=2)


def subjects_of(job: Job, trace: dict[str, np.ndarray]) -> dict[str, str]:
    return {n: tensor_digest(n, trace[n]) for n in job.output_names}


def rejected_with_proven_evidence(verdict: object, kind: str) -> None:
    assert verdict.status == "reject", verdict.reason  # type: ignore[attr-defined]
    assert verdict.evidence, verdict.reason  # type: ignore[attr-defined]
    result = check_evidence(Path(verdict.evidence))  # type: ignore[attr-defined]
    assert result.proves_fraud and result.kind == kind, result.reason


def test_bytes_changed_after_sealing_are_nobodys_fault(job: Job, keys: Keys, workdir: Path) -> None:
    honest = prove(job, key=keys.node, out=workdir / "r.vmb", device="cpu").bundle
    data = bytearray(honest.read_bytes())
    parsed = read_bundle(honest)
    # Change one tensor byte and fix the container's CRC so that only the seal can tell.
    from verimesh.jobs.bundle import write_bundle

    tensors = {k: np.array(v) for k, v in parsed.tensors.items()}
    name = job.steps[0].outputs[0]
    tensors[name].reshape(-1)[0] += 1.0
    write_bundle(workdir / "changed.vmb", parsed.envelope, parsed.trace, tensors, version=2)
    assert bytes(data) != (workdir / "changed.vmb").read_bytes()
    verdict = verify(workdir / "changed.vmb", job=job, node_key=keys.node.public, samples=0)
    assert verdict.status == "reject" and verdict.reason.startswith("seal:") and verdict.evidence is None


def test_a_tensor_that_does_not_fit_its_shape_under_a_valid_seal_is_the_nodes(
    job: Job, keys: Keys, workdir: Path
) -> None:
    trace = honest_trace(job)
    members = trace_members(job, trace)
    index = job.trace_names.index(job.steps[1].outputs[0])
    members[index] = (members[index][0], bytes(members[index][1])[:-4])  # one element short
    bundle = seal_members(job, members, keys.node, workdir / "short.vmb", subjects_of(job, trace))
    verdict = verify(bundle, job=job, node_key=keys.node.public, samples=0)
    assert verdict.reason.startswith("trace: sealed tensors/"), verdict.reason
    rejected_with_proven_evidence(verdict, "malformed")


def test_a_sealed_trace_of_other_tensors_is_the_nodes(job: Job, keys: Keys, workdir: Path) -> None:
    trace = honest_trace(job)
    members = trace_members(job, trace)
    doc = json.loads(bytes(members[-1][1]))
    doc["tensors"][1]["name"] = "renamed"
    members[-1] = ("trace.json", canonical_json(doc))
    bundle = seal_members(job, members, keys.node, workdir / "renamed.vmb", subjects_of(job, trace))
    rejected_with_proven_evidence(verify(bundle, job=job, node_key=keys.node.public, samples=0), "malformed")


def test_a_signed_subject_that_is_not_the_committed_output_is_the_nodes(job: Job, keys: Keys, workdir: Path) -> None:
    trace = honest_trace(job)
    fake = {n: tensor_digest(n, trace[n] + 1) for n in job.output_names}
    bundle = seal_members(job, trace_members(job, trace), keys.node, workdir / "subject.vmb", fake)
    verdict = verify(bundle, job=job, node_key=keys.node.public, samples=0)
    assert verdict.reason.startswith("output-binding"), verdict.reason
    rejected_with_proven_evidence(verdict, "binding")


def test_a_committed_input_other_than_the_jobs_is_the_nodes(job: Job, keys: Keys, workdir: Path) -> None:
    trace = honest_trace(job)
    trace["input"] = trace["input"] + 1
    bundle = seal_trace(job, trace, key=keys.node, runner=StepRunner(device="cpu"), out=workdir / "in.vmb")
    verdict = verify(workdir / "in.vmb", job=job, node_key=keys.node.public, samples=0)
    assert bundle.size and verdict.reason.startswith("input-binding"), verdict.reason
    rejected_with_proven_evidence(verdict, "binding")


def test_a_step_that_cannot_run_on_its_committed_inputs_is_the_nodes(workdir: Path, keys: Keys) -> None:
    """An index the node committed points outside the table: the step fails on the verifier, and
    since the job's own input ran when the job was made, only a wrong commitment gets there."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ArgMax", ["x"], ["i"], axis=1, keepdims=0),
        helper.make_node("Gather", ["table", "i"], ["y"], axis=0),
    ]
    table = numpy_helper.from_array(np.arange(32, dtype=np.float32).reshape(8, 4), "table")
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[table],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(workdir / "g.onnx"))
    np.save(workdir / "x.npy", np.arange(8, dtype=np.float32).reshape(1, 8))
    job = new_job(workdir / "g.onnx", workdir / "x.npy", workdir / "g.json", steps=2)
    gather = job.steps[-1]
    assert gather.inputs == ("i",)
    trace = honest_trace(job)
    trace["i"] = np.array([999], np.int64)
    bundle = seal_trace(job, trace, key=keys.node, runner=StepRunner(device="cpu"), out=workdir / "idx.vmb")
    assert bundle.size
    verdict = verify(workdir / "idx.vmb", job=job, node_key=keys.node.public, samples=0)  # the last step only
    assert verdict.reason.startswith(f"recheck-step-{gather.index}"), verdict.reason
    assert "does not run on its committed inputs" in verdict.reason
    rejected_with_proven_evidence(verdict, "step-mismatch")


def cheat(job: Job, keys: Keys, out: Path) -> Path:
    trace = honest_trace(job)
    name = job.output_names[0]
    trace[name] = trace[name] + 0.5
    seal_trace(job, trace, key=keys.node, runner=StepRunner(device="cpu"), out=out)
    return out


def test_evidence_is_written_whatever_the_bundle_is_called_or_where_it_lies(
    job: Job, keys: Keys, workdir: Path
) -> None:
    inbox = workdir / "inbox"
    inbox.mkdir()
    long_name = inbox / ("x" * 240 + ".vmb")  # stem + ".evidence.vme" would pass the 255-byte limit
    cheat(job, keys, long_name)
    inbox.chmod(stat.S_IRUSR | stat.S_IXUSR)  # a read-only inbox (for whoever is not root)
    try:
        verdict = verify(long_name, job=job, node_key=keys.node.public)
    finally:
        inbox.chmod(stat.S_IRWXU)
    assert verdict.status == "reject" and verdict.evidence is not None
    assert Path(verdict.evidence).parent == evidence_dir()
    assert check_evidence(Path(verdict.evidence)).proves_fraud
    # Asked to write it somewhere it cannot: it is still kept in the store, and the verdict says so.
    blocked = workdir / "no-such-folder" / "e.vme"
    verdict = verify(long_name, job=job, node_key=keys.node.public, evidence_out=blocked)
    assert verdict.evidence and Path(verdict.evidence).exists() and Path(verdict.evidence).parent == evidence_dir()
    assert any(c.name == "evidence" and "could not write" in c.detail for c in verdict.checks)
    verdict = verify(long_name, job=job, node_key=keys.node.public, evidence_out=workdir / "mine.vme")
    assert verdict.evidence == str(workdir / "mine.vme") and check_evidence(workdir / "mine.vme").proves_fraud


def test_the_verifier_reads_a_private_copy(
    job: Job, keys: Keys, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that can still write the file swaps honest bytes in after its cheat was hashed,
    hoping the comparison reads them: the verifier never reads the file twice."""
    bad = cheat(job, keys, workdir / "cheat.vmb")
    honest = prove(job, key=keys.node, out=workdir / "honest.vmb", device="cpu").bundle
    real = spotcheck.recheck_step

    def swap_then_recheck(*args: object, **kwargs: object) -> object:
        bad.write_bytes(honest.read_bytes())  # same size and layout: the honest bundle
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("verimesh.workflows.recheck_step", swap_then_recheck)
    verdict = verify(bad, job=job, node_key=keys.node.public)
    assert verdict.status == "reject", verdict.reason
    assert verdict.outputs != verify(honest, job=job, node_key=keys.node.public).outputs


def test_a_subject_listed_twice_is_refused(job: Job, keys: Keys, workdir: Path) -> None:
    """A fake digest first, the real one second: an in-toto consumer reading the first would take
    the fake as verified."""
    trace = honest_trace(job)
    members = trace_members(job, trace)
    leaves = [member_leaf(n, d) for n, d in members]
    predicate = spot_predicate(job, node_id=keys.node.node_id, runner=StepRunner(device="cpu"),
                               root=sealed_root(leaves), leaves=len(leaves))  # fmt: skip
    name = job.output_names[0]
    real = tensor_digest(name, trace[name]).removeprefix("sha256:")
    statement = json.loads(make_statement(subjects_of(job, trace), PREDICATE_TYPES[2], predicate))
    statement["subject"] = [{"name": name, "digest": {"sha256": "0" * 64}}, {"name": name, "digest": {"sha256": real}}]
    envelope = sign_statement(canonical_json(statement), keys.node)
    write_container(workdir / "twice.vmb", [*members, ("envelope.json", envelope.to_bytes())])
    verdict = verify(workdir / "twice.vmb", job=job, node_key=keys.node.public, samples="all")
    assert verdict.status == "reject" and "unique and sorted" in verdict.reason, verdict.reason


def test_a_job_whose_step_names_an_output_twice_is_refused(job: Job, workdir: Path) -> None:
    doc = json.loads((workdir / "job.json").read_text())
    doc["steps"][0]["outputs"] = doc["steps"][0]["outputs"] * 2
    doc.pop("job_id")
    doc["job_id"] = compute_job_id(doc)
    (workdir / "job.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidInputError, match="more than once"):
        load_job(workdir / "job.json")
    result = CliRunner().invoke(cli, ["job", "show", str(workdir / "job.json")])
    assert result.exit_code == 3 and "more than once" in result.stderr


def test_a_lazy_worker_gains_nothing_from_bytes_that_do_not_open(job: Job, keys: Keys, workdir: Path) -> None:
    """The old trick: commit honest digests, ship garbage for a skipped step, be rejected without
    evidence only when that step is sampled. Sealed, the garbage is either what the node signed
    (then it is caught like any lazy step, with evidence) or not (rejected every time)."""
    trace = honest_trace(job)
    skipped = job.steps[1].outputs[0]
    garbage = dict(trace)
    garbage[skipped] = np.zeros_like(trace[skipped])
    signed = seal_trace(job, garbage, key=keys.node, runner=StepRunner(device="cpu"), out=workdir / "lazy.vmb")
    assert signed.root.startswith("sha256:")
    verdict = verify(workdir / "lazy.vmb", job=job, node_key=keys.node.public, samples="all")
    rejected_with_proven_evidence(verdict, "step-mismatch")
    # Honest digests signed, garbage shipped: the seal fails on every verification, sampled or not.
    members = trace_members(job, trace)
    seal_members(job, members, keys.node, workdir / "h.vmb", subjects_of(job, trace))
    envelope = read_bundle(workdir / "h.vmb").envelope
    shipped = trace_members(job, garbage)
    write_container(workdir / "unopened.vmb", [*shipped, ("envelope.json", envelope.to_bytes())])
    for samples in (0, "all"):
        verdict = verify(workdir / "unopened.vmb", job=job, node_key=keys.node.public, samples=samples)  # type: ignore[arg-type]
        assert verdict.status == "reject" and verdict.reason.startswith("seal:") and verdict.evidence is None


GOLDEN_ZK = Path(__file__).resolve().parents[2] / "fixtures" / "golden" / "v0.2.0" / "mlp-zk"


@pytest.mark.parametrize("members", [["trace.json"], []])
def test_sealed_evidence_against_an_honest_zk_bundle_proves_nothing(workdir: Path, members: list[str]) -> None:
    """Anyone holding an honest zk bundle can wrap its genuinely sealed members as evidence: the
    zk statement seals outputs and proofs only, so no spot-check claim about a trace applies."""
    from verimesh.signing.keys import load_public_key
    from verimesh.spot.sealed_evidence import write_sealed_evidence

    job = load_job(GOLDEN_ZK / "job.json")
    assert job.mode == "zk" and job.version == 2
    bundle = read_bundle(GOLDEN_ZK / "honest.vmb", version=job.version)
    public = load_public_key(GOLDEN_ZK / "node.pub")
    for kind in ("malformed", "binding"):
        out = workdir / f"{kind}.vme"
        write_sealed_evidence(out, kind=kind, job=job, bundle=bundle, public=public, reason="forged",
                              members=members, field="trace")  # fmt: skip
        found = check_evidence(out)
        assert not found.proves_fraud, found.reason
        assert "spot-check jobs" in found.reason
        assert CliRunner().invoke(cli, ["evidence", "check", str(out)]).exit_code == 1


def test_evidence_reason_is_one_bounded_string(job: Job, keys: Keys, workdir: Path) -> None:
    from verimesh.core.container import read_container_file

    trace = run_steps(job, None, job.read_input(), StepRunner())
    last = job.steps[-1].outputs[0]
    trace[last] = trace[last] + 1.0
    seal_trace(job, trace, key=keys.node, runner=StepRunner(), out=workdir / "cheat.vmb")
    verdict = verify(workdir / "cheat.vmb", job=job, node_key=keys.node.public, samples="all",
                     evidence_out=workdir / "e.vme")  # fmt: skip
    assert verdict.status == "reject" and check_evidence(workdir / "e.vme").proves_fraud
    members = dict(read_container_file(workdir / "e.vme", what="evidence"))
    doc = json.loads(bytes(members["evidence.json"]))
    for reason in (7, None, "x" * 5000):
        members["evidence.json"] = memoryview(canonical_json({**doc, "reason": reason}))
        write_container(workdir / "r.vme", [(n, bytes(d)) for n, d in members.items()])
        with pytest.raises(InvalidInputError, match="reason"):
            check_evidence(workdir / "r.vme")


def _two_head_model(path: Path) -> None:
    """A side head ``aux`` computed early plus ``logits`` at the end (a multi-task net)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name: str, a: int, b: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), name)

    inits = [w("w1", 16, 64), w("wa", 64, 4), w("w2", 64, 64), w("w3", 64, 64), w("w4", 64, 10)]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "wa"], ["aux"]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["h3"]), helper.make_node("Relu", ["h3"], ["r3"]),
        helper.make_node("MatMul", ["r3", "w4"], ["logits"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "twohead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10]),
         helper.make_tensor_value_info("aux", TensorProto.FLOAT, [1, 4])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_a_model_output_made_by_an_early_step_is_checked_every_time(workdir: Path, keys: Keys) -> None:
    from verimesh.spot.spotcheck import mandatory_steps
    from verimesh.workflows import verified_outputs

    _two_head_model(workdir / "twohead.onnx")
    np.save(workdir / "x.npy", np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32))
    job = new_job(workdir / "twohead.onnx", workdir / "x.npy", workdir / "job.json", steps=6)
    producer = next(s.index for s in job.steps if "aux" in s.outputs)
    assert producer < len(job.steps) - 1  # the case that matters: the head is not in the last step
    assert set(mandatory_steps(job)) == {producer, len(job.steps) - 1}
    trace = honest_trace(job)
    trace["aux"] = np.full_like(trace["aux"], 1234.5)
    seal_trace(job, trace, key=keys.node, runner=StepRunner(), out=workdir / "cheat.vmb")
    for seed in range(30):
        verdict, values = verified_outputs(workdir / "cheat.vmb", job=job, node_key=keys.node.public, seed=seed,
                                           samples=0, evidence_out=workdir / "e.vme")  # fmt: skip
        assert verdict.status == "reject" and values == {}, (seed, verdict.sampled_steps)
        assert producer in verdict.sampled_steps
    assert check_evidence(workdir / "e.vme").proves_fraud
    honest = workdir / "honest.vmb"
    seal_trace(job, honest_trace(job), key=keys.node, runner=StepRunner(), out=honest)
    assert verify(honest, job=job, node_key=keys.node.public, samples=0).status == "accept"


@pytest.mark.parametrize("name", ["memory", "cuda_device_alloc", "x"])
def test_a_tensor_name_cannot_make_a_bad_shape_look_like_the_machines(name: str) -> None:
    """onnxruntime's message quotes the job's tensor and node names; a step failure on inputs
    that do not fit stays data-dependent (the node's fault, with evidence) whatever they are called."""
    from onnx import TensorProto, helper

    from verimesh.errors import StepExecutionError

    graph = helper.make_graph(
        [helper.make_node("Relu", [name], ["y"], name=f"{name}/Relu")], "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(StepExecutionError) as caught:
        StepRunner().run(f"sha256:{name}", model.SerializeToString(), {name: np.zeros((1, 5), np.float32)}, ["y"])
    assert caught.value.data_dependent is True
