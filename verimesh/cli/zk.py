"""Zero-knowledge mode: ``srs`` and ``circuit``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from verimesh.cli.common import (
    EXIT_CODES_HELP,
    emit,
    force_option,
    init_runtime,
    input_option,
    json_option,
    plural,
    write_report,
)
from verimesh.errors import InvalidInputError


@click.group(epilog=EXIT_CODES_HELP)
def srs() -> None:
    """Structured reference strings for zk mode (never downloaded)."""


@srs.command("new", epilog=EXIT_CODES_HELP)
@click.option("--logrows", type=click.IntRange(1, 26), required=True, help="2^LOGROWS rows: serves circuits up to it.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@force_option
@json_option
def srs_new(logrows: int, out: Path, force: bool, as_json: bool) -> None:
    """Generate a local KZG SRS with fresh randomness: for tests and demos only."""
    from verimesh.zk.ezkl_backend import new_srs

    if out.exists() and not force:
        raise InvalidInputError(f"{out} already exists", hint="pass --force to overwrite it")
    click.echo(
        "verimesh: warning: a locally generated SRS is for testing only: whoever generated it can forge proofs. "
        "Use a ceremony SRS (--srs) in production.",
        err=True,
    )
    digest = new_srs(out, logrows)
    emit(as_json, {"srs": str(out), "logrows": logrows, "digest": digest}, f"wrote {out} (2^{logrows} rows, {digest})")


@click.group(epilog=EXIT_CODES_HELP)
def circuit() -> None:
    """ezkl circuits: build once (job owner), pin in zk jobs."""


@circuit.command("build", epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_option(required=True, help="Calibration input (.npy, .npz or .json).")
@click.option("--srs", "srs_file", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Steps chained by Poseidon-hashed boundaries.",
)
@click.option("--target", type=click.Choice(["resources", "accuracy"]), default="resources", show_default=True)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0, min_open=True),
    default=0.05,
    show_default=True,
    help="Largest relative error of ezkl's output against onnxruntime's.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Circuit folder (default: circuits/MODEL-NAME).",
)
@force_option
@json_option
@click.pass_context
def circuit_build(ctx: click.Context, model: Path, input_file: Path, srs_file: Path, steps: int, target: str,
                  tolerance: float, out: Path | None, force: bool, as_json: bool) -> None:  # fmt: skip
    """Calibrate, compile and set up MODEL; refuse it if ezkl's output drifts from onnxruntime's."""
    from verimesh.core.tensors import load_input_file
    from verimesh.jobs.plan import load_model, model_io
    from verimesh.zk.ezkl_backend import build_circuit

    init_runtime(ctx)
    folder = out or Path("circuits") / model.stem
    if folder.exists() and any(folder.iterdir()) and not force:
        raise InvalidInputError(f"{folder} already holds files", hint="pass --force to build over it")
    tensors = load_input_file(input_file, model_io(load_model(model)[0])[0])
    say = (lambda m: click.echo(f"  {m}", err=True)) if not as_json and sys.stderr.isatty() else None
    built = build_circuit(model, tensors, srs=srs_file, out=folder, steps=steps, target=target,
                          tolerance=tolerance, progress=say)  # fmt: skip
    payload = {
        "circuit": str(folder),
        "digest": built.digest,
        "steps": len(built.steps),
        "onboarding": built.onboarding,
    }
    emit(as_json, payload, f"{built.digest}\nwrote {folder}/ ({plural(len(built.steps), 'step')}); onboarding "
          f"{json.dumps(built.onboarding['outputs'])}")  # fmt: skip


@circuit.command("show", epilog=EXIT_CODES_HELP)
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@json_option
def circuit_show(folder: Path, as_json: bool) -> None:
    """Logrows, scales, visibility, digests and estimated proving cost of a circuit."""
    from verimesh.jobs.circuit import load_circuit

    c = load_circuit(folder)
    c.check_files()
    doc = {**c.to_json(), "digest": c.digest}
    for step, row in zip(c.steps, doc["steps"], strict=True):
        # docs/design.md §5: the proving key grows with 2^logrows (about 4.2 KB per row), not with parameters.
        row["estimated_pk_mb"] = round(4.2e3 * 2**step.logrows / 1e6, 1)
    if as_json:
        emit(True, doc, "")
        return
    click.echo(
        f"circuit {c.name}  {c.digest}\n  model {c.model_digest}\n"
        f"  SRS {c.srs_path} (2^{c.srs_logrows}, {c.srs_digest})"
    )
    for step, row in zip(c.steps, doc["steps"], strict=True):
        click.echo(f"  step {step.index}: logrows {step.logrows}, scales in {list(step.input_scales)} out "
                   f"{list(step.output_scales)}, input {step.input_visibility}, output {step.output_visibility}, "
                   f"params fixed, vk {step.vk_digest[:19]}…, est. pk {row['estimated_pk_mb']} MB")  # fmt: skip
    click.echo(f"  onboarding: {json.dumps(c.onboarding)}")


@circuit.command("bench", epilog=EXIT_CODES_HELP)
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--srs", "srs_file", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write results as JSON.")
@click.pass_context
def circuit_bench(ctx: click.Context, models: tuple[Path, ...], srs_file: Path, steps: int, repeats: int,
                  json_out: Path | None) -> None:  # fmt: skip
    """Setup, cold and warm proof (verimesh vs bare ezkl), verify, pk and proof size, peak RSS."""
    from verimesh.assurance.bench import bench_zk, zk_table

    init_runtime(ctx)
    rows = []
    for model in models:
        # Minutes per model: say what runs, on a terminal or in a CI log alike.
        click.echo(f"circuit bench: {model.name}: build, setup, {repeats} warm proofs, verification", err=True)
        rows.append(bench_zk(model, srs=srs_file, steps=steps, repeats=repeats))
        click.echo(f"circuit bench: {model.name}: done", err=True)
    click.echo("\n".join(zk_table(rows)))
    if json_out:
        write_report(json_out, json.dumps(rows, indent=2) + "\n")
