"""Laundering: a worker that keeps every boundary inside the tolerance, yet picks the result.

Three reproduced ways (each passed `verify --samples all` before these defences), and the
defence that stops each: special values compared exactly; the planner never cuts where a
boundary value sits near a later decision point; the window check runs the step after each
sampled one from the verifier's own outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import Keys
from verimesh.jobs.job import Job, new_job
from verimesh.jobs.plan import plan_model
from verimesh.jobs.runtime import StepRunner
from verimesh.jobs.tolerance import DEFAULT_TOLERANCES, compare_tensors
from verimesh.spot.evidence import check_evidence
from verimesh.spot.spotcheck import run_steps
from verimesh.workflows import seal_trace, verify

TOL = DEFAULT_TOLERANCES["fp32-strict"]


def save(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], out: str, path: Path, shape: list[int]) -> Path:
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)], initializer=inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def honest(job: Job) -> dict[str, np.ndarray]:
    return run_steps(job, None, job.read_input(), StepRunner(device="cpu", optimization=job.policy.optimization))


def seal(job: Job, trace: dict[str, np.ndarray], keys: Keys, path: Path) -> Path:
    seal_trace(job, trace, key=keys.node, runner=StepRunner(device="cpu"), out=path)
    return path


def rerun_from(job: Job, trace: dict[str, np.ndarray], first: int) -> dict[str, np.ndarray]:
    runner, out = StepRunner(device="cpu"), dict(trace)
    for step in job.steps[first:]:
        out.update(
            runner.run(step.digest, job.read_step_model(step.index), {n: out[n] for n in step.inputs}, step.outputs)
        )
    return out


# -- 1. special values ----------------------------------------------------------------------------


def test_special_values_are_compared_exactly() -> None:
    ref = np.array([1.0, -np.inf, np.nan, 0.0], np.float32)
    assert compare_tensors("t", ref.copy(), ref, TOL).ok
    for bad in ([1.0, np.inf, np.nan, 0.0], [1.0, -np.inf, 0.0, np.nan], [np.nan, -np.inf, np.nan, 0.0]):
        result = compare_tensors("t", np.array(bad, np.float32), ref, TOL)
        assert not result.ok and "special values" in result.reason, bad
    zero_flipped = np.array([1.0, -np.inf, np.nan, -0.0], np.float32)
    assert compare_tensors("t", zero_flipped, ref, TOL).ok  # no divisor reads it: the sign does not matter
    result = compare_tensors("t", zero_flipped, ref, TOL, zero_sign=True)
    assert not result.ok and "wrong sign" in result.reason


def test_a_flipped_infinity_is_caught_even_with_every_step_honest_from_it(workdir: Path, keys: Keys) -> None:
    """Log(0) = -inf at a boundary; the worker commits +inf and recomputes the rest honestly:
    Exp(+inf) = inf instead of 0. Each later step re-checks; the producing step does not."""
    nodes = [
        helper.make_node("Log", ["x"], ["z"]),
        helper.make_node("Exp", ["z"], ["e"]),
        helper.make_node("MatMul", ["e", "w"], ["y"]),
    ]
    model = save(nodes, [const("w", np.eye(4))], "y", workdir / "m.onnx", [1, 4])
    np.save(workdir / "x.npy", np.array([[0.0, 1.0, 2.0, 3.0]], np.float32))
    job = new_job(model, workdir / "x.npy", workdir / "job.json", steps=3)
    assert [s.outputs for s in job.steps] == [("z",), ("e",), ("y",)]
    trace = honest(job)
    assert trace["z"][0, 0] == -np.inf
    trace["z"] = trace["z"].copy()
    trace["z"][0, 0] = np.inf
    cheat = seal(job, rerun_from(job, trace, 1), keys, workdir / "cheat.vmb")
    assert rerun_from(job, trace, 1)["y"][0, 0] == np.inf  # the result it launders
    verdict = verify(cheat, job=job, node_key=keys.node.public, samples="all")
    assert verdict.status == "reject" and "special values" in verdict.reason, verdict.reason
    assert check_evidence(Path(verdict.evidence or "")).proves_fraud


# -- 2. near a later decision point: the planner keeps them in one step -----------------------------


def threshold_model(path: Path) -> Path:
    """z = x @ w - b sits within the tolerance of 0 in one element; Greater(z, 0) decides."""
    w = np.eye(4, dtype=np.float32)
    b = np.array([1.0, 2.0, 3.0, 4.0 + 1e-6], np.float32)  # x = [1, 2, 3, 4]: z[3] = -1e-6
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Sub", ["h", "b"], ["z"]),
        helper.make_node("Relu", ["z"], ["r"]),
        helper.make_node("Greater", ["z", "zero"], ["g"]),
        helper.make_node("Cast", ["g"], ["gf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["gf", "r"], ["y"]),
    ]
    return save(nodes, [const("w", w), const("b", b), const("zero", np.zeros(4))], "y", path, [1, 4])


def test_the_planner_never_cuts_before_a_decision_a_boundary_nudge_could_flip(workdir: Path, keys: Keys) -> None:
    """z[3] = -1e-6 and Greater(z, 0) decides: a worker nudging z, or h (z = h - b), inside the
    tolerance picks the decision. Planned blind, z and h cross step boundaries; planned on the
    job's input, neither does: the decision is re-checked together with what it is computed from."""
    model_path = threshold_model(workdir / "m.onnx")
    np.save(workdir / "x.npy", np.array([[1.0, 2.0, 3.0, 4.0]], np.float32))
    blind = plan_model(onnx.load(str(model_path)), steps=6)
    assert {"h", "z"} <= set(blind.trace_names)
    job = new_job(model_path, workdir / "x.npy", workdir / "job.json", steps=6)
    assert not {"h", "z"} & set(job.trace_names), [s.outputs for s in job.steps]
    # The laundering the blind plan allowed is not expressible: a nudge of what crosses a boundary
    # now changes a decision the verifier recomputes. Flip the decision by hand: caught.
    trace = honest(job)
    step = next(s for s in job.steps if "g" in s.outputs)
    trace["g"] = ~trace["g"]
    cheat = seal(job, rerun_from(job, trace, step.index + 1), keys, workdir / "c.vmb")
    verdict = verify(cheat, job=job, node_key=keys.node.public, samples="all")
    assert verdict.status == "reject" and verdict.reason.startswith(f"recheck-step-{step.index}"), verdict.reason


