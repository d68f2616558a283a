"""The layer contract (tools/check_layers.py, run by `make lint`): the package keeps it, and a
planted violation of each kind is caught, however the import is spelled."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
assert spec and spec.loader
check_layers = importlib.util.module_from_spec(spec)
sys.modules["check_layers"] = check_layers
spec.loader.exec_module(check_layers)


def test_the_package_keeps_the_contract() -> None:
    problems = check_layers.check(ROOT / "verimesh")
    assert problems == [], "\n".join(map(str, problems))


def test_every_module_belongs_to_a_layer() -> None:
    for path in (ROOT / "verimesh").rglob("*.py"):
        assert check_layers.layer_of(check_layers.module_name(path, ROOT / "verimesh")) is not None, path


@pytest.mark.parametrize(
    ("target", "planted", "expected"),
    [
        ("core/digest.py", "def f():\n    from verimesh.workflows import verify\n", "higher layer workflows"),
        ("jobs/job.py", "import importlib\nimportlib.import_module('verimesh.cli.app')\n", "higher layer cli"),
        ("jobs/plan.py", "from importlib import import_module\nimport_module('verimesh.' + 'x')\n", "computed"),
        ("ledger/store.py", "def f():\n    from verimesh import settlement\n", "higher layer settlement"),
        ("signing/keys.py", "from ..jobs import job\n", "higher layer jobs"),
        ("spot/evidence.py", "from verimesh.zk import zkmode\n", "sibling layer verimesh.zk"),
        ("spot/spotcheck.py", "def f():\n    import onnxruntime\n", "imports onnxruntime"),
        ("jobs/verdict.py", "__import__('ezkl')\n", "imports ezkl"),
    ],
)
def test_a_planted_violation_fails_the_contract(tmp_path: Path, target: str, planted: str, expected: str) -> None:
    package = tmp_path / "verimesh"
    shutil.copytree(ROOT / "verimesh", package, ignore=shutil.ignore_patterns("__pycache__"))
    victim = package / target
    victim.write_text(victim.read_text() + "\n" + planted)
    problems = [str(p) for p in check_layers.check(package)]
    assert any(expected in p and target in p for p in problems), problems
    # The command `make lint` runs fails on it too.
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "check_layers.py"), str(package)], capture_output=True)
    assert run.returncode == 1 and expected.encode() in run.stdout
