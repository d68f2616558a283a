"""The skip policy of tests/conftest.py: a skip outside the allow-list (gpu and cpu_only markers) fails the run."""

from __future__ import annotations

import pytest

from tests.conftest import SkipPolicy

pytest_plugins = ["pytester"]

MARKERS = """
[pytest]
markers =
    gpu: needs a GPU
    cpu_only: a CPU-only check
"""

CPU_MACHINE = {"cuda_provider": lambda: False, "nvidia_device": lambda: False}
GPU_MACHINE = {"cuda_provider": lambda: True, "nvidia_device": lambda: True}


def run(pytester: pytest.Pytester, source: str, machine: dict[str, object]) -> pytest.RunResult:
    pytester.makeini(MARKERS)
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest("-ra", "-p", "no:cacheprovider", plugins=[SkipPolicy(**machine)])  # type: ignore[arg-type]


def test_a_plain_skip_fails_the_run(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("the binaries are not on PATH")
""",
        CPU_MACHINE,
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*= skips outside the allow-list =*",
            "test_inner.py::test_skips: Skipped: the binaries are not on PATH",
        ]
    )
    assert result.outlines[-1].startswith("=") and "1 failed, 1 passed" in result.outlines[-1]


def test_skipif_importorskip_xfail_and_fixture_skips_fail(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
import sys
import pytest

@pytest.fixture
def server():
    pytest.skip("no server")

@pytest.mark.skipif(sys.version_info > (3,), reason="always")
def test_skipif():
    pass

def test_importorskip():
    pytest.importorskip("no_such_module_here")

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False

def test_fixture(server):
    pass

@pytest.mark.parametrize("x", [])
def test_empty(x):
    pass
""",
        CPU_MACHINE,
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=2, errors=3)  # skipif, a fixture's skip, an empty set: in setup, so errors
    result.stdout.fnmatch_lines_random(
        [
            "test_inner.py::test_skipif: Skipped: always",
            "test_inner.py::test_importorskip: *no_such_module_here*",
            "test_inner.py::test_xfail: xfail: known bug",
            "test_inner.py::test_fixture: Skipped: no server",
            "test_inner.py::test_empty*: Skipped: got empty parameter set*",
        ]
    )


def test_a_module_level_skip_fails_the_run(pytester: pytest.Pytester) -> None:
    result = run(pytester, 'import pytest\npytest.skip("vectors not found", allow_module_level=True)\n', CPU_MACHINE)
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["test_inner.py: Skipped: vectors not found"])


GPU_TESTS = """
import pytest

@pytest.mark.gpu
def test_needs_gpu():
    pass

@pytest.mark.gpu
def test_needs_gpu_and_skips_itself():
    pytest.skip("CUDA provider not installed")

@pytest.mark.cpu_only
def test_cpu_only():
    pytest.skip("this machine has the CUDA provider")
"""


def test_gpu_tests_skip_without_a_gpu(pytester: pytest.Pytester) -> None:
    """Without a GPU, gpu tests are skipped (by their marker, before they can skip themselves) and the run
    passes; a cpu_only test that skips itself there is a failure."""
    result = run(pytester, GPU_TESTS, CPU_MACHINE)
    result.assert_outcomes(skipped=2, failed=1)
    result.stdout.fnmatch_lines_random(
        [
            "SKIPPED [[]1[]] test_inner.py:3: needs a GPU: onnxruntime's CUDA provider and an NVIDIA device are miss*",
            "SKIPPED [[]1[]] test_inner.py:7: needs a GPU: *",
            "test_inner.py::test_cpu_only: Skipped: this machine has the CUDA provider",
        ]
    )
    allowed = run(pytester, GPU_TESTS.split("@pytest.mark.cpu_only")[0], CPU_MACHINE)
    assert allowed.ret == pytest.ExitCode.OK
    allowed.assert_outcomes(skipped=2)


def test_on_a_gpu_machine_only_cpu_only_tests_may_skip(pytester: pytest.Pytester) -> None:
    result = run(pytester, GPU_TESTS, GPU_MACHINE)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, skipped=1, failed=1)
    result.stdout.fnmatch_lines(
        ["test_inner.py::test_needs_gpu_and_skips_itself: Skipped: CUDA provider not installed"]
    )
    assert "test_cpu_only:" not in result.stdout.str()


def test_the_project_registers_the_policy_and_markers(pytestconfig: pytest.Config) -> None:
    assert isinstance(pytestconfig.pluginmanager.get_plugin("verimesh-skip-policy"), SkipPolicy)
    markers = "\n".join(pytestconfig.getini("markers"))
    assert "gpu:" in markers and "cpu_only:" in markers
