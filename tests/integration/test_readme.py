"""The README's commands run as shown, in order, on a fresh folder (slow: it proves a zk job too).

Every ```bash block is run line by line (a trailing backslash continues a line) and every
```python block as a script, in the order they appear, in one scratch folder holding a copy of
fixtures/. A command's expected exit status is 0 unless its comment says `exit N`. The only
lines not run are listed in NOT_RUN, each with the reason and the place that does run it; the
test fails if one of them is no longer in the README (so the list cannot rot)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

NOT_RUN = {
    "make demo": "CI runs it (the before-stop check and a clean clone)",
    "make test": "this is the test suite itself",
    "make bench": "the full benchmark builds 100 MB models and takes half an hour",
    "verimesh bench --quick": "tests/integration/test_cli.py runs the bench sections on the fixtures",
    "verimesh bench fixtures/rescnn.onnx": "tests/integration/test_cli.py runs the spot section",
    "verimesh regress fixtures/suite.toml --profile quick": ".ci/run runs exactly this after the tests",
    "verimesh simulate --nodes 2000 --jobs 20000": "500 real jobs: tests/integration/test_simulate.py "
    "runs exactly this (README_RUN), with --json and --plot",
    "verimesh circuit bench": "a minute of proving (setup, cold and warm proofs, bare ezkl); run by hand for "
    "docs/benchmarks.md (not covered by a test)",
}


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block of the README, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def commands(body: str) -> list[str]:
    joined = body.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def expected_exit(line: str) -> int:
    found = re.search(r"#.*\bexit (\d+)", line)
    return int(found.group(1)) if found else 0


@pytest.mark.usefixtures("ray_turn")  # two of its commands start a Ray cluster
def test_readme_runs_in_order(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    for prefix in NOT_RUN:
        assert any(line.startswith(prefix) for _, b in blocks(text) for line in commands(b)), (
            f"NOT_RUN names {prefix!r}, which the README no longer shows"
        )
    shutil.copytree(ROOT / "fixtures", tmp_path / "fixtures")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "VERIMESH_CACHE": str(tmp_path / "cache"),
        "VERIMESH_EVIDENCE_DIR": str(tmp_path / "evidence"),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("VERIMESH_LEDGER", None)
    ran = 0
    for language, body in blocks(text):
        if language == "python":
            script = tmp_path / "snippet.py"
            script.write_text(body)
            for _ in range(2):  # a snippet must also run a second time (files it writes exist then)
                proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                                      text=True, timeout=300, check=False)  # fmt: skip
                assert proc.returncode == 0, f"README python block failed:\n{body}\n{proc.stderr[-3000:]}"
            ran += 1
            continue
        if language != "bash":
            continue
        for line in commands(body):
            if any(line.startswith(prefix) for prefix in NOT_RUN):
                continue
            command = line.split(" #")[0] if " #" in line else line
            proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600, check=False)  # fmt: skip
            want = expected_exit(line)
            assert proc.returncode == want, (
                f"README command exited {proc.returncode}, not {want}: {command}\n{proc.stderr[-3000:]}"
            )
            assert "Traceback" not in proc.stderr, command
            ran += 1
    assert ran > 30
