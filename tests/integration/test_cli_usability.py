"""What a new user hits first (issue 14): outputs they can read, bundles they can inspect, files
that are not overwritten silently, plans that say why they are not what was asked, and `job show`
checking the files it says it checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result

from tests.conftest import Keys, control_flow_model, input_path, model_path
from verimesh.cli.app import cli


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture()
def proved(workdir: Path, keys: Keys) -> Path:
    assert run("job", "new", model_path("mlp"), "--input", input_path("mlp"), "-o", "job.json").exit_code == 0
    result = run("prove", "job.json", "--key", keys.node_file, "-o", "r.vmb", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return workdir / "r.vmb"


def _reference_logits() -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path("mlp")), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": np.load(input_path("mlp"))})[0]


def test_outputs_verifies_then_prints_the_values(proved: Path, keys: Keys) -> None:
    result = run("outputs", proved, "--job", "job.json", "--node-key", keys.node_pub, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["verified"] is True and doc["verdict"] == "accept"
    got = np.array(doc["values"]["logits"]["values"], dtype=np.float32).reshape(doc["values"]["logits"]["shape"])
    np.testing.assert_allclose(got, _reference_logits(), rtol=1e-5, atol=1e-6)
    human = run("outputs", proved, "--job", "job.json", "--node-key", keys.node_pub)
    assert human.exit_code == 0 and human.stdout.startswith("VERIFIED outputs")


def test_outputs_to_npz_and_json_round_trip(proved: Path, keys: Keys, workdir: Path) -> None:
    for name in ("out.npz", "out.json"):
        result = run("outputs", proved, "--job", "job.json", "--node-key", keys.node_pub, "-o", name)
        assert result.exit_code == 0, result.output
    npz = np.load(workdir / "out.npz")["logits"]
    np.testing.assert_allclose(npz, _reference_logits(), rtol=1e-5, atol=1e-6)
    doc = json.loads((workdir / "out.json").read_text())
    assert np.array_equal(np.array(doc["logits"]["values"], dtype=np.float32).reshape(npz.shape), npz)


def test_outputs_of_a_wrong_key_or_a_forged_bundle_gives_no_values(proved: Path, keys: Keys) -> None:
    rejected = run("outputs", proved, "--job", "job.json", "--node-key", keys.other_pub, "--json")
    assert rejected.exit_code == 1
    assert json.loads(rejected.stdout)["values"] is None
    assert "logits" not in rejected.stdout.split('"checks"')[0]  # nothing unverified is handed out
    missing_key = run("outputs", proved, "--job", "job.json")
    assert missing_key.exit_code == 2 and "--node-key" in missing_key.stderr


def test_outputs_unverified_says_so(proved: Path) -> None:
    result = run("outputs", proved, "--job", "job.json", "--unverified", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["verified"] is False
    assert "not verified" in result.stderr


def test_bundle_show_reads_without_verifying(proved: Path, keys: Keys) -> None:
    result = run("bundle", "show", proved, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["format"] == 2 and doc["node_id"] == keys.node.node_id
    assert doc["trace"][0]["name"] == "input"
    assert "logits" in doc["subjects"]
    garbage = Path("garbage.vmb")
    garbage.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    bad = run("bundle", "show", garbage)
    assert bad.exit_code == 3 and "Traceback" not in bad.output


def test_prove_refuses_to_overwrite_without_force(proved: Path, keys: Keys) -> None:
    before = proved.read_bytes()
    again = run("prove", "job.json", "--key", keys.node_file, "-o", proved, "--device", "cpu")
    assert again.exit_code == 3 and "--force" in again.stderr
    assert proved.read_bytes() == before
    proved.write_bytes(b"not a bundle")
    forced = run("prove", "job.json", "--key", keys.node_file, "-o", proved, "--device", "cpu", "--force")
    assert forced.exit_code == 0 and proved.read_bytes() == before  # proving is deterministic


def test_job_show_checks_the_files_it_pins(proved: Path) -> None:
    ok = run("job", "show", "job.json")
    assert ok.exit_code == 0 and "match their digests" in ok.stdout
    step = Path("job.files/step-001.onnx")
    step.write_bytes(step.read_bytes() + b"\0")
    broken = run("job", "show", "job.json")
    assert broken.exit_code == 3 and "step-001.onnx" in broken.stderr


def test_job_show_checks_the_input(proved: Path) -> None:
    np.savez("job.files/input.npz", input=np.zeros((1, 16), np.float32))
    broken = run("job", "show", "job.json")
    assert broken.exit_code == 3 and "input" in broken.stderr


def test_more_steps_than_cuts_is_said(workdir: Path) -> None:
    planned = run("plan", model_path("mlp"), "--steps", "40", "--json")
    assert planned.exit_code == 0
    assert "verimesh: note: --steps 40: the model can be cut into" in planned.stderr
    assert json.loads(planned.stdout)["notes"]
    made = run("job", "new", model_path("mlp"), "--input", input_path("mlp"), "--steps", "40", "-o", "j.json")
    assert made.exit_code == 0 and "verimesh: note: --steps 40" in made.stderr


def test_control_flow_model_is_one_step_and_said(workdir: Path) -> None:
    model = control_flow_model()
    onnx.save(model, "iffy.onnx")
    np.save("iffy.npy", np.array([1.0, -2.0], np.float32))
    made = run("job", "new", "iffy.onnx", "--input", "iffy.npy", "-o", "j.json", "--json")
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["steps"] == 1 and "control flow" in made.stderr


def test_circuit_build_refuses_an_existing_folder_before_building(workdir: Path) -> None:
    folder = workdir / "circ"
    folder.mkdir()
    (folder / "settings.json").write_text("{}")
    result = run("circuit", "build", model_path("mlp"), "--input", input_path("mlp"), "--srs", "no.srs", "-o", folder)
    assert result.exit_code == 3 and "--force" in result.stderr
    assert (folder / "settings.json").read_text() == "{}"


def test_bench_startup_section_measures_whole_processes(workdir: Path) -> None:
    """The start-up figure: `verimesh verify` as a process against the python + onnxruntime floor."""
    result = run("bench", "--only", "startup", "--quick", "--json", "b.json")
    assert result.exit_code == 0, result.output
    report = json.loads(Path("b.json").read_text())
    if not Path("fixtures/mlp.onnx").exists():  # run from a scratch folder: the section says why it did not run
        assert "startup" not in report and any("startup skipped" in n for n in report["notes"])
    from verimesh.assurance.startup import bench_startup

    measured = bench_startup(model_path("mlp"), input_path("mlp"), repeats=1)
    seconds = measured["seconds"]
    assert 0 < seconds["floor"] < seconds["verify_accept"] and seconds["verify_reject"] > 0
    assert measured["verify_over_floor"] == seconds["verify_accept"] / seconds["floor"]


def test_verify_outputs_out_writes_values_only_on_an_accept(proved: Path, keys: Keys, workdir: Path) -> None:
    ok = run("verify", proved, "--job", "job.json", "--node-key", keys.node_pub, "--outputs-out", "v.npz")
    assert ok.exit_code == 0 and "verified outputs written to v.npz" in ok.stdout
    np.testing.assert_allclose(np.load("v.npz")["logits"], _reference_logits(), rtol=1e-5, atol=1e-6)
    bad = run("verify", proved, "--job", "job.json", "--node-key", keys.other_pub, "--outputs-out", "w.npz")
    assert bad.exit_code == 1 and not Path("w.npz").exists()
    wrong_suffix = run("verify", proved, "--job", "job.json", "--node-key", keys.node_pub, "--outputs-out", "v.txt")
    assert wrong_suffix.exit_code == 2


def test_outputs_with_the_ledgers_key_reads_and_records_nothing(proved: Path, keys: Keys, workdir: Path) -> None:
    from tests.integration.test_ledger import join, new_ledger
    from verimesh.jobs.job import load_job

    led = new_ledger(workdir / "mesh.db")
    join(led, keys.node, 100)
    before = led.size()
    result = run("outputs", proved, "--job", "job.json", "--ledger", workdir / "mesh.db", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verified"] is True
    assert led.size() == before  # read only
    job = load_job(Path("job.json"))
    from verimesh.signing.keys import generate_key
    from verimesh.workflows import prove

    prove(job, key=generate_key(), out=workdir / "stranger.vmb", device="cpu")
    unknown = run("outputs", "stranger.vmb", "--job", "job.json", "--ledger", workdir / "mesh.db")
    assert unknown.exit_code == 3 and "registered" in unknown.stderr
    both = run("outputs", proved, "--job", "job.json", "--ledger", workdir / "mesh.db", "--node-key", keys.node_pub)
    assert both.exit_code == 2