def test_a_decision_far_from_its_point_is_cut_as_usual(workdir: Path) -> None:
    model_path = threshold_model(workdir / "m.onnx")
    np.save(workdir / "far.npy", np.array([[5.0, 6.0, 7.0, 9.0]], np.float32))  # z = [4, 4, 4, 5]: far from 0
    job = new_job(model_path, workdir / "far.npy", workdir / "job.json", steps=6)
    assert {"h", "z"} <= set(job.trace_names)


# -- 3. a chain that amplifies: the window ---------------------------------------------------------


def cancelling_model(path: Path) -> Path:
    """z = x @ w is close to c, so y = (z - c) * 1000 turns a nudge of z inside the tolerance into
    a different answer (catastrophic cancellation); each step alone re-checks."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["z"]),
        helper.make_node("Sub", ["z", "c"], ["d"]),
        helper.make_node("Mul", ["d", "k"], ["y"]),
    ]
    inits = [const("w", np.eye(8)), const("c", np.full(8, 5.0)), const("k", np.full(8, 1000.0))]
    return save(nodes, inits, "y", path, [1, 8])


def chain_launder(job: Job, trace: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Move z by 0.9 of the Frobenius tolerance along the cancellation, then recompute honestly."""
    z = trace["z"].astype(np.float64)
    step = 0.9 * TOL.max_rel_frobenius * np.linalg.norm(z) / np.sqrt(z.size)
    cheated = dict(trace)
    cheated["z"] = (z + step).astype(np.float32)
    return rerun_from(job, cheated, 1)


@pytest.mark.parametrize("window", [1, 2])
def test_a_laundered_chain_passes_every_step_alone_and_fails_the_window(workdir: Path, keys: Keys, window: int) -> None:
    model = cancelling_model(workdir / "m.onnx")
    np.save(workdir / "x.npy", np.full((1, 8), 5.0 + 1e-3, np.float32))
    job = new_job(model, workdir / "x.npy", workdir / "job.json", steps=3, window=window)
    assert [s.outputs for s in job.steps] == [("z",), ("d",), ("y",)]
    trace = honest(job)
    laundered = chain_launder(job, trace)
    # The result it launders: the output is far from the honest one.
    assert not compare_tensors("y", laundered["y"], trace["y"], TOL).ok
    assert verify(seal(job, trace, keys, workdir / "h.vmb"), job=job, node_key=keys.node.public, samples="all")
    verdict = verify(seal(job, laundered, keys, workdir / "c.vmb"), job=job, node_key=keys.node.public, samples="all")
    if window == 1:  # each step alone: the reproduced hole, which is why jobs default to a window of 2
        assert verdict.status == "accept"
        return
    assert verdict.status == "reject" and verdict.reason.startswith("window-0-1"), verdict.reason
    result = check_evidence(Path(verdict.evidence or ""))
    assert result.proves_fraud and result.kind == "window-mismatch", result.reason


def test_honest_work_passes_the_window_at_every_level_and_thread_count(workdir: Path, keys: Keys) -> None:
    from tests.conftest import input_path, model_path

    for name in ("rescnn", "transformer"):
        job = new_job(model_path(name), input_path(name), workdir / f"{name}.json")
        for level in ("disable", "basic", "extended", "all"):
            for threads in (1, 2):
                runner = StepRunner(device="cpu", optimization=level, threads=threads)
                trace = run_steps(job, None, job.read_input(), runner)
                bundle = seal(job, trace, keys, workdir / f"{name}-{level}-{threads}.vmb")
                verdict = verify(bundle, job=job, node_key=keys.node.public, samples="all")
                assert verdict.status == "accept", (name, level, threads, verdict.reason)
