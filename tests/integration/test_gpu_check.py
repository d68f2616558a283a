"""`make gpu-check` (.ci/gpu_check.py) runs here with the CPU standing in for the GPU, so that the
script a GPU machine will run is known to work end to end; without --simulate and without a GPU it
writes a report that says nothing was measured and exits 4."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip


def test_simulated_onnxruntime_path_proves_verifies_and_measures(tmp_path: Path) -> None:
    report_file = tmp_path / "gpu.json"
    proc = _run("--simulate", "--mode", "onnxruntime-gpu", "--models", "mlp", "--no-resnet50", "--json",
                str(report_file))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_file.read_text())
    assert report["type"] == "verimesh/gpu-check" and report["simulated"] is True
    assert any("SIMULATED" in n for n in report["notes"])
    (row,) = report["models"]
    for precision in ("fp32-strict", "tf32"):
        got = row["precisions"][precision]
        assert got["prove_cpu"]["exit"] == 0 and got["verify_cpu_of_cpu"]["accepted"] is True
    steps = row["precisions"]["fp32-strict"]["steps"]
    assert [s["step"] for s in row["spread"]["tf32_off"]] == list(range(steps))
    # The CPU standing in: identical runs, so within tolerance and a "TF32" cheat identical to honest.
    assert all(s["within"] and s["rel_frobenius"] == 0.0 for s in row["spread"]["tf32_on"])
    assert row["tf32_under_fp32_strict"]["caught"] is False
    assert row["calibration"]["min_margin"] > 1
    assert "mlp" in proc.stdout


def test_simulated_torch_estimate_reproduces_the_fixtures(tmp_path: Path) -> None:
    report_file = tmp_path / "gpu.json"
    proc = _run("--simulate", "--mode", "torch-estimate", "--models", "mlp", "rescnn", "transformer",
                "--no-resnet50", "--json", str(report_file))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_file.read_text())
    assert report["mode"] == "torch-estimate" and any("ESTIMATE" in n for n in report["notes"])
    assert [r["model"] for r in report["models"]] == ["mlp", "rescnn", "transformer"]
    for row in report["models"]:
        # The rebuilt torch modules are the committed fixtures (not an estimate of something else).
        assert row["torch_cpu_vs_onnxruntime_cpu"]["rel_frobenius"] < 1e-5, row
        assert row["tf32_off"]["within"] and row["tf32_on"]["within"]


@pytest.mark.cpu_only
def test_without_a_gpu_it_says_so_and_exits_4(tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" in ort.get_available_providers() or torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    report_file = tmp_path / "gpu.json"
    proc = _run("--no-resnet50", "--json", str(report_file))
    assert proc.returncode == 4, proc.stderr
    report = json.loads(report_file.read_text())
    assert report["mode"] == "none" and report["models"] == [] and "no GPU" in report["notes"][0]
