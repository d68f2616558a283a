"""Session-wide fixtures: keys and jobs are made once per test session and shared. Also the skip policy
(below): the only skips allowed are those of GPU-marked tests."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from verimesh.jobs.job import Job, new_job
from verimesh.signing.keys import SecretKey, generate_key, write_key_pair

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
MODELS = ("mlp", "rescnn", "transformer")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit and integration tests run with the network cut off: nothing may download. Loopback
    stays open (the mesh tests talk to a coordinator they started on 127.0.0.1)."""
    original = socket.socket.connect

    def loopback_only(self: socket.socket, address: object, *args: object, **kwargs: object) -> None:
        host = address[0] if isinstance(address, tuple) else None
        if self.family != socket.AF_UNIX and host not in ("127.0.0.1", "::1"):
            raise RuntimeError(f"network access attempted in a test: {address!r}")
        original(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture(autouse=True, scope="session")
def _evidence_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Evidence written by verify goes to a store of the test session's own, not the user's."""
    import os

    old = os.environ.get("VERIMESH_EVIDENCE_DIR")
    os.environ["VERIMESH_EVIDENCE_DIR"] = str(tmp_path_factory.mktemp("evidence"))
    yield
    if old is None:
        os.environ.pop("VERIMESH_EVIDENCE_DIR", None)
    else:
        os.environ["VERIMESH_EVIDENCE_DIR"] = old


@dataclass(frozen=True)
class Keys:
    node: SecretKey
    other: SecretKey
    node_file: Path
    node_pub: Path
    other_file: Path
    other_pub: Path


@contextmanager
def one_ray_cluster() -> Iterator[None]:
    """Held while a test runs a Ray cluster: two local clusters starting at once on two cores
    (the suite runs files on two workers) can take past a test's start-up limit, so the tests
    that start one take turns, across worker processes (an exclusive lock on one file)."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / "verimesh-tests-ray.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture()
def ray_turn() -> Iterator[None]:
    """This test starts a Ray cluster: wait for any other test's to be gone (``one_ray_cluster``)."""
    with one_ray_cluster():
        yield


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    node, other = generate_key(), generate_key()
    write_key_pair(d / "node.key", node)
    write_key_pair(d / "other.key", other)
    return Keys(node, other, d / "node.key", d / "node.key.pub", d / "other.key", d / "other.key.pub")


def model_path(name: str) -> Path:
    return FIXTURES / f"{name}.onnx"


def input_path(name: str) -> Path:
    return FIXTURES / f"{name}.input.npy"


@pytest.fixture(scope="session")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    """One spot job per fixture model, default plan (several steps each)."""
    d = tmp_path_factory.mktemp("jobs")
    return {name: new_job(model_path(name), input_path(name), d / f"{name}.json") for name in MODELS}


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def step_evidence(job: Job, bundle: Path, public: object, out: Path, *, step: int | None = None,
                  step_model: bytes | None = None) -> Path:  # fmt: skip
    """Step-mismatch evidence written by hand around a (sealed) bundle, whatever it shows: the
    checker must recompute the claim, so made up over honest work it proves nothing."""
    from verimesh.jobs.bundle import read_bundle, tensor_member
    from verimesh.spot.sealed_evidence import write_sealed_evidence

    parsed = read_bundle(bundle, version=job.version)
    index = len(job.steps) - 1 if step is None else step
    names = [*job.steps[index].inputs, *job.steps[index].outputs]
    members = ["trace.json", *(tensor_member(job.trace_names.index(n)) for n in names)]
    write_sealed_evidence(
        out, kind="step-mismatch", job=job, bundle=parsed, public=public, reason="made up",  # type: ignore[arg-type]
        members=members, step=index, step_models=[(index, step_model or job.read_step_model(index))],
    )  # fmt: skip
    return out


def perturbed(array: np.ndarray, index: int = 0, delta: float = 0.5) -> np.ndarray:
    out = np.array(array, copy=True)
    out.reshape(-1)[index] += np.asarray(delta, dtype=out.dtype)
    return out


# The skip policy. A run of the whole suite on a machine that ran `make install` skips nothing except
# GPU tests, and those only by their markers:
#   @pytest.mark.gpu       needs a GPU: skipped (here) where onnxruntime has no CUDA provider or no NVIDIA
#                          device is present; a skip on a machine that has both is a failure.
#   @pytest.mark.cpu_only  a CPU-only check that means nothing on a GPU machine: it may skip itself where a
#                          CUDA provider or an NVIDIA device is present, and nowhere else.
# Any other skip (pytest.skip, skipif, importorskip, an empty parameter set, a module-level skip, an xfail)
# is turned into a failure that names the test and the skip's reason, and the run exits non-zero.

SKIP_POLICY_HELP = (
    "allowed skips: @pytest.mark.gpu tests where there is no GPU, @pytest.mark.cpu_only tests where there is one; "
    "`make install` provides what every other test needs (skip policy: tests/conftest.py)"
)


def _cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _nvidia_device() -> bool:
    gpus = Path("/proc/driver/nvidia/gpus")
    return any(Path("/dev").glob("nvidia[0-9]*")) or (gpus.is_dir() and any(gpus.iterdir()))


class SkipPolicy:
    """Registered by pytest_configure below; tests/unit/test_skip_policy.py runs it with fixed GPU answers."""

    def __init__(
        self, cuda_provider: Callable[[], bool] = _cuda_provider, nvidia_device: Callable[[], bool] = _nvidia_device
    ) -> None:
        self._probes = (cuda_provider, nvidia_device)
        self._answers: tuple[bool, bool] | None = None
        self.violations: list[tuple[str, str]] = []

    def _machine(self) -> tuple[bool, bool]:
        if self._answers is None:
            self._answers = (self._probes[0](), self._probes[1]())
        return self._answers

    def gpu_usable(self) -> bool:
        return all(self._machine())

    def gpu_present(self) -> bool:
        return any(self._machine())

    def skip_allowed(self, item: pytest.Item) -> bool:
        if item.get_closest_marker("gpu") is not None and not self.gpu_usable():
            return True
        return item.get_closest_marker("cpu_only") is not None and self.gpu_present()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        needs_gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
        if needs_gpu and not self.gpu_usable():
            cuda, device = self._machine()
            parts = (("onnxruntime's CUDA provider", cuda), ("an NVIDIA device", device))
            missing = [what for what, have in parts if not have]
            reason = f"needs a GPU: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing here"
            for item in needs_gpu:
                item.add_marker(pytest.mark.skip(reason=reason))

    @staticmethod
    def _violation(report: pytest.TestReport | pytest.CollectReport, reason: str) -> None:
        report.outcome = "failed"
        report.longrepr = f"skip outside the allow-list: {reason}\n{SKIP_POLICY_HELP}"
        report.skip_policy = reason  # travels with the report under xdist
        if hasattr(report, "wasxfail"):
            del report.wasxfail

    @staticmethod
    def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
        if hasattr(report, "wasxfail"):
            return f"xfail: {report.wasxfail}" if report.wasxfail else "xfail"
        if isinstance(report.longrepr, tuple):
            return str(report.longrepr[2])
        return str(report.longrepr)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item) -> Iterator[None]:
        report: pytest.TestReport = yield
        if report.skipped and not self.skip_allowed(item):
            self._violation(report, self._reason(report))
        return report

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_make_collect_report(self) -> Iterator[None]:
        report: pytest.CollectReport = yield
        if report.skipped:  # a module or class skipped as a whole: no marker can allow that
            self._violation(report, self._reason(report))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if getattr(report, "skip_policy", None):
            self.violations.append((report.nodeid, report.skip_policy))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if getattr(report, "skip_policy", None):
            self.violations.append((report.nodeid, report.skip_policy))

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.violations:
            terminalreporter.section("skips outside the allow-list", sep="=", red=True, bold=True)
            for nodeid, reason in self.violations:
                terminalreporter.line(f"{nodeid}: {reason}")
            terminalreporter.line(SKIP_POLICY_HELP)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipPolicy(), "verimesh-skip-policy")


def control_flow_model() -> Any:
    """A model with an If node (x -> ReduceSum > 0 ? -x : |x| -> Relu): control flow, so one step."""
    from onnx import TensorProto, helper, numpy_helper

    then = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y_then"])],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["y_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [2])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
            helper.make_node("Relu", ["y"], ["z"]),
        ],
        "iffy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model
