"""Zero-knowledge mode end to end (slow: one SRS, a few circuits, built once per session).

Every accept has its rejects beside it: instances edited, pretty fields edited (ignored, not
trusted), a proof of another model, altered settings or vk in the circuit, a truncated proof,
a claimed output that is not the proven one, a broken chain, an unsupported operator.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import Keys, input_path, model_path
from verimesh.cli.app import cli
from verimesh.errors import IntegrityError, InvalidInputError
from verimesh.jobs.bundle import read_bundle
from verimesh.jobs.circuit import Circuit, load_circuit
from verimesh.jobs.job import Job, new_job
from verimesh.signing.keys import SecretKey
from verimesh.workflows import prove, verify
from verimesh.zk.zkmode import write_zk_bundle

# Slow. `make test` distributes by file (--dist loadfile), so the session SRS and circuits are built once.
pytestmark = pytest.mark.slow
X = {"input": np.load(input_path("mlp"))}


@dataclass(frozen=True)
class ZkCase:
    circuit: Circuit
    job: Job
    bundle: Path
    srs: Path


@pytest.fixture(scope="session")
def zk_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One generated SRS (2^15 rows) and one cache for the whole session."""
    from verimesh.zk.ezkl_backend import new_srs

    home = tmp_path_factory.mktemp("zk")
    previous = os.environ.get("VERIMESH_CACHE")
    os.environ["VERIMESH_CACHE"] = str(home / "cache")
    new_srs(home / "kzg15.srs", 15)
    yield home
    if previous is None:
        os.environ.pop("VERIMESH_CACHE", None)
    else:
        os.environ["VERIMESH_CACHE"] = previous


def _case(home: Path, keys: Keys, name: str, model: Path, steps: int) -> ZkCase:
    from verimesh.zk.ezkl_backend import build_circuit

    circuit = build_circuit(model, X, srs=home / "kzg15.srs", out=home / f"circuit-{name}", steps=steps)
    job = new_job(model, input_path("mlp"), home / f"{name}.json", mode="zk", circuit=circuit.folder)
    bundle = prove(job, key=keys.node, out=home / f"{name}.vmb").bundle
    return ZkCase(circuit, job, bundle, home / "kzg15.srs")


@pytest.fixture(scope="session")
def single(zk_home: Path, keys: Keys) -> ZkCase:
    return _case(zk_home, keys, "mlp", model_path("mlp"), 1)


@pytest.fixture(scope="session")
def chain(zk_home: Path, keys: Keys) -> ZkCase:
    return _case(zk_home, keys, "mlp-chain", model_path("mlp"), 2)


def reseal(case: ZkCase, key: SecretKey, out: Path, *, proofs: list[bytes] | None = None,
           outputs: dict[str, np.ndarray] | None = None) -> Path:  # fmt: skip
    """What a cheating worker can do: any proofs and outputs, honestly signed by itself."""
    parsed = read_bundle(case.bundle)
    proofs = list(parsed.proofs) if proofs is None else proofs
    outputs = {k: np.array(v) for k, v in parsed.tensors.items()} if outputs is None else outputs
    write_zk_bundle(case.job, case.circuit, key=key, outputs=outputs, proofs=tuple(proofs), out=out)
    return out


def test_honest_single_step_proof_is_accepted(single: ZkCase, keys: Keys) -> None:
    verdict = verify(single.bundle, job=single.job, node_key=keys.node_pub)
    assert verdict.status == "accept", verdict.reason
    claimed = read_bundle(single.bundle).tensors["logits"]
    import onnxruntime as ort

    ref = ort.InferenceSession(str(model_path("mlp")), providers=["CPUExecutionProvider"]).run(None, X)[0]
    assert np.linalg.norm(claimed - ref) / np.linalg.norm(ref) < 0.05


def test_honest_chained_proof_is_accepted(chain: ZkCase, keys: Keys) -> None:
    verdict = verify(chain.bundle, job=chain.job, node_key=keys.node_pub)
    assert verdict.status == "accept", verdict.reason
    assert any(c.name == "chain" and c.ok for c in verdict.checks)
    assert len(chain.circuit.steps) == 2


def _proof(case: ZkCase, index: int = 0) -> dict[str, object]:
    return json.loads(read_bundle(case.bundle).proofs[index])


def test_output_instance_changed_is_rejected(single: ZkCase, keys: Keys, tmp_path: Path) -> None:
    proof = _proof(single)
    rows = proof["instances"]
    assert isinstance(rows, list)
    last = rows[0][-1]
    rows[0][-1] = ("01" if last[:2] != "01" else "02") + last[2:]
    bad = reseal(single, keys.node, tmp_path / "b.vmb", proofs=[json.dumps(proof).encode()])
    verdict = verify(bad, job=single.job, node_key=keys.node_pub)
    assert verdict.status == "reject" and verdict.reason.startswith("proof-step-0"), verdict.reason


