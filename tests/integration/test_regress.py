"""`verimesh regress`: suites parse strictly, healthy cases hold, and each kind of breakage (a
budget too tight, a golden bundle altered, a circuit whose settings changed) fails with the right
reason in the JSON, JUnit and markdown reports; serial and parallel runs give the same outcome."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest
from click.testing import CliRunner

from verimesh import __version__
from verimesh.assurance.regress import junit_xml, load_suite, run_suite
from verimesh.cli.app import cli
from verimesh.core.digest import sha256_file
from verimesh.jobs.circuit import load_circuit, write_circuit

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"

SPOT_CASE = """
[[case]]
name = "{name}"
model = "{fix}/{model}.onnx"
input = "{fix}/{model}.input.npy"
steps = 3
detection_trials = 6
[case.budget]
max_prove_seconds = {prove}
max_verify_seconds = 30
max_proof_bytes = 1000000
[case.min_detection]
perturb-final = 1.0
weights-fp16 = 0.5
"""


def spot_case(name: str, model: str = "mlp", prove: float = 30) -> str:
    return SPOT_CASE.format(name=name, fix=FIX, model=model, prove=prove)


def write_suite(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "suite.toml"
    path.write_text('[suite]\nname = "test"\ngolden = "golden"\n' + body)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One zk cache for the module (the drift check fills it, proving then reuses it)."""
    path = tmp_path_factory.mktemp("zk-cache")
    previous = os.environ.get("VERIMESH_CACHE")
    os.environ["VERIMESH_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("VERIMESH_CACHE", None)
    else:
        os.environ["VERIMESH_CACHE"] = previous


# -- the suite file --------------------------------------------------------------------------------

BAD_SUITES = {
    "not TOML": "[[case]\nname =",
    "unknown key": spot_case("a").replace("steps = 3", "stpes = 3"),
    "no cases": "",
    "missing model": spot_case("a").replace("mlp.onnx", "nothing.onnx"),
    "bad mode": spot_case("a").replace("steps = 3", 'mode = "fast"'),
    "traversal in name": spot_case("../escape"),
    "unknown strategy": spot_case("a").replace("perturb-final", "teleport"),
    "rate above one": spot_case("a").replace("weights-fp16 = 0.5", "weights-fp16 = 50"),
    "NaN budget": spot_case("a").replace("max_verify_seconds = 30", "max_verify_seconds = nan"),
    "negative budget": spot_case("a").replace("max_verify_seconds = 30", "max_verify_seconds = -1"),
    "repeated name": spot_case("a") + spot_case("a"),
    "zk without circuit": spot_case("a").replace("steps = 3", 'mode = "zk"').split("[case.min_detection]")[0],
    "circuit on a spot case": spot_case("a").replace("steps = 3", f'circuit = "{ROOT}/circuits/mlp"'),
    "profile names no case": spot_case("a") + '[profile.quick]\ncases = ["b"]\n',
}


@pytest.mark.parametrize("body", BAD_SUITES.values(), ids=BAD_SUITES.keys())
def test_a_bad_suite_is_one_line_and_exit_3(body: str, tmp_path: Path) -> None:
    suite = write_suite(tmp_path, body)
    result = CliRunner().invoke(cli, ["regress", str(suite)])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "error[invalid-suite]" in lines[0], result.output


def test_unknown_profile_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["regress", str(write_suite(tmp_path, spot_case("a"))), "--profile", "nope"])
    assert result.exit_code == 3 and "no profile 'nope'" in result.output


def test_the_project_suite_parses_and_has_golden_files_for_every_case() -> None:
    suite = load_suite(FIX / "suite.toml")
    names = {c.name for c in suite.cases}
    assert {"mlp-spot", "mlp-zk", "mlp-chain-zk"} <= names
    assert {c.mode for c in suite.cases} == {"spot", "zk", "generate"}
    assert all(c.detection_trials <= 20 for c in suite.selected("quick"))
    for case in suite.cases:
        assert list(suite.golden.glob(f"*/{case.name}/golden.json")), f"no golden files for {case.name}"


# -- healthy spot suite: golden files made, then serial == parallel -------------------------------


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("healthy")
    suite = write_suite(folder, spot_case("mlp") + spot_case("rescnn", "rescnn"))
    report = run_suite(load_suite(suite), update_golden=True)
    assert report.ok, [(c.name, k.name, k.message()) for c in report.cases for k in c.failures]
    return suite


