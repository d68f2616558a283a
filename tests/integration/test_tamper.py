"""The tamper matrix of issue 2: every cheat is rejected (exit 1 in the CLI) with a reason naming
the failed check, and where the node's own signature proves it, the evidence file re-checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import MODELS, Keys, input_path, model_path, perturbed, step_evidence
from verimesh.jobs.job import Job, new_job
from verimesh.jobs.plan import build_step_models, plan_model
from verimesh.jobs.runtime import StepRunner
from verimesh.spot.evidence import check_evidence
from verimesh.spot.spotcheck import run_steps
from verimesh.workflows import prove, seal_trace, verify


def honest_trace(job: Job) -> dict[str, np.ndarray]:
    return run_steps(job, job.read_step_models(), job.read_input(), runner(job))


def runner(job: Job) -> StepRunner:
    return StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)


def recompute_from(job: Job, trace: dict[str, np.ndarray], first_step: int) -> dict[str, np.ndarray]:
    """Honestly recompute every step from ``first_step`` on, starting from ``trace``'s tensors."""
    out = dict(trace)
    models = job.read_step_models()
    r = runner(job)
    for step in job.steps[first_step:]:
        out.update(r.run(step.digest, models[step.index], {n: out[n] for n in step.inputs}, step.outputs))
    return out


def seal(job: Job, trace: dict[str, np.ndarray], key: object, path: Path) -> Path:
    seal_trace(job, trace, key=key, runner=runner(job), out=path)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("samples", [None, "all"])
def test_honest_bundle_is_accepted(
    model: str, samples: object, jobs: dict[str, Job], keys: Keys, tmp_path: Path
) -> None:
    job = jobs[model]
    result = prove(job, key=keys.node, out=tmp_path / "r.vmb", device="cpu")
    verdict = verify(result.bundle, job=job, node_key=keys.node_pub, samples=samples)  # type: ignore[arg-type]
    assert verdict.status == "accept", verdict.reason
    assert verdict.outputs == result.outputs
    assert len(job.steps) - 1 in verdict.sampled_steps
    if samples == "all":
        assert verdict.sampled_steps == tuple(range(len(job.steps)))


@pytest.mark.parametrize("model", MODELS)
def test_final_output_perturbed_is_rejected_with_evidence(
    model: str, jobs: dict[str, Job], keys: Keys, tmp_path: Path
) -> None:
    job = jobs[model]
    trace = honest_trace(job)
    out = job.output_names[0]
    trace[out] = perturbed(trace[out], delta=0.5)
    bundle = seal(job, trace, keys.node, tmp_path / "r.vmb")
    verdict = verify(bundle, job=job, node_key=keys.node_pub)  # default policy: the last step is always checked
    assert verdict.status == "reject"
    assert verdict.reason.startswith(f"recheck-step-{len(job.steps) - 1}")
    assert verdict.evidence is not None
    result = check_evidence(Path(verdict.evidence))
    assert result.proves_fraud and result.kind == "step-mismatch", result.reason
    assert result.node_id == keys.node.node_id


@pytest.mark.parametrize("model", MODELS)
def test_intermediate_step_perturbed_then_recomputed_honestly(
    model: str, jobs: dict[str, Job], keys: Keys, tmp_path: Path
) -> None:
    job = jobs[model]
    assert len(job.steps) >= 3
    k = len(job.steps) // 2
    trace = honest_trace(job)
    name = job.steps[k].outputs[0]
    trace[name] = perturbed(trace[name], delta=0.25)
    trace = recompute_from(job, trace, k + 1)
    bundle = seal(job, trace, keys.node, tmp_path / "r.vmb")
    verdict = verify(bundle, job=job, node_key=keys.node_pub, samples="all")
    assert verdict.status == "reject"
    assert verdict.reason.startswith(f"recheck-step-{k}:"), verdict.reason
    assert check_evidence(Path(verdict.evidence or "")).proves_fraud


def test_wrong_input_is_rejected(jobs: dict[str, Job], keys: Keys, tmp_path: Path) -> None:
    job = jobs["rescnn"]
    inputs = {n: perturbed(a, delta=1.0) for n, a in job.read_input().items()}
    trace = run_steps(job, job.read_step_models(), inputs, runner(job))
    bundle = seal(job, trace, keys.node, tmp_path / "r.vmb")
    verdict = verify(bundle, job=job, node_key=keys.node_pub, samples="all")
    assert verdict.status == "reject"
    assert verdict.reason.startswith("input-binding")
    result = check_evidence(Path(verdict.evidence or ""))
    assert result.proves_fraud and result.kind == "binding"


def _reweighted(name: str, tmp: Path) -> Path:
    model = onnx.load(model_path(name))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 8:
            init.CopyFrom(numpy_helper.from_array((arr * 1.01 + 0.01).astype(np.float32), init.name))
    path = tmp / f"{name}-reweighted.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("model", MODELS)