def test_pretty_public_inputs_are_never_trusted(single: ZkCase, keys: Keys, tmp_path: Path) -> None:
    proof = _proof(single)
    pretty = proof["pretty_public_inputs"]
    assert isinstance(pretty, dict)
    for key_ in list(pretty):
        pretty[key_] = [["999.0"] * 10]
    edited = reseal(single, keys.node, tmp_path / "p.vmb", proofs=[json.dumps(proof).encode()])
    verdict = verify(edited, job=single.job, node_key=keys.node_pub)
    assert verdict.status == "accept", verdict.reason  # the proof is still valid ...
    assert (
        verdict.outputs == verify(single.bundle, job=single.job, node_key=keys.node_pub).outputs
    )  # ... and says the same


def test_proof_of_another_model_is_rejected(single: ZkCase, zk_home: Path, keys: Keys, tmp_path: Path) -> None:
    model = onnx.load(model_path("mlp"))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array((arr * 1.1).astype(arr.dtype), init.name))
    onnx.save(model, tmp_path / "other.onnx")
    other = _case(zk_home, keys, "other", tmp_path / "other.onnx", 1)
    swapped = reseal(single, keys.node, tmp_path / "s.vmb", proofs=list(read_bundle(other.bundle).proofs))
    verdict = verify(swapped, job=single.job, node_key=keys.node_pub)
    assert verdict.status == "reject" and verdict.reason.startswith("proof-step-0"), verdict.reason
    # A vk from another circuit put into the job's circuit folder is refused outright.
    copy = tmp_path / "circuit-copy"
    shutil.copytree(single.circuit.folder, copy)
    shutil.copy(other.circuit.path(other.circuit.steps[0].vk), copy / single.circuit.steps[0].vk)
    with pytest.raises(IntegrityError):
        load_circuit(copy).check_files()


def test_altered_settings_in_the_circuit_are_refused(single: ZkCase, keys: Keys, tmp_path: Path) -> None:
    settings = single.circuit.path(single.circuit.steps[0].settings)
    original = settings.read_bytes()
    doc = json.loads(original)
    doc["model_output_scales"] = [s + 1 for s in doc["model_output_scales"]]
    try:
        settings.write_text(json.dumps(doc))
        with pytest.raises(IntegrityError, match="does not match its pinned digest"):
            verify(single.bundle, job=single.job, node_key=keys.node_pub)
    finally:
        settings.write_bytes(original)


def test_truncated_proof_is_rejected(single: ZkCase, keys: Keys, tmp_path: Path) -> None:
    blob = read_bundle(single.bundle).proofs[0]
    for cut in (len(blob) // 2, len(blob) - 5):
        bad = reseal(single, keys.node, tmp_path / f"t{cut}.vmb", proofs=[blob[:cut]])
        verdict = verify(bad, job=single.job, node_key=keys.node_pub)
        assert verdict.status == "reject" and verdict.reason.startswith("proof-step-0"), verdict.reason


def test_claimed_output_other_than_the_proven_one_is_rejected(single: ZkCase, keys: Keys, tmp_path: Path) -> None:
    outputs = {k: np.array(v) for k, v in read_bundle(single.bundle).tensors.items()}
    outputs["logits"].reshape(-1)[0] += 0.25
    bad = reseal(single, keys.node, tmp_path / "o.vmb", outputs=outputs)
    verdict = verify(bad, job=single.job, node_key=keys.node_pub)
    assert verdict.status == "reject" and verdict.reason.startswith("output-binding"), verdict.reason


def test_chain_with_a_swapped_step_is_rejected(chain: ZkCase, keys: Keys, tmp_path: Path) -> None:
    """Step 0 proven on another input: both proofs verify alone, the hashes do not link."""
    from verimesh.zk.ezkl_backend import ZkProver

    other_input = {"input": (X["input"] * 0.5).astype(np.float32)}
    prover = ZkProver()
    try:
        other_proofs, _ = prover.prove(chain.circuit, other_input, chain.srs)
    finally:
        prover.close()
    honest = list(read_bundle(chain.bundle).proofs)
    bad = reseal(chain, keys.node, tmp_path / "c.vmb", proofs=[other_proofs[0], honest[1]])
    verdict = verify(bad, job=chain.job, node_key=keys.node_pub)
    assert verdict.status == "reject" and verdict.reason.startswith("chain-0-1"), verdict.reason


def test_replayed_and_foreign_bundles_are_rejected(single: ZkCase, chain: ZkCase, keys: Keys) -> None:
    assert verify(single.bundle, job=single.job, node_key=keys.other_pub).reason.startswith("signature")
    verdict = verify(chain.bundle, job=single.job, node_key=keys.node_pub)
    assert verdict.status == "reject" and verdict.reason.startswith("job-binding")


def test_other_srs_is_refused(single: ZkCase, keys: Keys, zk_home: Path, tmp_path: Path) -> None:
    from verimesh.zk.ezkl_backend import new_srs

    new_srs(tmp_path / "other.srs", 12)
    with pytest.raises(IntegrityError, match="SRS"):
        verify(single.bundle, job=single.job, node_key=keys.node_pub, srs=tmp_path / "other.srs")


def test_unsupported_operator_is_refused_by_name(zk_home: Path, tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Mod", ["x", "m"], ["y"], name="the_mod", fmod=1)], "modded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.full((1, 4), 3.0, np.float32), "m")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, tmp_path / "mod.onnx")
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    args = ["circuit", "build", str(tmp_path / "mod.onnx"), "--input", str(tmp_path / "x.npy")]
    result = CliRunner().invoke(cli, [*args, "--srs", str(zk_home / "kzg15.srs"), "-o", str(tmp_path / "c")])
    assert result.exit_code == 3 and "operator Mod" in result.stderr and "the_mod" in result.stderr


