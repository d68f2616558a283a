"""The CLI end to end with CliRunner: the commands the README shows, exit codes, --json, and
one-line errors (never a traceback) on bad input."""

from __future__ import annotations

import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from tests.conftest import MODELS, Keys, input_path, model_path
from verimesh.cli.app import cli


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def assert_one_line_error(result: Result, code: int) -> None:
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(("verimesh: error[", "Error:", "Usage:")), result.stderr


@pytest.fixture()
def job_file(workdir: Path) -> Path:
    assert run("job", "new", model_path("rescnn"), "--input", input_path("rescnn"), "-o", "job.json").exit_code == 0
    return workdir / "job.json"


def test_keys_new_and_show(workdir: Path) -> None:
    result = run("keys", "new", "-o", "node.key", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["node_id"].startswith("vm-")
    assert stat.S_IMODE((workdir / "node.key").stat().st_mode) == 0o600
    shown = run("keys", "show", "node.key.pub", "--json", "--check-pop")
    assert json.loads(shown.stdout) == {
        **json.loads(shown.stdout),
        "node_id": payload["node_id"],
        "proof_of_possession_valid": True,
    }
    assert (workdir / "node.key").read_text() not in shown.stdout
    assert run("keys", "new", "-o", "node.key").exit_code == 3  # refuses to overwrite


def test_encrypted_key_needs_passphrase(workdir: Path, job_file: Path) -> None:
    env = {"VERIMESH_PASSPHRASE": "correct horse"}
    assert run("keys", "new", "-o", "enc.key", "--encrypt", env=env).exit_code == 0
    assert "scrypt" in (workdir / "enc.key").read_text()
    assert run("prove", job_file, "--key", "enc.key", "-o", "r.vmb", env=env).exit_code == 0
    assert_one_line_error(
        run("prove", job_file, "--key", "enc.key", "-o", "r.vmb", env={"VERIMESH_PASSPHRASE": "wrong"}), 3
    )
    assert_one_line_error(run("prove", job_file, "--key", "enc.key", "-o", "r.vmb", env={"VERIMESH_PASSPHRASE": ""}), 3)


@pytest.mark.parametrize("model", MODELS)
def test_plan_json(model: str) -> None:
    result = run("plan", model_path(model), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert len(plan["steps"]) > 1 and all(s["digest"].startswith("sha256:") for s in plan["steps"])
    table = run("plan", model_path(model), "--steps", "2")
    assert table.exit_code == 0 and "2 steps" in table.stdout


@pytest.mark.parametrize("model", MODELS)
def test_prove_verify_roundtrip(model: str, workdir: Path, keys: Keys) -> None:
    assert run("job", "new", model_path(model), "--input", input_path(model), "-o", "job.json").exit_code == 0
    proved = run("prove", "job.json", "--key", keys.node_file, "-o", "r.vmb", "--device", "cpu", "--json")
    assert proved.exit_code == 0, proved.output
    for samples in ([], ["--samples", "all"]):
        result = run("verify", "r.vmb", "--job", "job.json", "--node-key", keys.node_pub, "--json", *samples)
        assert result.exit_code == 0, result.output
        verdict = json.loads(result.stdout)
        assert verdict["verdict"] == "accept"
        assert verdict["outputs"] == json.loads(proved.stdout)["outputs"]
        assert {c["name"] for c in verdict["checks"]} >= {"signature", "seal", "bindings", "sampling"}


def test_verify_with_seed_is_reproducible(job_file: Path, keys: Keys) -> None:
    assert run("prove", job_file, "--key", keys.node_file, "-o", "r.vmb").exit_code == 0
    a = json.loads(
        run("verify", "r.vmb", "--job", job_file, "--node-key", keys.node_pub, "--seed", "7", "--json").stdout
    )
    b = json.loads(
        run("verify", "r.vmb", "--job", job_file, "--node-key", keys.node_pub, "--seed", "7", "--json").stdout
    )
    assert a["sampled_steps"] == b["sampled_steps"] and a["seed"] == 7


def test_verify_reject_exit_code_and_evidence(job_file: Path, keys: Keys, workdir: Path) -> None:
    assert run("prove", job_file, "--key", keys.other_file, "-o", "r.vmb").exit_code == 0
    result = run("verify", "r.vmb", "--job", job_file, "--node-key", keys.node_pub)
    assert result.exit_code == 1
    assert result.stdout.startswith("REJECT: signature")


def test_evidence_check_cli(job_file: Path, keys: Keys, workdir: Path) -> None:
    from tests.conftest import perturbed
    from tests.integration.test_tamper import honest_trace, seal
    from verimesh.jobs.job import load_job

    job = load_job(job_file)
    trace = honest_trace(job)
    trace["logits"] = perturbed(trace["logits"])
    seal(job, trace, keys.node, workdir / "bad.vmb")
    result = run(
        "verify", "bad.vmb", "--job", job_file, "--node-key", keys.node_pub, "--evidence-out", "ev.vme", "--json"
    )
    assert result.exit_code == 1 and json.loads(result.stdout)["evidence"] == "ev.vme"
    checked = run("evidence", "check", "ev.vme", "--json")
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["proves_fraud"] is True
    assert_one_line_error(run("evidence", "check", "missing.vme"), 3)
    (workdir / "ev.vme").write_bytes((workdir / "ev.vme").read_bytes()[:-10])
    assert_one_line_error(run("evidence", "check", "ev.vme"), 3)


# --- bad input: exit 3, one line ---------------------------------------------------------------


def test_missing_files(workdir: Path, keys: Keys, job_file: Path) -> None:
    assert_one_line_error(run("plan", "nope.onnx"), 3)
    assert_one_line_error(run("job", "new", "nope.onnx", "--input", input_path("mlp"), "-o", "j.json"), 3)
    assert_one_line_error(run("job", "new", model_path("mlp"), "--input", "nope.npy", "-o", "j.json"), 3)
    assert_one_line_error(run("prove", "nope.json", "--key", keys.node_file, "-o", "r.vmb"), 3)
    assert_one_line_error(run("prove", job_file, "--key", "nope.key", "-o", "r.vmb"), 3)
    assert_one_line_error(run("verify", "nope.vmb", "--job", job_file, "--node-key", keys.node_pub), 3)
    assert_one_line_error(run("verify", "nope.vmb", "--job", "nope.json", "--node-key", keys.node_pub), 3)


def test_non_onnx_model(workdir: Path) -> None:
    (workdir / "bad.onnx").write_bytes(b"\x00garbage\xff" * 100)
    assert_one_line_error(run("plan", "bad.onnx"), 3)
    (workdir / "empty.onnx").write_bytes(b"")
    assert_one_line_error(run("plan", "empty.onnx"), 3)


@pytest.mark.parametrize(
    ("filename", "array"),
    [
        ("wrong-shape.npy", np.zeros((1, 1, 8, 8), np.float32)),
        ("wrong-rank.npy", np.zeros((16, 16), np.float32)),
        ("wrong-dtype.npy", np.zeros((1, 1, 16, 16), np.float64)),
        ("nan.npy", np.full((1, 1, 16, 16), np.nan, np.float32)),
        ("inf.npy", np.full((1, 1, 16, 16), np.inf, np.float32)),
    ],
)
def test_bad_input_tensors(filename: str, array: np.ndarray, workdir: Path) -> None:
    np.save(workdir / filename, array)
    assert_one_line_error(run("job", "new", model_path("rescnn"), "--input", filename, "-o", "j.json"), 3)


def test_pickled_and_malformed_input_files(workdir: Path) -> None:
    np.save(workdir / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert_one_line_error(run("job", "new", model_path("mlp"), "--input", "obj.npy", "-o", "j.json"), 3)
    (workdir / "bad.json").write_text('{"input": [[1, 2], [3]]}')
    assert_one_line_error(run("job", "new", model_path("mlp"), "--input", "bad.json", "-o", "j.json"), 3)
    (workdir / "names.npz").write_bytes(b"")
    np.savez(workdir / "names.npz", wrong=np.zeros((1, 16), np.float32))
    assert_one_line_error(run("job", "new", model_path("mlp"), "--input", "names.npz", "-o", "j.json"), 3)


def test_json_inputs_both_styles(workdir: Path, keys: Keys) -> None:
    x = np.load(input_path("mlp"))
    (workdir / "named.json").write_text(json.dumps({"input": x.tolist()}))
    (workdir / "ezkl.json").write_text(json.dumps({"input_data": [x.reshape(-1).tolist()]}))
    (workdir / "x.npz").write_bytes(b"")
    np.savez(workdir / "x.npz", input=x)
    ids = set()
    for name in ("named.json", "ezkl.json", "x.npz"):
        result = run("job", "new", model_path("mlp"), "--input", name, "-o", f"{name}.job.json", "--json")
        assert result.exit_code == 0, result.output
        ids.add(json.loads(result.stdout)["input_digest"])
    assert len(ids) == 1  # the same tensor, whichever way it was written


def test_edited_job_and_swapped_step_file(job_file: Path, keys: Keys, workdir: Path) -> None:
    assert run("prove", job_file, "--key", keys.node_file, "-o", "r.vmb").exit_code == 0
    doc = json.loads(job_file.read_text())
    doc["policy"]["samples"] = 0
    (workdir / "edited.json").write_text(json.dumps(doc))
    assert_one_line_error(run("verify", "r.vmb", "--job", "edited.json", "--node-key", keys.node_pub), 3)
    step = workdir / doc["steps"][0]["path"]
    step.write_bytes((workdir / doc["steps"][1]["path"]).read_bytes())
    assert_one_line_error(run("prove", job_file, "--key", keys.node_file, "-o", "r2.vmb"), 3)


def test_wrong_model_file_is_refused(job_file: Path, keys: Keys) -> None:
    result = run("prove", job_file, "--key", keys.node_file, "-o", "r.vmb", "--model", model_path("mlp"))
    assert_one_line_error(result, 3)
    assert "does not match the job's model digest" in result.stderr


@pytest.mark.cpu_only
def test_cuda_requested_without_provider(job_file: Path, keys: Keys) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    assert_one_line_error(run("prove", job_file, "--key", keys.node_file, "-o", "r.vmb", "--device", "cuda"), 4)


def test_usage_errors_exit_2(job_file: Path, keys: Keys) -> None:
    assert run("verify").exit_code == 2
    assert run("verify", "r.vmb", "--job", job_file, "--node-key", keys.node_pub, "--samples", "some").exit_code == 2
    assert (
        run("job", "new", model_path("mlp"), "--input", input_path("mlp"), "-o", "j.json", "--steps", "0").exit_code
        == 2
    )


def _hostile_zip(path: Path, name: str, data: bytes, compress: int) -> None:
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        zf.writestr(name, data)


@pytest.mark.parametrize(
    ("name", "data", "compress", "needle"),
    [
        ("../../escape.json", b"{}", zipfile.ZIP_STORED, "not allowed"),
        ("/abs/envelope.json", b"{}", zipfile.ZIP_STORED, "not allowed"),
        ("envelope.json", b"\x00" * (64 * 1024 * 1024), zipfile.ZIP_DEFLATED, "compressed members are not allowed"),
        ("envelope.json", b"{}", zipfile.ZIP_STORED, "non-canonical"),
    ],
)
def test_hostile_archives(
    name: str, data: bytes, compress: int, needle: str, job_file: Path, keys: Keys, workdir: Path
) -> None:
    _hostile_zip(workdir / "evil.vmb", name, data, compress)
    result = run("verify", "evil.vmb", "--job", job_file, "--node-key", keys.node_pub)
    assert_one_line_error(result, 3)
    assert needle in result.stderr
    assert not (workdir.parent / "escape.json").exists()


def test_oversized_bundle_is_refused(job_file: Path, keys: Keys) -> None:
    assert run("prove", job_file, "--key", keys.node_file, "-o", "r.vmb").exit_code == 0
    result = run("verify", "r.vmb", "--job", job_file, "--node-key", keys.node_pub, "--max-bundle-size", "1000")
    assert result.exit_code == 3 and "limit" in result.output


def test_bench_commands_print_a_table_and_write_json(workdir: Path) -> None:
    doc = workdir / "bench.md"
    doc.write_text("# Benchmarks\n\nAnalysis written by hand.\n")
    args = ["bench", model_path("mlp"), "--quick", "--only", "spot,subtasks,signatures,ledger", "--ledger-entries",
            "300", "--json", "bench.json", "--markdown", doc]  # fmt: skip
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "| mlp.onnx |" in result.stdout and "verifications/s, blspy" in result.stdout
    report = json.loads((workdir / "bench.json").read_text())
    assert report["signatures"]["py_ecc_verifications_per_s"] > 0 and report["signatures"]["aggregate_verify_ms"] > 0
    assert report["signatures"]["fast_backend"] == "blspy" and "zk" not in report
    sub = report["subtasks"][0]
    assert sub["model"] == "mlp.onnx" and sub["segments"] == 4 and len(sub["segment_prove_s"]) == 4
    assert sub["chain_verify_s"] > 0 and sub["chain_steps_rechecked"] >= 4 and "Sub-tasks" in result.stdout
    spot = report["spot"][0]
    assert spot["steps"] >= 1 and spot["prove_s"] > 0 and spot["verify_s"] > 0 and "prove_overhead" in spot
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["spot prove / inference"]["met"] is None  # a sub-millisecond model is not judged
    assert targets["envelope verifications/s"]["met"] is True
    assert targets["inclusion / consistency proof ms"]["met"] is None  # the goal is stated at 10^6 entries
    assert report["ledger"][0]["entries"] == 300
    # The generated part goes between marks; what is outside them survives a second run.
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nAnalysis written by hand.\n") and "### Targets" in text
    doc.write_text(text + "\nMore analysis after.\n")
    assert run(*args).exit_code == 0
    again = doc.read_text()
    assert again.count("### Targets") == 1 and "Analysis written by hand." in again
    assert again.endswith("More analysis after.\n")
    assert run("bench", "--only", "gpu").exit_code == 2
    result = run("ledger", "bench", "--entries", "300", "--batch", "50", "--json", "ledger.json")
    assert result.exit_code == 0, result.output
    ledger = json.loads((workdir / "ledger.json").read_text())
    assert ledger["entries"] == 300 and ledger["appends_per_s"] > 0 and ledger["inclusion_ms"] > 0


def test_redteam_against_a_mesh_nobody_reaches_is_an_error_not_a_report(tmp_path: Path) -> None:
    result = run("redteam", "--mesh", "http://127.0.0.1:1", "--strategy", "lazy", "--nodes", "2",
                 "--keys-dir", str(tmp_path / "rk"), "--idle-exit", "1")  # fmt: skip
    assert result.exit_code == 3 and "coordinator-unreachable" in result.output, result.output