def test_healthy_suite_holds_serial_and_parallel_alike(healthy: Path) -> None:
    suite = load_suite(healthy)
    serial = run_suite(suite)
    parallel = run_suite(suite, jobs=2)
    assert serial.ok and parallel.ok
    assert serial.outcome() == parallel.outcome()
    names = {k.name for k in serial.cases[0].checks}
    assert {"honest-verify", "budget:prove-seconds", "tamper:output-perturbed", "tamper:weights-fp16",
            "tamper:byte-flipped", "detection:perturb-final", f"golden:v{__version__}/fraud.vme"} <= names  # fmt: skip


def test_cli_writes_all_three_reports_and_exits_0(healthy: Path, tmp_path: Path) -> None:
    out = tmp_path
    args = ["regress", str(healthy), "--jobs", "2", "--json", str(out / "r.json"), "--junit",
            str(out / "reports" / "r.xml"), "--markdown", str(out / "r.md")]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "2 of 2 cases hold" in result.output
    doc = json.loads((out / "r.json").read_text())
    assert doc["ok"] and [c["name"] for c in doc["cases"]] == ["mlp", "rescnn"]
    tree = ElementTree.parse(out / "reports" / "r.xml").getroot()  # its folder was made
    assert tree.get("failures") == "0" and int(tree.get("tests") or 0) > 20
    assert "every case holds" in (out / "r.md").read_text()


# -- broken suite -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(healthy: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three broken cases beside a healthy one:
    - tight: a prove budget no machine can meet;
    - altered: its golden honest bundle has one byte changed;
    - drifted: a zk circuit whose settings changed (param_scale 13 -> 12) and were re-pinned."""
    folder = tmp_path_factory.mktemp("broken")
    shutil.copytree(healthy.parent / "golden", folder / "golden")
    version = next((folder / "golden").iterdir())
    shutil.copytree(version / "mlp", version / "altered")
    shutil.copytree(version / "mlp", version / "tight")
    data = bytearray((version / "altered" / "honest.vmb").read_bytes())
    data[200] ^= 0x01  # inside the first tensor's data: the CRC catches it
    (version / "altered" / "honest.vmb").write_bytes(bytes(data))
    circuit_dir = folder / "drifted-circuit"
    shutil.copytree(ROOT / "circuits" / "mlp", circuit_dir)
    settings = circuit_dir / "settings-000.json"
    doc = json.loads(settings.read_text())
    doc["run_args"]["param_scale"] = 12
    settings.write_text(json.dumps(doc))
    circuit = load_circuit(circuit_dir)
    step = dataclasses.replace(circuit.steps[0], settings_digest=sha256_file(settings))
    write_circuit(dataclasses.replace(circuit, steps=(step,)))
    drifted = f"""
[[case]]
name = "drifted"
model = "{FIX}/mlp.onnx"
input = "{FIX}/mlp.input.npy"
mode = "zk"
circuit = "drifted-circuit"
srs = "{FIX}/srs/kzg15.test-only.srs"
"""
    body = spot_case("mlp") + spot_case("tight", prove=1e-9) + spot_case("altered") + drifted
    return write_suite(folder, body)


@pytest.mark.slow
def test_broken_cases_fail_with_their_reasons_in_every_format(broken: Path, tmp_path: Path) -> None:
    out = tmp_path
    args = ["regress", str(broken), "--json", str(out / "r.json"), "--junit", str(out / "r.xml"),
            "--markdown", str(out / "r.md")]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output

    doc = json.loads((out / "r.json").read_text())
    cases = {c["name"]: c for c in doc["cases"]}
    assert not doc["ok"] and cases["mlp"]["ok"]
    failed = {name: {k["name"]: k["reason"] for k in c["checks"] if not k["ok"]} for name, c in cases.items()}
    assert set(failed["tight"]) == {"budget:prove-seconds"}
    assert failed["tight"]["budget:prove-seconds"].startswith("over budget: max 1e-09 s")
    assert set(failed["altered"]) == {f"golden:v{__version__}/honest.vmb"}
    assert "recorded 'accept', now 'error'" in failed["altered"][f"golden:v{__version__}/honest.vmb"]
    pinned = load_circuit(ROOT / "circuits" / "mlp").steps[0].vk_digest
    drift = failed["drifted"]["circuit-drift:step-0"]
    assert f"vk moved: pinned {pinned}, rebuilt sha256:" in drift
    assert "vk-mismatch" in failed["drifted"]["honest"]  # the worker's setup refuses the moved vk too

    junit = ElementTree.parse(out / "r.xml").getroot()
    failures = {
        (tc.get("classname"), tc.get("name")): tc.find("failure").get("message")  # type: ignore[union-attr]
        for tc in junit.iter("testcase")
        if tc.find("failure") is not None
    }
    assert ("regress.tight", "budget:prove-seconds") in failures
    assert ("regress.altered", f"golden:v{__version__}/honest.vmb") in failures
    assert pinned in failures[("regress.drifted", "circuit-drift:step-0")]
    assert not any(cls == "regress.mlp" for cls, _ in failures)
    assert junit.get("failures") == str(len(failures))

    md = (out / "r.md").read_text()
    assert "❌ 3 of 4 cases failed" in md
    assert "- **tight** `budget:prove-seconds`: over budget" in md
    assert f"- **altered** `golden:v{__version__}/honest.vmb`: no longer verifies as recorded" in md
    assert f"- **drifted** `circuit-drift:step-0`: step 0 vk moved: pinned {pinned}" in md
    for name in ("tight", "altered", "drifted"):
        assert f"FAIL  {name}" in result.output


@pytest.mark.slow
def test_broken_suite_gives_the_same_outcome_in_parallel(broken: Path) -> None:
    suite = load_suite(broken)
    serial, parallel = run_suite(suite), run_suite(suite, jobs=2)
    assert not serial.ok
    assert serial.outcome() == parallel.outcome()


def test_an_unpinned_settings_edit_names_the_file_and_both_digests(cache: Path, tmp_path: Path) -> None:
    circuit_dir = tmp_path / "c"
    shutil.copytree(ROOT / "circuits" / "mlp", circuit_dir)
    pinned = load_circuit(circuit_dir).steps[0].settings_digest
    (circuit_dir / "settings-000.json").write_text((circuit_dir / "settings-000.json").read_text() + " ")
    body = f"""