def test_cli_zk_flow(single: ZkCase, keys: Keys, tmp_path: Path) -> None:
    run = CliRunner().invoke
    shown = run(cli, ["circuit", "show", str(single.circuit.folder), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["steps"][0]["logrows"] <= 15
    job_file = tmp_path / "job.json"
    made = run(cli, ["job", "new", str(model_path("mlp")), "--input", str(input_path("mlp")), "--mode", "zk",
                     "--circuit", str(single.circuit.folder), "-o", str(job_file)])  # fmt: skip
    assert made.exit_code == 0, made.output
    wrong = run(cli, ["job", "new", str(model_path("rescnn")), "--input", str(input_path("rescnn")), "--mode", "zk",
                      "--circuit", str(single.circuit.folder), "-o", str(tmp_path / "w.json")])  # fmt: skip
    assert wrong.exit_code == 3 and "another model" in wrong.stderr
    result = run(cli, ["verify", str(single.bundle), "--job", str(single.job.base_dir / "mlp.json"),
                       "--node-key", str(keys.node_pub), "--json"])  # fmt: skip
    assert result.exit_code == 0 and json.loads(result.stdout)["verdict"] == "accept"
    with pytest.raises(InvalidInputError):
        new_job(model_path("mlp"), input_path("mlp"), tmp_path / "x.json", mode="zk")  # no circuit


def test_dynamic_batch_axis_is_fixed_from_the_calibration_input(zk_home: Path, keys: Keys, tmp_path: Path) -> None:
    """A model exported with a dynamic batch axis builds (ezkl's variables take the calibration
    input's size); a job whose input has another batch size is refused up front, not by ezkl."""
    model = onnx.load(model_path("mlp"))
    del model.graph.value_info[:]
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(model, tmp_path / "dynamic.onnx")
    case = _case(zk_home, keys, "dynamic", tmp_path / "dynamic.onnx", 1)
    settings = json.loads(case.circuit.path(case.circuit.steps[0].settings).read_text())
    assert ["batch", 1] in settings["run_args"]["variables"]
    assert verify(case.bundle, job=case.job, node_key=keys.node_pub).status == "accept"
    np.save(tmp_path / "batch2.npy", np.zeros((2, 16), np.float32))
    with pytest.raises(InvalidInputError, match="built for input 'input' of shape"):
        new_job(tmp_path / "dynamic.onnx", tmp_path / "batch2.npy", tmp_path / "b2.json", mode="zk",
                circuit=case.circuit.folder)  # fmt: skip


def test_symbolic_output_dimension_is_refused_by_name() -> None:
    from verimesh.zk.ezkl_backend import symbolic_dims

    model = onnx.load(model_path("mlp"))
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "n"
    with pytest.raises(InvalidInputError, match=r"symbolic dimensions \(n\)"):
        symbolic_dims(model, X)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    assert symbolic_dims(model, X) == {"n": 1}


@pytest.mark.usefixtures("ray_turn")
def test_zk_proof_checks_run_on_a_ray_verifier_fleet(single: ZkCase, keys: Keys, tmp_path: Path) -> None:
    """verify-many on a local Ray cluster: the honest zk bundle accepted by an actor, one whose
    claimed output is not the proven one rejected there (exit 1)."""
    import subprocess
    import sys

    outputs = {k: np.array(v) for k, v in read_bundle(single.bundle).tensors.items()}
    outputs["logits"].reshape(-1)[0] += 0.25
    bad = reseal(single, keys.node, tmp_path / "claimed.vmb", outputs=outputs)
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "verimesh", "verify-many", str(single.bundle), str(bad), "--jobs-from",
         str(single.bundle.parent), "--node-key", str(keys.node_pub), "--verifiers", "ray", "--actors", "1", "--json"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = {Path(r["bundle"]).name: r for r in json.loads(proc.stdout)["results"]}
    assert rows[single.bundle.name]["verdict"] == "accept", rows
    assert rows["claimed.vmb"]["verdict"] == "reject", rows
    assert all(r["verifier"].startswith("ray:") for r in rows.values()), rows
