"""`verimesh simulate`: the report's keys and invariants, the real sample against the analytic
model (and a wrong model caught by it), quorum, deadlines, the economics at a low stake, usage
errors, and the same results on Ray actors as in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from verimesh.assurance import simulate as sim
from verimesh.cli.app import cli

SMALL = sim.Workload(
    steps=4, job_samples=1, costs=(1, 1, 1, 1),
    detection={"lazy": (0.3, 0.6, 0.9, 1.0), "perturb": (0.0, 0.5, 0.8, 1.0), "equivocate": (1.0,) * 4},
    verify_cost=(0.25, 0.5, 0.75, 1.0),
)  # fmt: skip


def analytic(config: sim.Config, workload: sim.Workload = SMALL, false_positive: float = 0.0) -> dict[str, Any]:
    return sim.run_analytic(config, workload, false_positive, sim.in_process)[0]


def test_cli_report_holds_every_key_and_the_real_sample_settles_on_a_real_ledger(tmp_path: Path) -> None:
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    result = CliRunner().invoke(cli, ["simulate", "--nodes", "300", "--jobs", "20000", "--audit", "1", "--real", "60",
                                      "--json", str(out), "--plot", str(png), "--seed", "3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for key in ("wrong_accepted_per_million", "honest_slashed", "ejected", "jobs_to_ejection",
                "verification_cost_share", "profit", "analytic_within_real_ci", "real", "speed"):  # fmt: skip
        assert key in report
    assert report["honest_slashed"] == 0 and report["completed"] == 20000
    assert set(report["profit"]) == {"honest", "lazy", "perturb", "equivocate"}
    for entry in report["profit"].values():
        low, high = entry["per_node"]["ci95"] or (entry["per_node"]["mean"],) * 2
        assert low <= entry["per_node"]["mean"] <= high
    # With one sample per job a cheater cheats from its first job; each one caught is ejected.
    assert report["ejected"]["lazy"]["ejected"] == report["ejected"]["lazy"]["nodes"] == 9
    assert report["jobs_to_ejection"]["lazy"]["median"] >= 1
    assert report["profit"]["perturb"]["vs_honest_per_job"] < 0  # at stake 1000 cheating does not pay
    assert 0 < report["verification_cost_share"] < 1
    real = report["real"]
    assert real["jobs"] == 60 and real["ledger_verified"] and real["honest_slashed"] == 0
    assert real["honest"]["rejected"] == 0 and real["honest"]["answers"] > 0
    for kind in ("lazy", "perturb", "equivocate"):
        assert real["strategies"][kind]["trials"] > 0
    assert real["strategies"]["equivocate"]["detected"] == real["strategies"]["equivocate"]["trials"]
    assert report["analytic_within_real_ci"] is True, report["analytic_check"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrong results accepted" in result.output and "honest nodes slashed: 0" in result.output


def test_a_wrong_analytic_model_is_reported_outside_the_real_intervals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check must be able to fail: a model that says a lazy node is never caught is refuted
    by the real verifier, which catches it."""
    build = sim.build_workload

    def blind(*args: Any, **kwargs: Any) -> sim.Workload:
        work = build(*args, **kwargs)
        return replace(work, detection={**work.detection, "lazy": (0.0,) * work.steps})

    monkeypatch.setattr(sim, "build_workload", blind)
    config = sim.Config(nodes=100, jobs=2000, cheaters=(("lazy", 0.1),), audit="1", real=40, seed=5)
    report = sim.run_simulation(config)
    assert report["real"]["strategies"]["lazy"]["detected"] > 0
    assert report["real"]["strategies"]["lazy"]["within_ci"] is False
    assert report["analytic_within_real_ci"] is False
    assert "OUTSIDE" in report["analytic_check"] and "OUTSIDE" in sim.summary(report)


README_RUN = ["simulate", "--nodes", "2000", "--jobs", "20000", "--cheaters", "lazy:3%,perturb:1%,equivocate:0.5%",
              "--audit", "adaptive", "--stake", "1000", "--reward", "1"]  # fmt: skip