[[case]]
name = "edited"
model = "{FIX}/mlp.onnx"
input = "{FIX}/mlp.input.npy"
mode = "zk"
circuit = "c"
srs = "{FIX}/srs/kzg15.test-only.srs"
"""
    report = run_suite(load_suite(write_suite(tmp_path, body)))
    reasons = {k.name: k.reason for k in report.cases[0].failures}
    assert reasons["circuit-drift:step-0"].startswith(f"settings-000.json moved: pinned {pinned}, found sha256:")
    assert "golden" in reasons  # a new case has no golden files yet: said, not silently passed


def test_a_verifier_that_cannot_reject_fails_the_suite(healthy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite exists to catch a verifier gone soft: make verify accept everything and watch."""
    from verimesh import workflows
    from verimesh.assurance import redteam
    from verimesh.jobs.verdict import Check, Verdict

    real = workflows.verify

    def lenient(*args: object, **kwargs: object) -> Verdict:
        verdict = real(*args, **kwargs)  # type: ignore[arg-type]
        return dataclasses.replace(verdict, status="accept", checks=(Check("everything", True, "waved through"),))

    monkeypatch.setattr(workflows, "verify", lenient)
    monkeypatch.setattr(redteam, "verify", lenient)
    report = run_suite(load_suite(healthy))
    assert not report.ok
    failed = {k.name: k.reason for k in report.cases[0].failures}
    assert failed["tamper:output-perturbed"] == "ACCEPTED a tampered bundle"
    assert all(failed.get(f"tamper:{name}") == "ACCEPTED a tampered bundle" for name in ("truncated", "wrong-input"))
    assert "recorded 'reject', now 'accept'" in failed[f"golden:v{__version__}/fraud.vmb"]
    assert "detection:perturb-final" in failed  # the red team's cheats now get through as well


# -- budgets that travel, one case, golden files only from a case that holds ----------------------

RELATIVE_CASE = """
[[case]]
name = "{name}"
model = "{fix}/mlp.onnx"
input = "{fix}/mlp.input.npy"
steps = 3
tamper = false
{budget}
"""


def relative_case(name: str, budget: str = "") -> str:
    return RELATIVE_CASE.format(name=name, fix=FIX, budget=budget)


def test_relative_budgets_are_measured_against_a_reference_in_the_same_run(tmp_path: Path) -> None:
    """No time budget given: the defaults are relative (ratio x reference, reference + floor), and
    the report carries the measured value, the reference and the limit."""
    tight = "[case.budget]\nmax_prove_ratio = 0.000001\nmax_verify_ratio = 1000\nfloor_seconds = 0"
    suite = load_suite(write_suite(tmp_path, relative_case("default") + relative_case("tight", tight)))
    report = run_suite(suite)
    default, tightened = report.cases
    checks = {c.name: c for c in default.checks}
    prove = checks["budget:prove-seconds"]
    assert prove.ok and prove.reason.startswith("within budget: max(3 x reference, reference + 0.05 s)")
    assert 0 < prove.measured["reference"] < prove.measured["limit"] and prove.measured["value"] > 0
    assert checks["budget:verify-seconds"].ok
    failed = {c.name: c for c in tightened.failures}
    assert set(failed) == {"budget:prove-seconds", "golden"}, failed
    assert failed["budget:prove-seconds"].reason.startswith("over budget: max(1e-06 x reference, reference + 0 s)")
    # JUnit testcases carry the time each check took.
    junit = ElementTree.fromstring(junit_xml(report))
    assert sum(float(tc.get("time") or 0) for tc in junit.iter("testcase")) > 0


