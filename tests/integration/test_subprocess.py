"""The installed command in real subprocesses: what a shell user and CI see."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import input_path, model_path


def verimesh(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "verimesh", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_full_loop_in_subprocesses(tmp_path: Path) -> None:
    assert verimesh("keys", "new", "-o", "node.key", cwd=tmp_path).returncode == 0
    assert (
        verimesh(
            "job",
            "new",
            model_path("transformer"),
            "--input",
            input_path("transformer"),
            "-o",
            "job.json",
            cwd=tmp_path,
        ).returncode
        == 0
    )
    proved = verimesh("prove", "job.json", "--key", "node.key", "-o", "r.vmb", "--json", cwd=tmp_path)
    assert proved.returncode == 0, proved.stderr
    assert proved.stderr == ""  # no onnxruntime log noise without --verbose
    verified = verimesh("verify", "r.vmb", "--job", "job.json", "--node-key", "node.key.pub", "--json", cwd=tmp_path)
    assert verified.returncode == 0 and json.loads(verified.stdout)["verdict"] == "accept"
    assert verified.stderr == ""


def test_bad_input_is_one_line_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "junk.vmb").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    for args, code in (
        (("plan", "junk.onnx"), 3),
        (("plan", "missing.onnx"), 3),
        (("keys", "show", "junk.onnx"), 3),
        (("verify", "junk.vmb", "--job", "nope.json", "--node-key", "nope.pub"), 3),
        (("prove",), 2),
    ):
        result = verimesh(*args, cwd=tmp_path)
        assert result.returncode == code, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 4  # usage errors show click's short usage


def test_import_verimesh_stays_light() -> None:
    heavy = "('onnxruntime', 'onnx', 'numpy', 'ezkl', 'torch')"
    code = f"import sys, verimesh; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_help_documents_exit_codes(tmp_path: Path) -> None:
    for args in ((), ("verify",), ("prove",), ("evidence", "check")):
        result = verimesh(*args, "--help", cwd=tmp_path)
        assert (
            result.returncode == 0 and "Exit codes" in result.stdout and "3  invalid or corrupt input" in result.stdout
        )
