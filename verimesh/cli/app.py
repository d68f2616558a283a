"""The ``verimesh`` command line: parse, call one library function, render.

Exit codes (every command): 0 accepted / success, 1 rejected, 2 usage, 3 invalid or corrupt
input, 4 a backend or dependency missing. Errors are one line on stderr; ``--json`` prints one
JSON object on stdout. The root group's ``_Boundary`` is the single place where exceptions
become exit codes; the commands live in one module per command group beside this one.
"""

from __future__ import annotations

from typing import Any

import click

from verimesh import __version__
from verimesh.cli import assurance, jobs, keys, ledger, zk
from verimesh.cli.common import EXIT_CODES_HELP
from verimesh.errors import EXIT_INVALID_INPUT, VerimeshError


class _Boundary(click.Group):
    """Turns verimesh errors (and OS errors on user files) into one line and the documented code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VerimeshError as exc:
            click.echo(f"verimesh: {exc.one_line()}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            click.echo(f"verimesh: error[io-error]: {exc.strerror or exc}{where}", err=True)
            ctx.exit(EXIT_INVALID_INPUT)


@click.group(cls=_Boundary, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="verimesh")
@click.option("--verbose", is_flag=True, help="Show onnxruntime's own log output.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Verify untrusted ONNX model execution: spot-check and zero-knowledge proofs, a reputation ledger."""
    ctx.obj = {"verbose": verbose}


for command in (
    keys.keys, jobs.plan, jobs.job, jobs.prove, jobs.verify, jobs.evidence, assurance.bench, assurance.calibrate,
    assurance.redteam, assurance.regress, zk.srs, zk.circuit, ledger.ledger,
):  # fmt: skip
    cli.add_command(command)


def main() -> None:
    cli(prog_name="verimesh")