@pytest.mark.slow
def test_the_readme_run_puts_500_real_jobs_under_the_adaptive_policy_and_they_agree(tmp_path: Path) -> None:
    """The README's example as shown (test_readme.py leaves it to this test)."""
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    result = CliRunner().invoke(cli, [*README_RUN, "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    real = report["real"]
    assert real["jobs"] == 500 and real["ledger_verified"]
    assert real["honest_slashed"] == 0 and report["honest_slashed"] == 0
    assert all(s["trials"] > 0 for s in real["strategies"].values()), real["strategies"]
    assert report["analytic_within_real_ci"] is True, report["analytic_check"]
    assert [p["audit"] for p in report["sweep"]["fixed"]] == [str(k) for k in range(report["workload"]["steps"])]


def test_quorum_catches_what_a_single_answer_lets_through() -> None:
    base = sim.Config(nodes=200, jobs=5000, cheaters=(("perturb", 0.2),), audit="0", real=0, drop=0.0)
    alone = analytic(base)
    assert alone["wrong_accepted"] > 0 and alone["referees"] == 0  # zero samples: an intermediate cheat passes
    quorum = analytic(replace(base, replicas=3))
    assert quorum["wrong_accepted"] == 0 and quorum["referees"] > 0
    assert quorum["honest_slashed"] == 0  # the referee checks honest answers in full and passes them
    assert quorum["ejected"]["perturb"]["ejected"] == quorum["ejected"]["perturb"]["cheated"]


def test_missed_deadlines_are_reassigned_and_slash_nobody() -> None:
    report = analytic(sim.Config(nodes=50, jobs=3000, cheaters=(), real=0, drop=0.4))
    assert report["reassigned"] > 1000 and report["completed"] == 3000
    assert report["honest_slashed"] == 0 and report["ejected"]["honest"]["ejected"] == 0


def test_a_low_stake_makes_cheating_pay_and_the_report_shows_it() -> None:
    config = sim.Config(nodes=200, jobs=20000, cheaters=(("perturb", 0.1),), audit="0", stake=1, gain=5.0, real=0)
    report = analytic(config)
    assert report["profit"]["perturb"]["vs_honest_per_job"] > 0


def test_an_honest_false_positive_in_the_real_sample_slashes_honest_nodes_in_the_model() -> None:
    report = analytic(sim.Config(nodes=50, jobs=2000, cheaters=(), real=0), false_positive=0.01)
    assert report["honest_slashed"] > 0


def test_the_same_seed_gives_the_same_report_and_every_job_is_counted_once() -> None:
    config = sim.Config(nodes=1000, jobs=30000, real=0, seed=11, shards=5)
    first, second = analytic(config), analytic(config)
    assert first == second
    assert first["completed"] + first["unserved"] == 30000
    assert sum(s.jobs for s in sim.make_shards(config, SMALL, 0.0)) == 30000
    assert sum(len(s.kinds) for s in sim.make_shards(config, SMALL, 0.0)) == 1000


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--cheaters", "lazy:3%,sneaky:1%"], 3, "not STRATEGY:SHARE"),
        (["--cheaters", "lazy:200%"], 3, "between 0 and 100%"),
        (["--cheaters", "lazy:60%,perturb:50%"], 3, "more than 100%"),
        (["--cheaters", "lazy:nan%"], 3, "between 0 and 100%"),
        (["--audit", "sometimes"], 3, "--audit takes"),
        (["--nodes", "2", "--replicas", "3"], 3, "at least as many nodes"),
        (["--model", "m.onnx"], 2, "go together"),
        (["--drop", "1.5"], 3, "--drop"),
        (["--slash-fraction", "two"], 3, "--slash-fraction"),
        (["--nodes", "0"], 2, "--nodes"),
        (["--gain", "1e308"], 3, "--gain"),
        (["--work-cost", "1e306"], 3, "--work-cost"),
        (["--stake", str(10**13)], 3, "--stake"),
    ],
)
def test_bad_options_get_one_line_and_the_documented_exit_code(args: list[str], code: int, words: str) -> None:
    result = CliRunner().invoke(cli, ["simulate", "--real", "0", "--jobs", "10", *args])
    assert result.exit_code == code, result.output
    assert words in result.output and "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.usefixtures("ray_turn")
def test_ray_actors_give_the_same_report_as_this_process(tmp_path: Path) -> None:
    args = ["--nodes", "400", "--jobs", "40000", "--real", "0", "--shards", "4", "--seed", "2"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    reports = []
    for extra, name in (([], "local.json"), (["--ray"], "ray.json")):
        subprocess.run([sys.executable, "-m", "verimesh", "simulate", *args, *extra, "--json", str(tmp_path / name)],
                       check=True, env=env, capture_output=True, timeout=300)  # fmt: skip
        reports.append(json.loads((tmp_path / name).read_text()))
    local, ray = reports
    assert ray["speed"]["runner"].startswith("ray (") and local["speed"]["runner"] == "this process"
    for report in reports:
        report.pop("speed")
    assert local == ray


def test_bench_simulate_reports_simulated_jobs_per_second(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "--quick", "--only", "simulate", "--json", str(out)])
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())["simulate"]
    assert row["jobs"] == 100_000 and row["simulated_jobs_per_s"] > 0 and not row["at_full_scale"]
    assert "simulated jobs/s" in result.output


