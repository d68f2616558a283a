"""The red team in CI (small, seeded trial counts): no honest run rejected, every deterministic
cheat always caught, sampling-dependent cheats within their 95% interval of the exact prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import MODELS, input_path, model_path
from verimesh.assurance.redteam import miss_probability, run_redteam, wilson
from verimesh.cli.app import cli

ALWAYS = {"perturb-final", "weights-fp16", "weights-bf16", "substituted-model", "wrong-input", "replay",
          "forged-commitment", "equivocation", "tf32-emulated"}  # fmt: skip


def test_miss_probability_is_exact_for_small_cases() -> None:
    assert miss_probability([1, 1, 1], frozenset({0}), 1) == pytest.approx(0.5)
    assert miss_probability([1, 1, 1], frozenset({0}), 2) == 0.0
    assert miss_probability([1, 1, 1], frozenset({2}), 0) == 0.0  # the last step is always checked
    assert miss_probability([3, 1, 1], frozenset({0}), 1) == pytest.approx(0.25)
    # Two draws without replacement from weights 2, 1, 1 among the non-last steps, cheat on step 1:
    # miss = P(first draw 0) P(second draw 2 | 0 gone) + P(first 2) P(second 0 | 2 gone) = 1/2*1/2 + 1/4*2/3
    assert miss_probability([2, 1, 1, 5], frozenset({1}), 2) == pytest.approx(0.25 + 1 / 6)
    low, high = wilson(0, 1000)
    assert low == 0.0 and high < 0.004


@pytest.mark.parametrize("model", MODELS)
def test_redteam_on_fixture(model: str) -> None:
    report = run_redteam(model_path(model), input_path(model), trials=12, honest=64, seed=7)
    assert report["honest"]["false_positives"] == 0
    for s in report["strategies"]:
        assert s["within_ci"], s
        if s["strategy"] in ALWAYS:
            assert s["detected"] == s["trials"], s
    lazy = next(s for s in report["strategies"] if s["strategy"] == "lazy")
    assert 0 < lazy["predicted"] <= 1 and lazy["min_stake"] >= 0


def test_cli_redteam_writes_report_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "rt.json"
    args = ["redteam", str(model_path("mlp")), "--trials", "6", "--honest", "16", "--json", str(out),
            "--markdown", str(tmp_path / "rt.md"), "--plot", str(tmp_path / "rt.png")]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["reports"][0]["honest"]["verifications"] == 16
    assert (tmp_path / "rt.png").read_bytes()[:4] == b"\x89PNG"
    assert "| equivocation | 6/6 |" in (tmp_path / "rt.md").read_text()
