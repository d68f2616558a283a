"""What every command shares: the exit-code help, options defined once, rendering helpers.

Commands only parse, call one library function and render; errors become exit codes in one
place, the root group's boundary (``verimesh.cli.app``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from verimesh.errors import InvalidInputError

if TYPE_CHECKING:
    from verimesh.signing.keys import SecretKey

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = """\b
Exit codes:
  0  accepted / success
  1  rejected (verification failed, or evidence does not prove fraud)
  2  usage error
  3  invalid or corrupt input (missing file, bad shape/dtype, NaN, corrupt bundle, digest mismatch)
  4  backend or dependency missing (e.g. --device cuda without onnxruntime-gpu)
  70  internal error: a bug in verimesh (please report it)
  130  interrupted (Ctrl-C); partial output files are removed
  143  terminated (SIGTERM); partial output files are removed
Errors are one line on stderr; with --json, also one {"error": ...} object on stdout.
"""


def plural(count: int, noun: str) -> str:
    """``1 step``, ``2 steps``: a count and its noun (nouns here take an s)."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def input_option(*, required: bool, help: str) -> Callable[[F], F]:
    """The model-input option shared by plan, job new and circuit build (.npy, .npz or .json)."""

    def decorate(f: F) -> F:
        return click.option(
            "--input", "input_file", type=click.Path(dir_okay=False, path_type=Path), required=required, help=help
        )(f)

    return decorate


def srs_option(f: F) -> F:
    return click.option(
        "--srs", type=click.Path(dir_okay=False, path_type=Path),
        help="zk mode: the SRS file, if not where the circuit recorded it (its digest must match).",
    )(f)  # fmt: skip


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(f)


def force_option(f: F) -> F:
    return click.option("--force", is_flag=True, help="Overwrite existing output files.")(f)


def write_report(path: Path, data: str | bytes) -> None:
    """Write a report file (JSON, JUnit, markdown), making its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)


def emit(as_json: bool, payload: dict[str, Any], human: str) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=True) if as_json else human)


def note(line: str) -> None:
    """Something a user should know that is not an error: one line on stderr."""
    click.echo(f"verimesh: note: {line}", err=True)


def ask_passphrase(*, confirm: bool) -> str:
    env = os.environ.get("VERIMESH_PASSPHRASE")
    if env:
        return env
    if not sys.stdin.isatty():
        raise InvalidInputError(
            "a passphrase is needed and there is no terminal to ask on",
            code="passphrase-required",
            hint="set VERIMESH_PASSPHRASE",
        )
    value: str = click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    return value


def load_signing_key(path: Path) -> SecretKey:
    """A secret key file, asking for its passphrase (VERIMESH_PASSPHRASE or a prompt) when encrypted."""
    from verimesh.signing.keys import key_is_encrypted, load_secret_key

    passphrase = ask_passphrase(confirm=False) if key_is_encrypted(path) else None
    return load_secret_key(path, passphrase=passphrase)


def progress_bar(label: str, enabled: bool) -> Any:
    """A rich progress bar on stderr when it is a terminal, else a no-op callback."""
    if not enabled or not sys.stderr.isatty():
        return None, lambda done, total: None
    from rich.console import Console
    from rich.progress import Progress

    progress = Progress(console=Console(stderr=True), transient=True)
    task = progress.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


def init_runtime(ctx: click.Context) -> None:
    from verimesh.jobs import runtime

    runtime.set_verbose(bool(ctx.obj and ctx.obj.get("verbose")))


def steps_option(f: F) -> F:
    return click.option(
        "--steps", type=click.IntRange(min=1), default=None, help="Number of steps (default: automatic)."
    )(f)


class SamplesType(click.ParamType):  # type: ignore[type-arg]
    name = "K|all"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int) or value == "all":
            return value
        try:
            k = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'all'", param, ctx)
        if k < 0:
            self.fail("must be 0 or more", param, ctx)
        return k


def ledger_option(f: F) -> F:
    return click.option(
        "--ledger", "ledger_url", envvar="VERIMESH_LEDGER", required=True,
        help="SQLAlchemy URL (sqlite:///mesh.db, postgresql://...) or a SQLite file path; env VERIMESH_LEDGER.",
    )(f)  # fmt: skip
