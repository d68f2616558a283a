"""The ``verimesh`` command line: parse, call one library function, render.

Exit codes (every command): 0 accepted / success, 1 rejected, 2 usage, 3 invalid or corrupt
input, 4 a backend or dependency missing, 70 an internal error (a bug), 130 interrupted (Ctrl-C),
143 terminated (SIGTERM).
Errors are one line on stderr; ``--json`` prints one JSON object on stdout, on every exit path.
The root group's ``_Boundary`` is the single place where exceptions become exit codes; the
commands live in one module per command group beside this one.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import click

from verimesh import __version__
from verimesh.cli import assurance, bundles, fleet, jobs, keys, ledger, mesh, subtasks, zk
from verimesh.cli.common import EXIT_CODES_HELP
from verimesh.errors import (
    EXIT_BACKEND_MISSING,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    EXIT_USAGE,
    ConfigurationError,
    TerminatedError,
    VerimeshError,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

_ARGS = "verimesh.args"  # ctx.meta key: the root's arguments, to find --json after a failure


@dataclass(frozen=True)
class Failure:
    """What the user is told about an error: one line on stderr and, with --json, one object on stdout."""

    code: str
    message: str
    hint: str | None
    exit_code: int

    def one_line(self) -> str:
        text = f"verimesh: error[{self.code}]: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return " ".join(text.split())

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint, "exit_code": self.exit_code}}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _loaded(module: str, *names: str) -> tuple[type[BaseException], ...]:
    """Exception types of a third-party module, only if something already imported it: an error of
    a module nobody loaded cannot be in flight, and ``import verimesh.cli.app`` stays light."""
    found = sys.modules.get(module)
    types = (getattr(found, name, None) for name in names) if found is not None else ()
    return tuple(t for t in types if isinstance(t, type) and issubclass(t, BaseException))


def _sql_errors() -> tuple[type[BaseException], ...]:
    return _loaded("sqlalchemy.exc", "SQLAlchemyError")


def _ort_errors() -> tuple[type[BaseException], ...]:
    if "onnxruntime" not in sys.modules:
        return ()
    from verimesh.jobs.runtime import _ort_errors as ort_errors

    return ort_errors()


def _numpy_errors() -> tuple[type[BaseException], ...]:
    # numpy's own types; it also raises MemoryError (_ArrayMemoryError), OverflowError and, under
    # np.errstate(all="raise"), FloatingPointError, which are listed in _mapped.
    return _loaded("numpy.exceptions", "AxisError", "DTypePromotionError") + _loaded("numpy.linalg", "LinAlgError")


def _model_errors() -> tuple[type[BaseException], ...]:
    """A model file onnx or protobuf could not read or check."""
    return (
        _loaded("google.protobuf.message", "DecodeError")
        + _loaded("onnx.checker", "ValidationError")
        + _loaded("onnx.shape_inference", "InferenceError")
    )


def _archive_errors() -> tuple[type[BaseException], ...]:
    """A corrupt ZIP (an .npz read by numpy) or deflate stream."""
    return _loaded("zipfile", "BadZipFile", "LargeZipFile") + _loaded("zlib", "error")


def _mapped() -> tuple[type[BaseException], ...]:
    """Every exception type the boundary turns into one line and a documented exit code. Evaluated
    only when an exception reaches the ``except`` clause that names it."""
    return (
        VerimeshError, KeyboardInterrupt, TerminatedError, MemoryError, RecursionError, ImportError, OSError,
        OverflowError, FloatingPointError, *_sql_errors(), *_ort_errors(), *_numpy_errors(), *_model_errors(),
        *_archive_errors(),
    )  # fmt: skip


def _missing_backend(exc: BaseException) -> bool:
    """A database driver or SQLAlchemy dialect that is not installed (mysql://, foo://)."""
    return isinstance(exc, (ImportError, *_loaded("sqlalchemy.exc", "NoSuchModuleError")))


def describe(exc: BaseException) -> Failure:
    """The Failure for an exception of a type in ``_mapped()``."""
    if isinstance(exc, VerimeshError):
        if isinstance(exc, ConfigurationError) and _missing_backend(exc.__cause__ or exc.__context__ or exc):
            # The ledger wraps a missing driver as a configuration error; it is a backend missing.
            return Failure(
                "backend-unavailable",
                exc.message,
                exc.hint or "install its driver, or use a sqlite:/// or postgresql+psycopg:// ledger",
                EXIT_BACKEND_MISSING,
            )
        return Failure(exc.code, exc.message, exc.hint, exc.exit_code)
    if isinstance(exc, TerminatedError):
        return Failure(exc.code, str(exc), exc.hint, exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        hint = "partial output files were removed; run the command again"
        return Failure("interrupted", "interrupted (Ctrl-C)", hint, EXIT_INTERRUPTED)
    if _missing_backend(exc):
        hint = "install it (see README.md), or use a URL or option that does not need it"
        return Failure("backend-unavailable", f"not installed: {_first_line(exc)}", hint, EXIT_BACKEND_MISSING)
    if isinstance(exc, _sql_errors()):
        hint = "check the --ledger URL and that the database is a verimesh ledger"
        return Failure("ledger-error", f"the ledger database failed: {_first_line(exc)}", hint, EXIT_INVALID_INPUT)
    if isinstance(exc, MemoryError):
        return Failure("out-of-memory", "out of memory", "the input is too large for this machine", EXIT_INVALID_INPUT)
    if isinstance(exc, RecursionError):
        hint = "this file was not written by verimesh"
        return Failure("too-deeply-nested", "an input nests too deeply to process", hint, EXIT_INVALID_INPUT)
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return Failure("io-error", f"{exc.strerror or _first_line(exc)}{where}", None, EXIT_INVALID_INPUT)
    if isinstance(exc, _ort_errors()):
        hint = "the model or its input is not one onnxruntime can run"
        return Failure("step-failed", f"onnxruntime: {_first_line(exc)}", hint, EXIT_INVALID_INPUT)
    if isinstance(exc, _model_errors()):
        hint = "the file is not a valid ONNX model"
        return Failure("invalid-model", f"{type(exc).__name__}: {_first_line(exc)}", hint, EXIT_INVALID_INPUT)
    if isinstance(exc, _archive_errors()):
        hint = "the file is truncated or corrupt"
        return Failure("corrupt-archive", f"{type(exc).__name__}: {_first_line(exc)}", hint, EXIT_INVALID_INPUT)
    # numpy's errors, OverflowError, FloatingPointError: a value in the input out of range.
    return Failure("numeric-error", f"{type(exc).__name__}: {_first_line(exc)}", None, EXIT_INVALID_INPUT)


# -- signals and stdout ---------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Raised in the main thread between bytecodes: the run unwinds through every
    # ``except BaseException: writer.abort()`` on the way, removing partial files.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not cut the cleanup
    raise TerminatedError(signum)


@contextmanager
def _signals_unwind() -> Iterator[None]:
    """For the command's run: SIGINT raises KeyboardInterrupt and SIGTERM raises TerminatedError.
    Outside it (click's own parsing, interpreter exit) there is nothing to clean up, and ``main``
    leaves both signals at their defaults. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)


def _ignore_signals() -> None:
    """While an interrupted run reports and exits: a second Ctrl-C must not become click's 'Aborted!'."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _discard_stdout(fd: int) -> None:
    """Point ``fd`` at /dev/null, as the Python docs advise for a closed pipe (signal module, SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class _PipeSafeStdout(io.RawIOBase):
    """The stdout file descriptor; once the reader is gone (``verimesh ledger show | head -1``),
    writes go to /dev/null instead of raising, so the command finishes with its own exit code."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data)
        try:
            return os.write(self._fd, view)
        except BrokenPipeError:
            _discard_stdout(self._fd)
            return view.nbytes


@contextmanager
def _closed_pipe_is_not_an_error() -> Iterator[None]:
    original = sys.__stdout__
    fd = -1
    if original is not None and sys.stdout is original:
        try:
            fd = original.fileno()
        except (OSError, ValueError):  # not a real file (click's test runner, a closed stream)
            fd = -1
    if original is None or fd < 0:
        yield
        return
    original.flush()
    safe = io.TextIOWrapper(
        io.BufferedWriter(_PipeSafeStdout(fd)), encoding=original.encoding, errors=original.errors,
        line_buffering=original.line_buffering,
    )  # fmt: skip
    sys.stdout = safe
    try:
        yield
    finally:
        safe.flush()
        sys.stdout = original


# -- the boundary ---------------------------------------------------------------------------------


class _Boundary(click.Group):
    """Turns every error into one line on stderr (and, with --json, one object on stdout) and the
    documented exit code. Nothing else in verimesh maps exceptions to exit codes."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGS] = list(args)
        return super().parse_args(ctx, args)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # Around click's own output too (--help, usage errors), not only the command's.
        with _closed_pipe_is_not_an_error():
            return super().main(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _signals_unwind():
            try:
                return super().invoke(ctx)
            except click.exceptions.Exit:
                raise
            except click.UsageError as exc:
                if self._wants_json(ctx):
                    hint = f"see '{exc.ctx.command_path} --help'" if exc.ctx else None
                    self._print_json(Failure("usage-error", exc.format_message(), hint, EXIT_USAGE))
                raise  # click prints the usage line and the error, exit 2
            except click.ClickException as exc:  # FileError and the like: exit 1 is for rejects only
                code = EXIT_INVALID_INPUT if isinstance(exc, click.FileError) else EXIT_USAGE
                self._fail(ctx, Failure("usage-error", exc.format_message(), None, code))
            except click.exceptions.Abort as exc:  # a prompt ended by Ctrl-C or end of input
                if isinstance(exc.__context__, KeyboardInterrupt):
                    _ignore_signals()
                    self._fail(ctx, describe(exc.__context__))
                self._fail(ctx, Failure("aborted", "input ended at a prompt", "run it on a terminal", EXIT_USAGE))
            except BrokenPipeError:  # written past the wrapper (a stream kept from before the run)
                _discard_stdout(1)
                ctx.exit(EXIT_OK)
            except _mapped() as exc:
                if isinstance(exc, (KeyboardInterrupt, TerminatedError)):
                    _ignore_signals()
                self._fail(ctx, describe(exc))
            except Exception as exc:  # noqa: BLE001 - the one place: a bug must never exit 1 (read as a reject)
                hint = "this is a bug in verimesh: please report it with the command that ran"
                self._fail(
                    ctx, Failure("internal-error", f"{type(exc).__name__}: {_first_line(exc)}", hint, EXIT_INTERNAL)
                )

    def _fail(self, ctx: click.Context, failure: Failure) -> NoReturn:
        click.echo(failure.one_line(), err=True)
        if self._wants_json(ctx):
            self._print_json(failure)
        ctx.exit(failure.exit_code)

    @staticmethod
    def _print_json(failure: Failure) -> None:
        click.echo(json.dumps(failure.to_json(), indent=2, sort_keys=True))

    def _wants_json(self, ctx: click.Context) -> bool:
        """Whether the invoked command has its ``--json`` flag (print JSON on stdout) set. Read from
        the arguments, so that it is known also when the command's own parsing failed."""
        tokens: list[str] = ctx.meta.get(_ARGS, [])
        if "--" in tokens:
            tokens = tokens[: tokens.index("--")]
        if "--json" not in tokens:
            return False
        command: click.Command = self
        for token in tokens:
            if not isinstance(command, click.Group):
                break
            command = command.get_command(ctx, token) or command
        # regress and redteam take --json PATH (a report file): that is not JSON on stdout.
        return any(isinstance(p, click.Option) and p.is_flag and "--json" in p.opts for p in command.params)


@click.group(cls=_Boundary, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="verimesh")
@click.option("--verbose", is_flag=True, help="Show onnxruntime's own log output.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Verify untrusted ONNX model execution: spot-check and zero-knowledge proofs, a reputation ledger."""
    ctx.obj = {"verbose": verbose}


for command in (
    keys.keys, jobs.plan, jobs.job, jobs.prove, jobs.verify, fleet.verify_many, bundles.outputs, bundles.bundle,
    jobs.evidence, fleet.simulate,
    assurance.bench, assurance.calibrate,
    assurance.redteam, assurance.regress, zk.srs, zk.circuit, ledger.ledger, mesh.serve, mesh.node, mesh.submit,
    mesh.status,
):  # fmt: skip
    cli.add_command(command)
jobs.job.add_command(subtasks.job_split)
cli.add_command(subtasks.receipt)


def main() -> None:
    if threading.current_thread() is threading.main_thread():
        # Until a command runs there is nothing to clean up: Ctrl-C and SIGTERM end the process as
        # they end any program (a shell reports 130 and 143). During the run, _signals_unwind turns
        # them into exceptions that remove partial files on the way out.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    cli(prog_name="verimesh")
