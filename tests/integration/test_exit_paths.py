"""Exit paths of the installed command, in real subprocesses: hostile inputs that used to crash the
process (a segfault on deep JSON, MemoryError on a .npy bomb), signals in the middle of a run, a
closed stdout pipe, --json on errors, and a ledger URL whose driver is missing."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Keys, input_path, model_path

DEEP = 100_000


def verimesh(*args: str | Path, cwd: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    options: dict[str, object] = {"capture_output": True, "timeout": 120, "stdin": subprocess.DEVNULL, **kwargs}
    if "stdout" in kwargs:
        options.pop("capture_output")
        options["stderr"] = subprocess.PIPE
    return subprocess.run([sys.executable, "-m", "verimesh", *map(str, args)], cwd=cwd, text=True, **options)  # type: ignore[call-overload, no-any-return]


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *, contains: str = "") -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("verimesh: error["), result.stderr
    assert contains in lines[0], lines[0]


# -- deep nesting ---------------------------------------------------------------------------------


def test_deep_json_job_is_refused_in_one_line(tmp_path: Path, keys: Keys) -> None:
    (tmp_path / "deep.json").write_text("[" * DEEP + "]" * DEEP)
    (tmp_path / "deep-object.json").write_text('{"a":' * DEEP + "1" + "}" * DEEP)
    assert_one_line(verimesh("job", "show", "deep.json", cwd=tmp_path), 3, contains="json-too-deep")
    # prove reads the key first: py_ecc is imported (it raises the recursion limit) before the job is parsed.
    for job in ("deep.json", "deep-object.json"):
        result = verimesh("prove", job, "--key", keys.node_file, "-o", "r.vmb", cwd=tmp_path)
        assert_one_line(result, 3, contains="json-too-deep")
    (tmp_path / "deep.key").write_text("[" * 20_000 + "]" * 20_000)  # key files are at most 64 KiB
    assert_one_line(verimesh("keys", "show", "deep.key", cwd=tmp_path), 3, contains="json-too-deep")


def test_deep_json_input_and_toml_suite_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "deep.json").write_text('{"x": ' + "[" * DEEP + "]" * DEEP + "}")
    assert_one_line(verimesh("plan", model_path("mlp"), "--input", "deep.json", cwd=tmp_path), 3)
    (tmp_path / "deep.toml").write_text("a = " + "[" * DEEP + "]" * DEEP + "\n")
    assert_one_line(verimesh("regress", "deep.toml", cwd=tmp_path), 3, contains="invalid-suite")


def test_importing_the_signing_layer_keeps_the_recursion_limit() -> None:
    code = "import sys; a = sys.getrecursionlimit(); import verimesh.signing.keys; print(a, sys.getrecursionlimit())"
    before, after = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert before == after


# -- size bombs -----------------------------------------------------------------------------------


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (117 - len(header)) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def test_npy_and_npz_bombs_are_refused_before_allocating(tmp_path: Path) -> None:
    bomb = _npy_header("<f4", (10**6, 10**6)) + b"\0" * 64  # 10^12 elements declared
    assert len(bomb) == 192
    (tmp_path / "bomb.npy").write_bytes(bomb)
    result = verimesh("plan", model_path("mlp"), "--input", "bomb.npy", cwd=tmp_path)
    assert_one_line(result, 3, contains="tensor-too-large")
    result = verimesh("job", "new", model_path("mlp"), "--input", "bomb.npy", "-o", "j.json", cwd=tmp_path)
    assert_one_line(result, 3, contains="tensor-too-large")
    # A shape whose product overflows int64.
    (tmp_path / "overflow.npy").write_bytes(_npy_header("<f4", (2**32, 2**32, 2**32)))
    assert_one_line(verimesh("plan", model_path("mlp"), "--input", "overflow.npy", cwd=tmp_path), 3)
    # An .npz whose member declares more than the input limit uncompressed (as a deflate bomb does:
    # the sizes are patched in rather than compressing a gigabyte here).
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", _npy_header("<f4", (2**29 - 64,)) + b"\0" * 256)
    archive_bytes = bytearray(buffer.getvalue())
    declared = (2**31 - 1).to_bytes(4, "little")
    local, central = archive_bytes.index(b"PK\x03\x04"), archive_bytes.index(b"PK\x01\x02")
    archive_bytes[local + 22 : local + 26] = declared
    archive_bytes[central + 24 : central + 28] = declared
    (tmp_path / "bomb.npz").write_bytes(bytes(archive_bytes))
    result = verimesh("plan", model_path("mlp"), "--input", "bomb.npz", cwd=tmp_path)
    assert_one_line(result, 3, contains="npz-too-large")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_an_endless_file_is_read_only_up_to_its_limit(tmp_path: Path) -> None:
    """A device reports size 0: the read itself must be bounded, or it runs until memory is gone."""
    for args in (("job", "show", "/dev/zero"), ("keys", "show", "/dev/zero"), ("regress", "/dev/zero")):
        assert_one_line(verimesh(*args, cwd=tmp_path), 3, contains="limit")


# -- signals --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job of 40 steps taking a few seconds to prove: 1200 MatMul+Tanh sharing one weight (a small file)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from verimesh.jobs.job import new_job

    folder = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng(0)
    width, batch, layers = 512, 256, 1200
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, previous = [], "x"
    for i in range(layers):
        nodes += [
            helper.make_node("MatMul", [previous, "w"], [f"m{i}"]),
            helper.make_node("Tanh", [f"m{i}"], [f"h{i}"]),
        ]
        previous = f"h{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [batch, width])],
        [numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "chain.onnx")
    np.save(folder / "chain.input.npy", rng.standard_normal((batch, width)).astype(np.float32))
    new_job(folder / "chain.onnx", folder / "chain.input.npy", folder / "job.json", steps=40)
    return folder / "job.json"


@pytest.mark.parametrize(
    ("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_signal_mid_prove_exits_with_its_code_and_removes_partial_files(
    signum: int, code: int, word: str, long_job: Path, keys: Keys, tmp_path: Path
) -> None:
    out = tmp_path / "r.vmb"
    partial = tmp_path / "r.vmb.partial"
    proc = subprocess.Popen(
        [sys.executable, "-m", "verimesh", "prove", str(long_job), "--key", str(keys.node_file), "-o", str(out)],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert partial.exists(), "prove finished (or failed) before it was mid-run"
    time.sleep(0.2)  # a few steps in
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, (proc.returncode, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and f"error[{word}]" in lines[0], stderr
    assert not list(tmp_path.glob("*.partial")) and not out.exists()


# -- stdout, --json, backends ---------------------------------------------------------------------


def _closed_pipe_run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader is already gone: every write to it fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return verimesh(*args, cwd=cwd, stdout=write_end)
    finally:
        os.close(write_end)


def test_closed_stdout_pipe_is_not_an_error(tmp_path: Path, keys: Keys) -> None:
    assert (
        verimesh("ledger", "init", "--ledger", "mesh.db", "--operator-key", keys.other_file, cwd=tmp_path).returncode
        == 0
    )
    for args in (("ledger", "show", "--ledger", "mesh.db"), ("ledger", "show", "--ledger", "mesh.db", "--json"),
                 ("keys", "show", keys.node_pub), ("--help",)):  # fmt: skip
        result = _closed_pipe_run(*args, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (0, ""), args


def test_closed_stdout_pipe_keeps_a_reject_a_reject(tmp_path: Path, keys: Keys) -> None:
    """The command still finishes: a verdict of reject exits 1 even when nobody reads its report."""
    assert (
        verimesh(
            "job", "new", model_path("mlp"), "--input", input_path("mlp"), "-o", "job.json", cwd=tmp_path
        ).returncode
        == 0
    )
    assert verimesh("prove", "job.json", "--key", keys.other_file, "-o", "r.vmb", cwd=tmp_path).returncode == 0
    result = _closed_pipe_run("verify", "r.vmb", "--job", "job.json", "--node-key", keys.node_pub, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (1, "")


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (("job", "show", "missing.json", "--json"), 3, "invalid-input"),
        (("keys", "show", "deep.key", "--json"), 3, "json-too-deep"),
        (("plan", "junk.onnx", "--json"), 3, None),
        (("verify", "x.vmb", "--job", "j.json", "--json"), 2, "usage-error"),  # raised inside the command
        (("prove", "--json"), 2, "usage-error"),  # the command's own parsing
        (("verify", "x.vmb", "--bogus", "--json"), 2, "usage-error"),
        (("ledger", "show", "--ledger", "mysql://u@localhost/db", "--json"), 4, "backend-unavailable"),
    ],
)
def test_json_errors_are_one_object_on_stdout(
    args: tuple[str, ...], code: int, error: str | None, tmp_path: Path
) -> None:
    (tmp_path / "deep.key").write_text("[" * 20_000 + "]" * 20_000)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    result = verimesh(*args, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    doc = json.loads(result.stdout)  # exactly one JSON document, nothing else
    assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message", "hint", "exit_code"}
    assert doc["error"]["exit_code"] == code and (error is None or doc["error"]["code"] == error)
    assert "Traceback" not in result.stderr


def test_without_json_nothing_goes_to_stdout_on_error(tmp_path: Path) -> None:
    result = verimesh("job", "show", "missing.json", cwd=tmp_path)
    assert_one_line(result, 3)
    assert result.stdout == ""


@pytest.mark.parametrize("url", ["mysql://u@localhost/db", "nosuchdialect://u@localhost/db"])
def test_ledger_url_without_its_driver_is_backend_missing(url: str, tmp_path: Path) -> None:
    assert_one_line(verimesh("ledger", "show", "--ledger", url, cwd=tmp_path), 4, contains="backend-unavailable")


# -- the boundary's mapping, in process -----------------------------------------------------------


def _raise_ort() -> None:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    raise Fail("[ONNXRuntimeError] : 1 : FAIL : boom")


def _raise_sql() -> None:
    import sqlalchemy.exc

    raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("database is locked"))


def _raise_missing_dialect() -> None:
    import sqlalchemy.exc

    raise sqlalchemy.exc.NoSuchModuleError("Can't load plugin: sqlalchemy.dialects:nosuch")


def _raise_axis() -> None:
    np.zeros(3).sum(axis=4)


def _raise_terminated() -> None:
    from verimesh.errors import TerminatedError

    raise TerminatedError(15)


def _raise_recursion() -> None:
    raise RecursionError("maximum recursion depth exceeded")


def _raise_memory() -> None:
    raise MemoryError()


def _raise_import() -> None:
    raise ModuleNotFoundError("No module named 'psycopg'", name="psycopg")


def _raise_os() -> None:
    raise PermissionError(13, "Permission denied", "/root/secret")


def _raise_interrupt() -> None:
    raise KeyboardInterrupt


def _raise_bad_zip() -> None:
    np.load(io.BytesIO(b"PK\x03\x04" + b"\0" * 64))


def _raise_bug() -> None:
    raise AttributeError("'NoneType' object has no attribute 'steps'")  # what a bug looks like


def _raise_click() -> None:
    import click

    raise click.ClickException("something click-level")


@pytest.mark.parametrize(
    ("raise_it", "code", "error"),
    [
        (_raise_ort, 3, "step-failed"),
        (_raise_sql, 3, "ledger-error"),
        (_raise_missing_dialect, 4, "backend-unavailable"),
        (_raise_import, 4, "backend-unavailable"),
        (_raise_axis, 3, "numeric-error"),
        (_raise_recursion, 3, "too-deeply-nested"),
        (_raise_memory, 3, "out-of-memory"),
        (_raise_os, 3, "io-error"),
        (_raise_interrupt, 130, "interrupted"),
        (_raise_terminated, 143, "terminated"),
        (_raise_click, 2, "usage-error"),
        (_raise_bad_zip, 3, "corrupt-archive"),
        (_raise_bug, 70, "internal-error"),  # a bug: never 1, which scripts read as a reject
    ],
)
def test_the_boundary_maps_backend_errors_to_one_line_and_their_code(raise_it: object, code: int, error: str) -> None:
    """Errors of the backends, of numpy and of the OS, raised inside a command, are mapped at the
    root group's boundary: one line on stderr, the documented code (never 1), one object with --json."""
    import click
    from click.testing import CliRunner

    from verimesh.cli.app import _Boundary

    @click.group(cls=_Boundary)
    def root() -> None:
        pass

    @root.command()
    @click.option("--json", "as_json", is_flag=True)
    def boom(as_json: bool) -> None:
        raise_it()  # type: ignore[operator]

    for args in (["boom"], ["boom", "--json"]):
        result = CliRunner().invoke(root, args)
        assert result.exit_code == code, (result.exit_code, result.output, result.exc_info)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"verimesh: error[{error}]"), result.stderr
        if "--json" in args:
            assert json.loads(result.stdout)["error"]["code"] == error
        else:
            assert result.stdout == ""