def test_a_job_goes_on_to_the_nodes_left_when_the_ones_it_tried_are_excluded() -> None:
    """Two lazy nodes and one honest one: however many of a job's nodes are caught and excluded,
    the job is served by the one left (it is never counted unserved while an eligible node is untried)."""
    for seed in range(20):
        config = sim.Config(nodes=3, jobs=50, cheaters=(("lazy", 2 / 3),), audit="0", real=0, drop=0.0, seed=seed)
        report = analytic(config)
        assert report["unserved"] == 0 and report["completed"] == 50, seed
        assert report["ejected"]["lazy"]["ejected"] == report["ejected"]["lazy"]["cheated"]


def _real(jobs: int, honest: tuple[int, int], **strategies: tuple[int, int, float]) -> dict[str, Any]:
    """A real-sample summary: honest (answers, rejected); strategy (trials, detected, analytic)."""
    from verimesh.assurance.redteam import wilson

    out: dict[str, Any] = {"jobs": jobs, "strategies": {}}
    low, high = wilson(honest[1], honest[0])
    out["honest"] = {"answers": honest[0], "rejected": honest[1], "ci95": [low, high], "within_ci": low <= 1e-9}
    for kind, (trials, detected, analytic) in strategies.items():
        low, high = wilson(detected, trials)
        out["strategies"][kind] = {"trials": trials, "detected": detected, "analytic": analytic,
                                   "within_ci": low - 1e-9 <= analytic <= high + 1e-9}  # fmt: skip
    return out


def test_the_comparison_judges_only_what_was_measured_enough() -> None:
    """Review: Wilson's lower bound at 0 of 94 is 3e-18, not 0 (a spurious OUTSIDE naming no one);
    no cheaters, or one trial a strategy, said 'every analytic rate is inside'."""
    words, within = sim._judge(_real(500, (94, 0), lazy=(20, 19, 0.95)))
    assert within is True and "every analytic rate is inside" in words
    words, within = sim._judge(_real(500, (94, 0)))
    assert within is True and "only the honest rate" in words
    words, within = sim._judge(_real(500, (94, 0), lazy=(2, 2, 0.95), perturb=(30, 29, 0.9)))
    assert within is False and "not checked for lazy (2)" in words
    words, within = sim._judge(_real(500, (94, 0), perturb=(30, 5, 0.9)))
    assert within is False and "perturb is OUTSIDE" in words
    words, within = sim._judge(_real(500, (94, 3), perturb=(30, 27, 0.9)))
    assert within is False and "honest (false rejects) is OUTSIDE" in words
    words, within = sim._judge(_real(60, (40, 0), perturb=(30, 27, 0.9)))
    assert within is True and "a sample of 60 jobs" in words
    assert sim._judge(None) == ("not checked: no real sample (--real 0)", None)


def test_a_cheat_the_model_will_not_run_is_refused_up_front_or_played_honestly(monkeypatch: pytest.MonkeyPatch) -> None:
    from verimesh.assurance.redteam import _Cheater
    from verimesh.errors import InvalidInputError, StepExecutionError

    original = _Cheater.lazy
    calls = {"n": 0}

    def fails_after(limit: int) -> Any:
        def lazy(self: Any, fraction: float) -> Any:
            calls["n"] += 1
            if calls["n"] > limit:
                raise StepExecutionError("step 2 does not run on these inputs")
            return original(self, fraction)

        return lazy

    monkeypatch.setattr(_Cheater, "lazy", fails_after(0))
    with pytest.raises(InvalidInputError, match="lazy strategy cannot cheat on this model"):
        sim.run_simulation(sim.Config(nodes=50, jobs=500, cheaters=(("lazy", 0.2),), real=0))
    report = sim.run_simulation(sim.Config(nodes=50, jobs=500, cheaters=(("perturb", 0.2),), real=0))
    assert "lazy" not in report["workload"]["detection"] and report["completed"] == 500
    calls["n"] = 0
    monkeypatch.setattr(_Cheater, "lazy", fails_after(sim.Config().calibration))  # the real sample's cheats fail
    report = sim.run_simulation(sim.Config(nodes=50, jobs=500, cheaters=(("lazy", 0.5),), audit="1", real=20))
    lazy = report["real"]["strategies"]["lazy"]
    assert lazy["inapplicable"] > 0 and lazy["trials"] == 0 and report["real"]["ledger_verified"]
