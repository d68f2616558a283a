"""A job is hostile input to the worker: the job owner writes it (by hand, if it likes). A step model
that reads the worker's files through ONNX external data, or one built on a random operator, is
refused by every command that would run it (job new, prove, verify, evidence check): exit 3 with
one line naming the tensor or node, never a bundle, never a reject, never evidence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import Keys, input_path, model_path, step_evidence
from verimesh.cli.app import cli
from verimesh.core.digest import sha256_bytes
from verimesh.jobs.job import compute_job_id, load_job, new_job
from verimesh.jobs.runtime import StepRunner
from verimesh.spot.spotcheck import run_steps
from verimesh.workflows import seal_trace


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_exit_3(result: Result, *fragments: str) -> None:
    assert result.exit_code == 3, (result.exit_code, result.output, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("verimesh: error[unsafe-model]"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def stealing_model(shape: list[int], location: str = "node.key") -> onnx.ModelProto:
    """y = x + W, where W's bytes are 'stored' in the worker's key file."""
    w = numpy_helper.from_array(np.zeros(shape, np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(shape))))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])], "steal",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializer=[w],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def hand_write_step(job_file: Path, index: int, blob: bytes) -> None:
    """What a hostile owner can do: put any step file in a job and give it a consistent job id."""
    doc = json.loads(job_file.read_text())
    step = doc["steps"][index]
    (job_file.parent / step["path"]).write_bytes(blob)
    step["digest"] = sha256_bytes(blob)
    doc.pop("job_id")
    doc["job_id"] = compute_job_id(doc)
    job_file.write_text(json.dumps(doc))


def test_job_new_refuses_a_model_that_reads_files(workdir: Path, keys: Keys) -> None:
    (workdir / "node.key").write_bytes(keys.node_file.read_bytes())
    onnx.save(stealing_model([1, 8]), str(workdir / "evil.onnx"))
    np.save(workdir / "x.npy", np.zeros((1, 8), np.float32))
    one_line_exit_3(run("job", "new", "evil.onnx", "--input", "x.npy", "-o", "job.json"), "'W'", "external data")
    assert not (workdir / "job.json").exists()


def test_prove_refuses_a_hand_written_job_whose_step_reads_the_key(workdir: Path, keys: Keys) -> None:
    (workdir / "node.key").write_bytes(keys.node_file.read_bytes())
    job = new_job(model_path("mlp"), input_path("mlp"), workdir / "job.json", steps=2)
    first = job.steps[0]
    shape = [1, 16]  # the shape does not matter: the file is refused before onnxruntime sees it
    assert first.inputs
    hand_write_step(workdir / "job.json", 0, stealing_model(shape).SerializeToString())
    result = run("prove", "job.json", "--key", "node.key", "-o", "stolen.vmb")
    one_line_exit_3(result, "'W'", "external data", "node.key")
    assert not (workdir / "stolen.vmb").exists() and not list(workdir.glob("*.partial"))


def test_verify_and_evidence_check_refuse_a_random_step(workdir: Path, keys: Keys) -> None:
    """A hostile owner wants an honest node's re-run 'disproved': a step built on RandomNormalLike.
    Whatever bundle it verifies, verify refuses the job (exit 3, no evidence) instead of rejecting."""
    job = new_job(model_path("mlp"), input_path("mlp"), workdir / "job.json", steps=2)
    runner = StepRunner(device="cpu")
    trace = run_steps(job, None, job.read_input(), runner)
    last = job.steps[-1]
    shapes = {n: list(trace[n].shape) for n in (*last.inputs, *last.outputs)}
    (src,), (dst,) = last.inputs, last.outputs
    noisy = helper.make_graph(
        [helper.make_node("Gemm", [src, "w"], ["h"], transB=1), helper.make_node("RandomNormalLike", ["h"], ["r"]),
         helper.make_node("Add", ["h", "r"], [dst])], "noisy",
        [helper.make_tensor_value_info(src, TensorProto.FLOAT, shapes[src])],
        [helper.make_tensor_value_info(dst, TensorProto.FLOAT, shapes[dst])],
        initializer=[numpy_helper.from_array(np.ones((shapes[dst][1], shapes[src][1]), np.float32), "w")],
    )  # fmt: skip
    blob = helper.make_model(noisy, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    hand_write_step(workdir / "job.json", last.index, blob)
    hostile = load_job(workdir / "job.json")
    seal_trace(hostile, trace, key=keys.node, runner=runner, out=workdir / "r.vmb")
    result = run("verify", "r.vmb", "--job", "job.json", "--node-key", keys.node_pub, "--samples", "all")
    one_line_exit_3(result, "RandomNormalLike", "non-deterministic")
    assert not list(workdir.glob("*.vme"))
    # Evidence built by hand around the same step is refused too: it cannot prove fraud.
    step_evidence(
        hostile, workdir / "r.vmb", keys.node.public, workdir / "forged.vme", step=last.index, step_model=blob
    )
    one_line_exit_3(run("evidence", "check", "forged.vme"), "RandomNormalLike")