def test_case_runs_one_case_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    suite_file = write_suite(tmp_path, relative_case("a") + relative_case("b"))
    report = run_suite(load_suite(suite_file), only="b")
    assert [c.name for c in report.cases] == ["b"]
    result = CliRunner().invoke(cli, ["regress", str(suite_file), "--case", "nope"])
    assert result.exit_code == 3 and "error[invalid-suite]" in result.stderr and "no case 'nope'" in result.stderr


def test_golden_files_are_not_written_for_a_failing_case(tmp_path: Path) -> None:
    tight = "[case.budget]\nmax_proof_bytes = 1"
    suite_file = write_suite(tmp_path, relative_case("fails", tight))
    report = run_suite(load_suite(suite_file), update_golden=True)
    update = next(c for c in report.cases[0].checks if c.name == "golden-update")
    assert not update.ok and "not written" in update.reason
    assert not list((tmp_path / "golden").glob("*/fails"))


def test_a_circuit_built_for_another_model_is_refused_up_front(tmp_path: Path) -> None:
    body = f"""
[[case]]
name = "mismatch"
model = "{FIX}/rescnn.onnx"
input = "{FIX}/rescnn.input.npy"
mode = "zk"
circuit = "{ROOT}/circuits/mlp"
srs = "{FIX}/srs/kzg15.test-only.srs"
"""
    result = CliRunner().invoke(cli, ["regress", str(write_suite(tmp_path, body))])
    assert result.exit_code == 3 and "built for another model" in result.stderr, result.output


def _token_model(path: Path) -> tuple[Path, Path]:
    """Embedding lookup of int64 token ids, then a GRU: what tripped the tamper set and the red team."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden = 8
    inits = [
        numpy_helper.from_array(rng.standard_normal((32, hidden)).astype(np.float32), "embed"),
        numpy_helper.from_array(rng.standard_normal((1, 3 * hidden, hidden)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((1, 3 * hidden, hidden)).astype(np.float32), "R"),
        numpy_helper.from_array(np.array([6, 1, hidden], np.int64), "seq_shape"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["e"], axis=0),
        helper.make_node("Reshape", ["e", "seq_shape"], ["x"]),
        helper.make_node("GRU", ["x", "W", "R"], ["all", "h"], hidden_size=hidden),
        helper.make_node("Reshape", ["h", "flat"], ["y"]),
    ]
    inits.append(numpy_helper.from_array(np.array([1, hidden], np.int64), "flat"))
    graph = helper.make_graph(
        nodes, "tokens", [helper.make_tensor_value_info("ids", TensorProto.INT64, [6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, hidden])], initializer=inits,
    )  # fmt: skip
    model = path / "tokens.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    inputs = path / "tokens.input.npy"
    np.save(inputs, np.array([3, 1, 4, 1, 5, 9], np.int64))
    return model, inputs


def test_regress_and_red_team_run_on_token_ids_and_a_gru(tmp_path: Path) -> None:
    """Integer inputs stay valid token ids in the tamper set and the red team; a tamper the model
    offers nothing to says so instead of crashing, and the report is written."""
    from verimesh.assurance.redteam import STRATEGIES, run_redteam

    model, inputs = _token_model(tmp_path)
    body = f"""
[[case]]
name = "tokens"
model = "{model}"
input = "{inputs}"
steps = 3
detection_trials = 4
[case.min_detection]
wrong-input = 1.0
lazy = 0.0
"""
    suite_file = write_suite(tmp_path, body)
    result = CliRunner().invoke(cli, ["regress", str(suite_file), "--json", str(tmp_path / "r.json")])
    doc = json.loads((tmp_path / "r.json").read_text())
    failed = [k for c in doc["cases"] for k in c["checks"] if not k["ok"]]
    assert [k["name"] for k in failed] == ["golden"], failed  # no golden files were made for it
    assert result.exit_code == 1 and "Traceback" not in result.output
    played = [s for s in STRATEGIES if s != "equivocation"]  # through the ledger: its own tests
    report = run_redteam(model, inputs, trials=4, honest=8, seed=1, steps=3, strategies=played)
    assert report["honest"]["false_positives"] == 0
    assert all(s["within_ci"] is not False for s in report["strategies"]), report["strategies"]
