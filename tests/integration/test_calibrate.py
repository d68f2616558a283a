"""Calibration: per-step tolerances that accept every honest variation and reject every cheat,
pinned in a job; refused where honest and cheating runs overlap or the plan differs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import MODELS, Keys, input_path, model_path
from tests.integration.test_tamper import recompute_from, seal
from verimesh.assurance.calibrate import CHEATS, calibrate, cheat_step, write_profile
from verimesh.cli.app import cli
from verimesh.errors import InvalidInputError
from verimesh.jobs.job import Job, new_job
from verimesh.jobs.runtime import OPT_LEVELS, StepRunner
from verimesh.spot.spotcheck import run_steps
from verimesh.workflows import verify


def _inputs(name: str) -> dict[str, np.ndarray]:
    return {"input": np.load(input_path(name))}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    d = tmp_path_factory.mktemp("calibrated")
    jobs = {}
    for name in MODELS:
        profile = calibrate(model_path(name), _inputs(name))
        assert all(s.margin > 10 for s in profile.steps), [(s.index, s.margin) for s in profile.steps]
        write_profile(profile, d / f"{name}.tol.json")
        jobs[name] = new_job(model_path(name), input_path(name), d / f"{name}.json", profile=d / f"{name}.tol.json")
        assert len(jobs[name].policy.step_tolerances) == len(jobs[name].steps)
    return jobs


@pytest.mark.parametrize("model", MODELS)
def test_every_honest_variation_is_accepted(model: str, calibrated: dict[str, Job], keys: Keys, tmp_path: Path) -> None:
    job = calibrated[model]
    for level in OPT_LEVELS:
        for threads in (1, 2):
            runner = StepRunner(device="cpu", optimization=level, threads=threads)
            trace = run_steps(job, None, job.read_input(), runner)
            bundle = seal(job, trace, keys.node, tmp_path / f"{level}-{threads}.vmb")
            verdict = verify(bundle, job=job, node_key=keys.node_pub, samples="all")
            assert verdict.status == "accept", (level, threads, verdict.reason)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("cheat", sorted(CHEATS))
def test_every_cheat_is_rejected(
    model: str, cheat: str, calibrated: dict[str, Job], keys: Keys, tmp_path: Path
) -> None:
    job = calibrated[model]
    runner = StepRunner(device="cpu", optimization=job.policy.optimization)
    trace = job.read_input()
    cheated_any = False
    for step in job.steps:  # the cheat runs every step with altered weights, each from its own inputs
        blob = cheat_step(job.read_step_model(step.index), cheat)
        cheated_any |= blob is not None
        model_bytes = blob if blob is not None else job.read_step_model(step.index)
        key = f"{cheat}-{step.index}" if blob is not None else step.digest
        trace.update(runner.run(key, model_bytes, {n: trace[n] for n in step.inputs}, step.outputs))
    assert cheated_any
    bundle = seal(job, trace, keys.node, tmp_path / "cheat.vmb")
    verdict = verify(bundle, job=job, node_key=keys.node_pub, samples="all")
    assert verdict.status == "reject" and verdict.reason.startswith("recheck-step-"), verdict.reason


def test_overlap_is_refused_naming_the_step() -> None:
    with pytest.raises(InvalidInputError, match=r"step \d+: honest maximum"):
        calibrate(model_path("rescnn"), _inputs("rescnn"), headroom=1e9)


def test_profile_must_match_model_and_plan(calibrated: dict[str, Job], tmp_path: Path) -> None:
    profile = calibrated["rescnn"].base_dir / "rescnn.tol.json"
    with pytest.raises(InvalidInputError, match="another step plan"):
        new_job(model_path("rescnn"), input_path("rescnn"), tmp_path / "a.json", steps=3, profile=profile)
    with pytest.raises(InvalidInputError, match="another model"):
        new_job(model_path("mlp"), input_path("mlp"), tmp_path / "b.json", profile=profile)
    with pytest.raises(InvalidInputError, match="precision"):
        new_job(model_path("rescnn"), input_path("rescnn"), tmp_path / "c.json", precision="tf32", profile=profile)


def test_an_intermediate_cheat_under_the_default_tolerance_edge(
    calibrated: dict[str, Job], keys: Keys, tmp_path: Path
) -> None:
    """A perturbation below the precision-class default (1e-4) but far above honest noise is caught
    by the calibrated profile."""
    job = calibrated["rescnn"]
    trace = run_steps(job, None, job.read_input(), StepRunner(device="cpu"))
    name = job.steps[2].outputs[0]
    trace[name] = (trace[name] * np.float32(1 + 2e-5)).astype(np.float32)
    trace = recompute_from(job, trace, 3)
    verdict = verify(seal(job, trace, keys.node, tmp_path / "r.vmb"), job=job, node_key=keys.node_pub, samples="all")
    assert verdict.status == "reject" and verdict.reason.startswith("recheck-step-2"), verdict.reason


def test_cli_calibrate(tmp_path: Path) -> None:
    out = tmp_path / "tol.json"
    args = ["calibrate", str(model_path("mlp")), "--input", str(input_path("mlp")), "-o", str(out), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["type"] == "verimesh/tolerance-profile" and len(doc["steps"]) == 5
    assert json.loads(out.read_text()) == doc
    # rescnn has non-zero honest noise, so an absurd headroom must overlap the cheats (the MLP's is 0).
    rescnn = ["calibrate", str(model_path("rescnn")), "--input", str(input_path("rescnn"))]
    bad = CliRunner().invoke(cli, [*rescnn, "-o", str(tmp_path / "x.json"), "--headroom", "1e12"])
    assert bad.exit_code == 3 and "honest maximum" in bad.stderr
