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
          "forged-commitment", "equivocation", "tf32-emulated", "unsealed-bytes"}  # fmt: skip


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
        if s["inapplicable"] == 12:  # e.g. launder-special: no infinity or divided zero on the model
            assert s["trials"] == 0 and s["within_ci"] is None, s
            continue
        assert s["within_ci"], s
        assert s["wrong_accepted"] == 0 or s["strategy"] in ("launder-chain", "lazy"), s
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


def test_laundering_strategies_on_a_model_that_invites_them(tmp_path: Path) -> None:
    """Infinities at a boundary (Log of zeros), values near a decision (Greater) and a cancelling
    chain: each laundering strategy applies, and is caught at the rate the verifier's own checks
    predict; with every step checked, none leaves a wrong result accepted."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Log", ["x"], ["z"]),
        helper.make_node("Exp", ["z"], ["e"]),
        helper.make_node("MatMul", ["e", "w"], ["h"]),
        helper.make_node("Sub", ["h", "c"], ["d"]),
        helper.make_node("Mul", ["d", "k"], ["m"]),
        helper.make_node("Greater", ["m", "zero"], ["g"]),
        helper.make_node("Cast", ["g"], ["gf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["gf", "m"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in
             (("w", np.eye(8)), ("c", np.full(8, 5.0)), ("k", np.full(8, 100.0)), ("zero", np.zeros(8)))]  # fmt: skip
    graph = helper.make_graph(
        nodes, "launder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "l.onnx"))
    x = np.full((1, 8), 5.0 + 1e-3, np.float32)
    x[0, 0] = 0.0  # Log(0) = -inf
    np.save(tmp_path / "l.npy", x)
    strategies = ["launder-special", "launder-threshold", "launder-chain"]
    report = run_redteam(tmp_path / "l.onnx", tmp_path / "l.npy", trials=16, honest=16, seed=5, steps=8,
                         strategies=strategies)  # fmt: skip
    assert report["honest"]["false_positives"] == 0
    by_name = {s["strategy"]: s for s in report["strategies"]}
    assert by_name["launder-special"]["trials"] == 16 and by_name["launder-special"]["detected"] > 0
    for s in by_name.values():
        assert s["within_ci"], s