def test_same_architecture_different_weights_is_rejected(
    model: str, jobs: dict[str, Job], keys: Keys, tmp_path: Path
) -> None:
    job = jobs[model]
    other = onnx.load(_reweighted(model, tmp_path))
    plan = plan_model(other, steps=len(job.steps))
    cheat_models = build_step_models(other, other.SerializeToString(), plan).step_bytes
    assert [s.outputs for s in plan.steps] == [s.outputs for s in job.steps]
    cheat = StepRunner(device="cpu", optimization=job.policy.optimization)
    trace = job.read_input()
    for step, blob in zip(job.steps, cheat_models, strict=True):
        trace.update(cheat.run("cheat-" + str(step.index), blob, {n: trace[n] for n in step.inputs}, step.outputs))
    bundle = seal(job, trace, keys.node, tmp_path / "r.vmb")
    for samples in ("all", None):  # every step differs, so even the default policy catches it
        verdict = verify(bundle, job=job, node_key=keys.node_pub, samples=samples)  # type: ignore[arg-type]
        assert verdict.status == "reject"
        assert verdict.reason.startswith("recheck-step-"), verdict.reason


def test_bundle_from_another_job_is_rejected(jobs: dict[str, Job], keys: Keys, tmp_path: Path) -> None:
    job_a = jobs["mlp"]
    job_b = new_job(model_path("mlp"), input_path("mlp"), tmp_path / "b.json")  # same model and input, new nonce
    bundle = prove(job_a, key=keys.node, out=tmp_path / "a.vmb", device="cpu").bundle
    verdict = verify(bundle, job=job_b, node_key=keys.node_pub)
    assert verdict.status == "reject"
    assert verdict.reason.startswith("job-binding")
    assert verdict.evidence is None  # a replay proves nothing against the node that signed job A


def test_signature_by_another_key_is_rejected(jobs: dict[str, Job], keys: Keys, tmp_path: Path) -> None:
    job = jobs["mlp"]
    bundle = prove(job, key=keys.other, out=tmp_path / "r.vmb", device="cpu").bundle
    verdict = verify(bundle, job=job, node_key=keys.node_pub)
    assert verdict.status == "reject"
    assert verdict.reason.startswith("signature")


@pytest.mark.parametrize("model", MODELS)
def test_skipped_step_is_rejected(model: str, jobs: dict[str, Job], keys: Keys, tmp_path: Path) -> None:
    job = jobs[model]
    trace = honest_trace(job)
    skippable = [
        s
        for s in job.steps
        if any(
            trace[i].shape == trace[o].shape and trace[i].dtype == trace[o].dtype for i in s.inputs for o in s.outputs
        )
    ]
    assert skippable, "fixture has no step whose input could stand in for its output"
    step = skippable[0]
    src, dst = next((i, o) for i in step.inputs for o in step.outputs if trace[i].shape == trace[o].shape)
    trace[dst] = trace[src].copy()
    trace = recompute_from(job, trace, step.index + 1)
    bundle = seal(job, trace, keys.node, tmp_path / "r.vmb")
    verdict = verify(bundle, job=job, node_key=keys.node_pub, samples="all")
    assert verdict.status == "reject"
    assert verdict.reason.startswith(f"recheck-step-{step.index}:"), verdict.reason


def test_tensor_swapped_after_signing_is_rejected(jobs: dict[str, Job], keys: Keys, tmp_path: Path) -> None:
    """A trace changed after the bundle was sealed (the forged-commitment cheat): every byte is
    hashed first, so it is caught whatever is sampled, and it is blamed on no one (anyone holding
    the bundle can change a byte): no evidence."""
    from verimesh.jobs.bundle import read_bundle, write_bundle

    job = jobs["rescnn"]
    honest = prove(job, key=keys.node, out=tmp_path / "r.vmb", device="cpu").bundle
    parsed = read_bundle(honest)
    for name in (job.steps[1].outputs[0], "logits"):
        tensors = dict(parsed.tensors)
        tensors[name] = perturbed(tensors[name])
        write_bundle(tmp_path / "forged.vmb", parsed.envelope, parsed.trace, tensors, version=parsed.version)
        for kwargs in ({"samples": "all"}, {"samples": 0}):
            verdict = verify(tmp_path / "forged.vmb", job=job, node_key=keys.node_pub, **kwargs)  # type: ignore[arg-type]
            assert verdict.status == "reject" and verdict.reason.startswith("seal:"), verdict.reason
            assert verdict.evidence is None


def test_tampered_evidence_does_not_prove_fraud(jobs: dict[str, Job], keys: Keys, tmp_path: Path) -> None:
    """Evidence is recomputed, not believed: honest work dressed up as evidence proves nothing."""
    job = jobs["rescnn"]
    bundle = prove(job, key=keys.node, out=tmp_path / "r.vmb", device="cpu").bundle
    result = check_evidence(step_evidence(job, bundle, keys.node.public, tmp_path / "fake.vme"))
    assert not result.proves_fraud
