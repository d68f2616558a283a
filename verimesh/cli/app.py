"""The ``verimesh`` command line: parse, call one library function, render.

Exit codes (every command): 0 accepted / success, 1 rejected, 2 usage, 3 invalid or corrupt
input, 4 a backend or dependency missing. Errors are one line on stderr; ``--json`` prints one
JSON object on stdout. This module is the single place where exceptions become exit codes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from verimesh import __version__
from verimesh.errors import EXIT_INVALID_INPUT, EXIT_REJECTED, InvalidInputError, VerimeshError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = """\b
Exit codes:
  0  accepted / success
  1  rejected (verification failed, or evidence does not prove fraud)
  2  usage error
  3  invalid or corrupt input (missing file, bad shape/dtype, NaN, corrupt bundle, digest mismatch)
  4  backend or dependency missing (e.g. --device cuda without onnxruntime-gpu)
"""


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


def _write_report(path: Path, data: str | bytes) -> None:
    """Write a report file (JSON, JUnit, markdown), making its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)


def _emit(as_json: bool, payload: dict[str, Any], human: str) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=True) if as_json else human)


def _passphrase(*, confirm: bool) -> str:
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


def _progress(label: str, enabled: bool) -> Any:
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


@click.group(cls=_Boundary, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="verimesh")
@click.option("--verbose", is_flag=True, help="Show onnxruntime's own log output.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Verify untrusted ONNX model execution: spot-check and zero-knowledge proofs, a reputation ledger."""
    ctx.obj = {"verbose": verbose}


def _init_runtime(ctx: click.Context) -> None:
    from verimesh.jobs import runtime

    runtime.set_verbose(bool(ctx.obj and ctx.obj.get("verbose")))


# --- keys -------------------------------------------------------------------------------------


@cli.group(epilog=EXIT_CODES_HELP)
def keys() -> None:
    """Node identity: BLS12-381 key pairs."""


@keys.command("new", epilog=EXIT_CODES_HELP)
@click.option(
    "-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Secret key file to write."
)
@click.option(
    "--encrypt",
    is_flag=True,
    help="Encrypt the secret (scrypt + AES-256-GCM); passphrase from VERIMESH_PASSPHRASE or a prompt.",
)
@force_option
@json_option
def keys_new(out: Path, encrypt: bool, force: bool, as_json: bool) -> None:
    """Write OUT (secret, mode 0600) and OUT.pub (public key + proof of possession)."""
    from verimesh.signing.keys import generate_key, write_key_pair

    passphrase = _passphrase(confirm=True) if encrypt else None
    key = generate_key()
    pub = write_key_pair(out, key, passphrase=passphrase, overwrite=force)
    payload = {"node_id": key.node_id, "secret_key": str(out), "public_key": str(pub), "encrypted": encrypt}
    _emit(as_json, payload, f"{key.node_id}\nwrote {out} (secret, 0600) and {pub}")


@keys.command("show", epilog=EXIT_CODES_HELP)
@click.argument("key_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--check-pop", is_flag=True, help="Also verify the proof of possession (about 1 s).")
@json_option
def keys_show(key_file: Path, check_pop: bool, as_json: bool) -> None:
    """Show a key file's node id and public key (never the secret)."""
    from verimesh.signing.keys import SUITE, key_is_encrypted, load_public_key

    public = load_public_key(key_file)
    payload: dict[str, Any] = {"node_id": public.node_id, "public_key": public.key.hex(), "suite": SUITE}
    if key_file.suffix != ".pub":
        payload["secret_encrypted"] = key_is_encrypted(key_file)
    if check_pop:
        payload["proof_of_possession_valid"] = public.check_possession()
    lines = [f"node id     {public.node_id}", f"public key  {public.key.hex()}", f"suite       {SUITE}"]
    if check_pop:
        lines.append(f"possession  {'valid' if payload['proof_of_possession_valid'] else 'INVALID'}")
    _emit(as_json, payload, "\n".join(lines))
    if check_pop and not payload["proof_of_possession_valid"]:
        click.get_current_context().exit(EXIT_REJECTED)


# --- plan and jobs ----------------------------------------------------------------------------


def _steps_option(f: F) -> F:
    return click.option(
        "--steps", type=click.IntRange(min=1), default=None, help="Number of steps (default: automatic)."
    )(f)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_steps_option
@input_option(required=False, help="Input file for exact costs.")
@json_option
def plan(model: Path, steps: int | None, input_file: Path | None, as_json: bool) -> None:
    """Show how MODEL would be cut into steps."""
    from verimesh.core.tensors import load_input_file
    from verimesh.jobs.plan import build_step_models, describe_steps, load_model, model_io, plan_model

    onnx_model, data = load_model(model)
    shapes = None
    if input_file is not None:
        tensors = load_input_file(input_file, model_io(onnx_model)[0])
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    planned = build_step_models(onnx_model, data, plan_model(onnx_model, steps=steps, input_shapes=shapes))
    rows = describe_steps(planned)
    payload = {
        "model": str(model),
        "whole_model": planned.plan.whole_model,
        "total_cost": planned.plan.total_cost,
        "steps": rows,
    }
    if as_json:
        _emit(True, payload, "")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model.name}: {len(rows)} step(s), est. {planned.plan.total_cost / 1e6:.3g} MFLOP")
    for col in ("step", "nodes", "est. MFLOP", "boundary tensors", "digest"):
        table.add_column(col)
    for r in rows:
        outs = ", ".join(r["outputs"])
        table.add_row(str(r["index"]), str(r["nodes"]), f"{r['cost'] / 1e6:.3g}", outs[:60], r["digest"][:19] + "…")
    Console(width=160).print(table)


@cli.group(epilog=EXIT_CODES_HELP)
def job() -> None:
    """Create and inspect jobs."""


@job.command("new", epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_option(required=True, help="Input tensors: .npy, .npz or .json.")
@click.option("--mode", type=click.Choice(["spot", "zk"]), default="spot", show_default=True)
@click.option(
    "--tolerance", "tolerance_file", type=click.Path(dir_okay=False, path_type=Path),
    help="Per-step tolerance profile written by `verimesh calibrate` (same --steps).",
)  # fmt: skip
@click.option(
    "--circuit", "circuit_dir", type=click.Path(file_okay=False, path_type=Path),
    help="zk mode: the circuit folder built by `verimesh circuit build`.",
)  # fmt: skip
@_steps_option
@click.option(
    "--samples", type=click.IntRange(min=0), default=1, show_default=True, help="Steps checked beside the last one."
)
@click.option("--precision", type=click.Choice(["fp32-strict", "tf32"]), default="fp32-strict", show_default=True)
@click.option(
    "--optimization",
    type=click.Choice(["disable", "basic", "extended", "all"]),
    default="extended",
    show_default=True,
    help="onnxruntime graph optimization level pinned on both sides.",
)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Job file to write.")
@force_option
@json_option
def job_new(
    model: Path,
    input_file: Path,
    mode: str,
    steps: int | None,
    samples: int,
    precision: str,
    optimization: str,
    out: Path,
    force: bool,
    as_json: bool,
    circuit_dir: Path | None = None,
    tolerance_file: Path | None = None,
) -> None:
    """Plan MODEL and write a job pinning its digests (OUT plus an OUT-stem.files folder)."""
    from verimesh.jobs.job import new_job

    j = new_job(
        model,
        input_file,
        out,
        mode=mode,
        steps=steps,
        samples=samples,
        precision=precision,
        optimization=optimization,
        overwrite=force,
        circuit=circuit_dir,
        profile=tolerance_file,
    )
    payload = {
        "job": str(out),
        "job_id": j.job_id,
        "steps": len(j.steps),
        "mode": j.mode,
        "model_digest": j.model_digest,
        "input_digest": j.input_digest,
    }
    _emit(as_json, payload, f"{j.job_id}\nwrote {out} ({len(j.steps)} steps, mode {mode}) and {out.stem}.files/")


@job.command("show", epilog=EXIT_CODES_HELP)
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def job_show(job_file: Path, as_json: bool) -> None:
    """Check a job file's integrity and show what it pins."""
    from verimesh.jobs.job import load_job

    j = load_job(job_file)
    doc = {**j.document(), "job_id": j.job_id}
    lines = [
        f"job id     {j.job_id}",
        f"mode       {j.mode}",
        f"model      {j.model_digest} ({j.model_path})",
        f"input      {j.input_digest}",
        f"policy     samples={j.policy.samples} precision={j.policy.precision} optimization={j.policy.optimization}",
    ]
    lines += [f"step {s.index:<4}  {s.digest}  {s.nodes} nodes -> {', '.join(s.outputs)[:50]}" for s in j.steps]
    _emit(as_json, doc, "\n".join(lines))


# --- prove / verify / evidence ----------------------------------------------------------------


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Node secret key file."
)
@click.option(
    "-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Bundle to write (.vmb)."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--model",
    "model_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Model file, if not where the job says.",
)
@srs_option
@json_option
@click.pass_context
def prove(
    ctx: click.Context,
    job_file: Path,
    key_file: Path,
    out: Path,
    device: str,
    model_file: Path | None,
    srs: Path | None,
    as_json: bool,
) -> None:
    """Run JOB_FILE's steps, commit to the trace, sign, and write one bundle file."""
    from verimesh.signing.keys import key_is_encrypted, load_secret_key
    from verimesh.workflows import prove as run_prove

    _init_runtime(ctx)
    passphrase = _passphrase(confirm=False) if key_is_encrypted(key_file) else None
    key = load_secret_key(key_file, passphrase=passphrase)
    bar, update = _progress("proving", not as_json)
    if bar:
        bar.start()
    try:
        result = run_prove(job_file, key=key, out=out, device=device, model=model_file, progress=update, srs=srs)
    finally:
        if bar:
            bar.stop()
    human = (
        f"wrote {out} ({result.bytes_written} bytes) in {result.seconds:.2f}s on {result.provider}\n"
        f"{'proofs digest' if result.provider == 'ezkl' else 'commitment root'} {result.root}"
    )
    _emit(as_json, result.to_json(), human)


class _SamplesType(click.ParamType):  # type: ignore[type-arg]
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


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--job", "job_file", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--node-key", type=click.Path(dir_okay=False, path_type=Path), help="The node's public key file.")
@click.option(
    "--ledger", "ledger_url", envvar="VERIMESH_LEDGER", default=None,
    help="Ledger URL instead of --node-key: key and audit policy from the ledger; the result is recorded.",
)  # fmt: skip
@click.option(
    "--samples", type=_SamplesType(), default=None, help="Steps checked beside the last (default: the job's policy)."
)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Sampling seed, for reproducible audits.")
@click.option(
    "--evidence-out", type=click.Path(dir_okay=False, path_type=Path), help="Where to write evidence on a reject."
)
@click.option(
    "--max-bundle-size", type=click.IntRange(min=1), default=None, help="Refuse bundles larger than this (bytes)."
)
@click.option(
    "--check-all-digests", is_flag=True, help="Hash every shipped tensor, not only those the verdict rests on."
)
@srs_option
@json_option
@click.pass_context
def verify(
    ctx: click.Context,
    bundle: Path,
    job_file: Path,
    node_key: Path | None,
    ledger_url: str | None,
    samples: Any,
    seed: int | None,
    evidence_out: Path | None,
    max_bundle_size: int | None,
    check_all_digests: bool,
    srs: Path | None,
    as_json: bool,
) -> None:
    """Verify a worker's BUNDLE against the job and the node key (--node-key, or --ledger which also
    records receipt, verdict and reward or slash); exit 0 accept, 1 reject."""
    from verimesh.core.container import DEFAULT_LIMITS, Limits
    from verimesh.workflows import verify as run_verify

    _init_runtime(ctx)
    limits = DEFAULT_LIMITS if max_bundle_size is None else Limits(max_file_bytes=max_bundle_size)
    payload: dict[str, Any]
    if ledger_url and node_key is None:
        from verimesh.ledger.store import Ledger
        from verimesh.settlement import verify_and_settle

        settled = verify_and_settle(bundle, job=job_file, ledger=Ledger.open(ledger_url), samples=samples, seed=seed,
                                    evidence_out=evidence_out, limits=limits)  # fmt: skip
        verdict, payload = settled.verdict, settled.to_json()
    elif node_key is not None and not ledger_url:
        verdict = run_verify(bundle, job=job_file, node_key=node_key, samples=samples, seed=seed,
                             evidence_out=evidence_out, limits=limits, check_all_digests=check_all_digests,
                             srs=srs)  # fmt: skip
        payload = verdict.to_json()
    else:
        raise click.UsageError("give exactly one of --node-key (a pinned key) or --ledger (keys from the ledger)")
    if as_json:
        _emit(True, payload, "")
    elif verdict.status != "error":
        click.echo(f"{verdict.status.upper()}: {verdict.reason}")
        for check in verdict.checks:
            mark = "ok  " if check.ok else "FAIL"
            extra = f" (expected {check.expected}, got {check.got})" if not check.ok and check.expected else ""
            click.echo(f"  {mark} {check.name:<16} {check.detail}{extra}")
        if verdict.evidence:
            click.echo(f"evidence written to {verdict.evidence} (re-check: verimesh evidence check {verdict.evidence})")
        for entry in payload.get("ledger_entries", []):
            click.echo(f"ledger: appended entry {entry['seq']} ({entry['kind']})")
        if payload.get("equivocation_evidence"):
            click.echo(f"EQUIVOCATION: evidence written to {payload['equivocation_evidence']}; full stake slashed")
    if verdict.status == "error":
        click.echo(f"verimesh: error[bundle-invalid]: {verdict.reason}", err=True)
        ctx.exit(EXIT_INVALID_INPUT)
    if verdict.status == "reject":
        ctx.exit(EXIT_REJECTED)


@cli.group(epilog=EXIT_CODES_HELP)
def evidence() -> None:
    """Evidence files written on a reject."""


@evidence.command("check", epilog=EXIT_CODES_HELP)
@click.argument("evidence_file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@click.pass_context
def evidence_check(ctx: click.Context, evidence_file: Path, as_json: bool) -> None:
    """Re-check EVIDENCE_FILE from scratch; exit 0 if it proves fraud, 1 if it does not."""
    from verimesh.spot.evidence import check_evidence

    _init_runtime(ctx)
    result = check_evidence(evidence_file)
    word = "FRAUD PROVEN" if result.proves_fraud else "NOT PROVEN"
    _emit(as_json, result.to_json(), f"{word} ({result.kind}) node {result.node_id}: {result.reason}")
    if not result.proves_fraud:
        ctx.exit(EXIT_REJECTED)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--quick", is_flag=True,
              help="Fewer repeats, the fixtures only, a 10^4-entry ledger: minutes, not half an hour.")  # fmt: skip
@click.option("--repeats", type=click.IntRange(min=1), help="Timed spot runs per model [default: 11; quick: 3].")
@_steps_option
@click.option("--only", "only", help="Comma-separated sections to run: spot,zk,signatures,ledger [default: all].")
@click.option("--zk-model", "zk_models", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Model for the zk section (repeatable) [default: fixtures/mlp.onnx].")  # fmt: skip
@click.option("--srs", "srs_file", type=click.Path(dir_okay=False, path_type=Path),
              help="SRS for the zk section [default: fixtures/srs/kzg15.test-only.srs when present].")  # fmt: skip
@click.option("--ledger-entries", "ledger_sizes", multiple=True, type=click.IntRange(min=2),
              help="Ledger sizes (repeatable) [default: 100000 and 1000000; quick: 10000].")  # fmt: skip
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--markdown", "md_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the tables into this file between its generated-part marks (the rest is kept).")  # fmt: skip
@click.pass_context
def bench(ctx: click.Context, models: tuple[Path, ...], quick: bool, repeats: int | None, steps: int | None,
          only: str | None, zk_models: tuple[Path, ...], srs_file: Path | None, ledger_sizes: tuple[int, ...],
          json_out: Path | None, md_out: Path | None) -> None:  # fmt: skip
    """Measure DESIGN §6's targets: spot prove overhead and verify cost, zk warm proof vs bare
    ezkl, envelope verifications/s, ledger appends and proofs; prints the tables and the targets.

    MODELS default to ./fixtures/*.onnx, plus ./bench-out/resnet50.onnx when it exists (made by
    `make bench`) and --quick is not given."""
    from verimesh.assurance.bench import SECTIONS, BenchOptions, render_markdown, run_benchmarks, write_markdown

    _init_runtime(ctx)
    sections = tuple(s.strip() for s in only.split(",")) if only else SECTIONS
    if not sections or any(s not in SECTIONS for s in sections):
        raise click.UsageError(f"--only takes sections from {', '.join(SECTIONS)}")
    if not models and "spot" in sections:
        models = tuple(sorted(Path("fixtures").glob("*.onnx")))
        resnet = Path("bench-out/resnet50.onnx")
        if resnet.exists() and not quick:
            models += (resnet,)
        if not models:
            raise InvalidInputError("no models given and no ./fixtures/*.onnx found")
    default_srs = Path("fixtures/srs/kzg15.test-only.srs")
    options = BenchOptions(
        models=models,
        repeats=repeats or (3 if quick else 11),
        steps=steps,
        zk_models=zk_models or tuple(p for p in (Path("fixtures/mlp.onnx"),) if p.exists()),
        srs=srs_file or (default_srs if default_srs.exists() else None),
        zk_repeats=2 if quick else 3,
        signatures=50 if quick else 200,
        ledger_sizes=ledger_sizes or ((10_000,) if quick else (100_000, 1_000_000)),
        sections=sections,
        quick=quick,
    )
    say = (lambda m: click.echo(f"bench: {m}", err=True)) if sys.stderr.isatty() else None
    report = run_benchmarks(options, progress=say)
    command = "verimesh bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "verimesh bench"
    text = render_markdown(report, command=command)
    click.echo(text)
    if json_out:
        _write_report(json_out, json.dumps(report, indent=2) + "\n")
    if md_out:
        write_markdown(md_out, text)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_option(required=True, help="Input tensors: .npy, .npz or .json.")
@_steps_option
@click.option("--precision", type=click.Choice(["fp32-strict", "tf32"]), default="fp32-strict", show_default=True)
@click.option("--optimization", type=click.Choice(["disable", "basic", "extended", "all"]), default="extended",
              show_default=True)  # fmt: skip
@click.option("--headroom", type=click.FloatRange(min=1, min_open=True), default=10.0, show_default=True,
              help="Tolerance = honest maximum x HEADROOM.")  # fmt: skip
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Profile to write.")
@json_option
@click.pass_context
def calibrate(ctx: click.Context, model: Path, input_file: Path, steps: int | None, precision: str, optimization: str,
              headroom: float, out: Path, as_json: bool) -> None:  # fmt: skip
    """Per-step tolerances from honest variations and cheats; refuses when they overlap."""
    from verimesh.assurance.calibrate import calibrate as run_calibrate
    from verimesh.assurance.calibrate import write_profile
    from verimesh.core.tensors import load_input_file
    from verimesh.jobs.plan import load_model, model_io

    _init_runtime(ctx)
    tensors = load_input_file(input_file, model_io(load_model(model)[0])[0])
    profile = run_calibrate(model, tensors, steps=steps, precision=precision, optimization=optimization,
                            headroom=headroom)  # fmt: skip
    write_profile(profile, out)
    if not any(h.startswith("cuda") for h in profile.honest):
        warning = (
            "verimesh: warning: no GPU here, so no CUDA variation was measured; this profile may reject "
            "honest GPU workers (calibrate on a machine with a GPU, or keep the precision default)"
        )
        click.echo(warning, err=True)
    if as_json:
        _emit(True, profile.to_json(), "")
        return
    click.echo(f"{'step':>4}  {'honest max':>11}  {'tolerance':>10}  {'closest cheat':>13}  {'margin':>8}  strategy")
    for st in profile.steps:
        margin = "inf" if st.cheat_rel_frobenius == float("inf") else f"{st.margin:.0f}x"
        cheat = "-" if st.cheat_rel_frobenius == float("inf") else f"{st.cheat_rel_frobenius:.3g}"
        click.echo(f"{st.index:>4}  {st.honest_rel_frobenius:>11.3g}  {st.tolerance.max_rel_frobenius:>10.3g}  "
                   f"{cheat:>13}  {margin:>8}  {st.cheat_name}")  # fmt: skip
    click.echo(f"wrote {out} ({len(profile.steps)} steps; honest: {', '.join(profile.honest)})")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--input",
    "input_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Input for a single model (default: MODEL.input.npy beside each model).",
)
@click.option("--trials", type=click.IntRange(min=1), default=200, show_default=True, help="Trials per strategy.")
@click.option("--honest", type=click.IntRange(min=1), default=1000, show_default=True, help="Honest verifications.")
@click.option("--samples", type=click.IntRange(min=0), default=1, show_default=True, help="Verifier policy.")
@_steps_option
@click.option("--gain", type=float, default=1.0, show_default=True, help="A cheat's gain, for the minimum stake.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--markdown", "md_out", type=click.Path(dir_okay=False, path_type=Path), help="Write a markdown report.")
@click.option(
    "--plot",
    "plot_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Detection rate against samples per job, measured and predicted (PNG).",
)
@click.pass_context
def redteam(ctx: click.Context, models: tuple[Path, ...], input_file: Path | None, trials: int, honest: int,
            samples: int, steps: int | None, gain: float, json_out: Path | None, md_out: Path | None,
            plot_out: Path | None) -> None:  # fmt: skip
    """Play every cheating strategy against the verifier; exit 1 if a cheat beats its prediction
    or an honest run is rejected."""
    from verimesh.assurance.redteam import detection_curves, markdown_report, plot_curves, run_redteam

    _init_runtime(ctx)
    if input_file is not None and len(models) > 1:
        raise click.UsageError("--input goes with a single model")
    reports, curves = [], []
    for model in models:
        inp = input_file or model.with_name(model.stem + ".input.npy")
        say = (lambda m, model=model: click.echo(f"  {model.name} {m}", err=True)) if sys.stderr.isatty() else None
        reports.append(run_redteam(model, inp, trials=trials, honest=honest, samples=samples, steps=steps,
                                   gain=gain, progress=say))  # fmt: skip
        if plot_out:
            curves.append(detection_curves(model, inp, trials=max(10, trials // 4), steps=steps))
    text = markdown_report(reports)
    click.echo(text)
    if json_out:
        _write_report(json_out, json.dumps({"reports": reports, "curves": curves}, indent=2) + "\n")
    if md_out:
        from verimesh.assurance.bench import machine

        info = machine()
        header = (
            "# Red-team report\n\nProduced by `verimesh redteam` (`make redteam`): each strategy is played "
            f"{trials} times against the verifier at samples = {samples} (the last step plus {samples} cost-weighted "
            f"step(s)), each trial a fresh cheat and fresh verifier randomness; predictions are exact for the "
            f"sampler; intervals are 95% Wilson intervals. Machine: {info['cpu']}, {info['cores']} cores, "
            f"onnxruntime {info['onnxruntime']}." + (" Plot: [redteam.png](redteam.png)." if plot_out else "") + "\n\n"
        )
        _write_report(md_out, header + text)
    if plot_out:
        plot_curves(curves, plot_out)
    broken = [(r["model"], s["strategy"]) for r in reports for s in r["strategies"] if not s["within_ci"]]
    if broken or any(r["honest"]["false_positives"] for r in reports):
        click.echo(f"verimesh: error[redteam-failed]: outside prediction: {broken or 'none'}; honest "
                   f"false positives: {[r['honest']['false_positives'] for r in reports]}", err=True)  # fmt: skip
        ctx.exit(EXIT_REJECTED)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("suite_file", metavar="SUITE.toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--profile", help="Run a profile of the suite (e.g. quick); default: every case as written.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cases run in parallel processes (same results as a serial run).")  # fmt: skip
@click.option("--junit", "junit_out", type=click.Path(dir_okay=False, path_type=Path), help="Write JUnit XML.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--markdown", "md_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a markdown summary (e.g. to $GITHUB_STEP_SUMMARY).")  # fmt: skip
@click.option("--update-golden", is_flag=True,
              help="Rewrite this version's golden files for the cases run (older versions' are kept).")  # fmt: skip
@click.pass_context
def regress(ctx: click.Context, suite_file: Path, profile: str | None, jobs: int, junit_out: Path | None,
            json_out: Path | None, md_out: Path | None, update_golden: bool) -> None:  # fmt: skip
    """Run a proof regression suite: honest proofs accepted, tampering caught, budgets held,
    golden files from earlier versions still verifying, pinned circuits reproducing.

    Exit 0 only when every case holds; 1 when any fails (each failing check is listed)."""
    from verimesh.assurance.regress import junit_xml, load_suite, markdown_summary, run_suite

    _init_runtime(ctx)
    suite = load_suite(suite_file)
    cases = suite.selected(profile)
    with _RegressBoard([c.name for c in cases], {c.name: c.mode for c in cases}) as board:
        report = run_suite(suite, profile=profile, jobs=jobs, update_golden=update_golden, on_event=board.update)
    if json_out:
        _write_report(json_out, json.dumps(report.to_json(), indent=2) + "\n")
    if junit_out:
        _write_report(junit_out, junit_xml(report))
    if md_out:
        _write_report(md_out, markdown_summary(report))
    for case in report.cases:
        click.echo(f"{'pass' if case.ok else 'FAIL'}  {case.name:<24} {sum(c.ok for c in case.checks):>3}/"
                   f"{len(case.checks):<3} checks  {case.seconds:7.1f} s")  # fmt: skip
        for check in case.failures:
            click.echo(f"      {check.name}: {check.message()}")
    held = sum(c.ok for c in report.cases)
    click.echo(f"{held} of {len(report.cases)} cases hold ({report.seconds:.1f} s)")
    if not report.ok:
        failed = ", ".join(c.name for c in report.cases if not c.ok)
        click.echo(f"verimesh: error[regression]: {len(report.cases) - held} case(s) failed: {failed}", err=True)
        ctx.exit(EXIT_REJECTED)


class _RegressBoard:
    """The live progress table of `regress` on a terminal (stderr); one line per case otherwise."""

    def __init__(self, names: list[str], modes: dict[str, str]) -> None:
        self.names, self.modes = names, modes
        self.state: dict[str, str] = dict.fromkeys(names, "queued")
        self.live: Any = None

    def __enter__(self) -> _RegressBoard:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self._table(), console=Console(stderr=True), refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(title="verimesh regress", expand=False)
        for column in ("case", "mode", "status"):
            table.add_column(column)
        for name in self.names:
            table.add_row(name, self.modes[name], self.state[name])
        return table

    def update(self, name: str, result: Any) -> None:
        if result is None:
            self.state[name] = "running"
        else:
            failed = len(result.failures) if not result.ok else 0
            self.state[name] = (
                f"pass ({len(result.checks)} checks, {result.seconds:.1f} s)"
                if result.ok
                else f"FAIL ({failed} failed)"
            )
            if self.live is None:
                click.echo(f"regress: {name}: {self.state[name]}", err=True)
        if self.live is not None:
            self.live.update(self._table())


# --- zero-knowledge: SRS and circuits ----------------------------------------------------------


@cli.group(epilog=EXIT_CODES_HELP)
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
    _emit(as_json, {"srs": str(out), "logrows": logrows, "digest": digest}, f"wrote {out} (2^{logrows} rows, {digest})")


@cli.group(epilog=EXIT_CODES_HELP)
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
@json_option
@click.pass_context
def circuit_build(ctx: click.Context, model: Path, input_file: Path, srs_file: Path, steps: int, target: str,
                  tolerance: float, out: Path | None, as_json: bool) -> None:  # fmt: skip
    """Calibrate, compile and set up MODEL; refuse it if ezkl's output drifts from onnxruntime's."""
    from verimesh.core.tensors import load_input_file
    from verimesh.jobs.plan import load_model, model_io
    from verimesh.zk.ezkl_backend import build_circuit

    _init_runtime(ctx)
    folder = out or Path("circuits") / model.stem
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
    _emit(as_json, payload, f"{built.digest}\nwrote {folder}/ ({len(built.steps)} step(s)); onboarding "
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
        # DESIGN §4: the proving key grows with 2^logrows (about 4.2 KB per row), not with parameters.
        row["estimated_pk_mb"] = round(4.2e3 * 2**step.logrows / 1e6, 1)
    if as_json:
        _emit(True, doc, "")
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

    _init_runtime(ctx)
    rows = [bench_zk(m, srs=srs_file, steps=steps, repeats=repeats) for m in models]
    click.echo("\n".join(zk_table(rows)))
    if json_out:
        _write_report(json_out, json.dumps(rows, indent=2) + "\n")


# --- ledger -----------------------------------------------------------------------------------


def ledger_option(f: F) -> F:
    return click.option(
        "--ledger", "ledger_url", envvar="VERIMESH_LEDGER", required=True,
        help="SQLAlchemy URL (sqlite:///mesh.db, postgresql://...) or a SQLite file path; env VERIMESH_LEDGER.",
    )(f)  # fmt: skip


@cli.group(epilog=EXIT_CODES_HELP)
def ledger() -> None:
    """The tamper-evident reputation ledger."""


@ledger.command("init", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option(
    "--operator-key",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The operator's secret key file (signs checkpoints); its path is remembered.",
)
@click.option(
    "--fraud-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.5,
    show_default=True,
    help="Share of the stake a proven fraud takes (equivocation takes all).",
)
@click.option("--reward", type=click.IntRange(min=0), default=1, show_default=True, help="Reward per accepted job.")
@json_option
def ledger_init(ledger_url: str, operator_key: Path, fraud_fraction: float, reward: int, as_json: bool) -> None:
    """Create an empty ledger."""
    from verimesh.ledger.store import Ledger, display_url
    from verimesh.signing.keys import key_is_encrypted, load_secret_key

    passphrase = _passphrase(confirm=False) if key_is_encrypted(operator_key) else None
    key = load_secret_key(operator_key, passphrase=passphrase)
    led = Ledger.create(ledger_url, key, operator_key_path=operator_key,
                        settings={"fraud_fraction": repr(fraud_fraction), "reward": str(reward)})  # fmt: skip
    payload = {"ledger": display_url(ledger_url), "ledger_id": led.ledger_id, "operator": key.node_id}
    _emit(as_json, payload, f"created ledger {led.ledger_id} at {payload['ledger']} (operator {key.node_id})")


@ledger.command("register", epilog=EXIT_CODES_HELP)
@click.argument("public_key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--stake", type=click.IntRange(min=1), required=True)
@ledger_option
@json_option
def ledger_register(public_key: Path, stake: int, ledger_url: str, as_json: bool) -> None:
    """Register a node with a stake (its proof of possession is checked first)."""
    from verimesh.ledger.store import Ledger
    from verimesh.settlement import register_node
    from verimesh.signing.keys import load_public_key

    public = load_public_key(public_key)
    seq = register_node(Ledger.open(ledger_url), public, stake=stake)
    _emit(as_json, {"node_id": public.node_id, "stake": stake, "seq": seq},
          f"registered {public.node_id} with stake {stake} (entry {seq})")  # fmt: skip


@ledger.command("reputation", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Job size used to show the audit rate in force.",
)
@json_option
def ledger_reputation(ledger_url: str, steps: int, as_json: bool) -> None:
    """Per node: score, checked-valid streak, stake, slashed, audit rate in force (derived from events)."""
    from verimesh.ledger.store import Ledger
    from verimesh.settlement import all_standings

    table = all_standings(Ledger.open(ledger_url))
    rows = []
    for node in sorted(table.values(), key=lambda n: n.node_id):
        row = node.to_json()
        row["audit_rate"] = round(node.audit_rate(steps, 1), 4)
        rows.append(row)
    if as_json:
        _emit(True, {"nodes": rows, "steps_assumed": steps}, "")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"reputation ({len(rows)} nodes; audit rate for {steps}-step jobs)")
    for col in ("node", "score", "streak", "accepted", "rejected", "stake", "slashed", "rewards", "audit"):
        t.add_column(col)
    for r in rows:
        counts = [str(r[k]) for k in ("streak", "accepted", "rejected", "stake", "slashed", "rewards")]
        t.add_row(r["node_id"], f"{r['score']:.3f}", *counts, f"{r['audit_rate']:.0%} ({r['audit']})")
    Console(width=160).print(t)


@ledger.command("show", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option("--node", "node_id", help="Only this node's entries.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the last N entries.")
@json_option
def ledger_show(ledger_url: str, node_id: str | None, limit: int | None, as_json: bool) -> None:
    """List ledger entries (oldest first)."""
    from collections import deque

    from verimesh.ledger.store import Ledger

    entries = deque(Ledger.open(ledger_url).entries(node_id=node_id), maxlen=limit)
    events = []
    for e in entries:
        event = e.event
        event.pop("envelope", None)  # the receipt's envelope is long; `ledger prove` shows it whole
        events.append(event)
    if as_json:
        _emit(True, {"entries": events}, "")
        return
    for ev in events:
        detail = {k: v for k, v in ev.items() if k not in ("seq", "kind", "time", "node_id")}
        click.echo(f"{ev['seq']:>8}  {ev['time']}  {ev['kind']:<10} {ev.get('node_id') or '-':<24} "
                   f"{json.dumps(detail, sort_keys=True)[:110]}")  # fmt: skip


@ledger.command("checkpoint", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option(
    "--operator-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Operator secret key (default: the one given at init).",
)
@click.option(
    "-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="Also save the signed tree head here."
)
@json_option
def ledger_checkpoint(ledger_url: str, operator_key: Path | None, out: Path | None, as_json: bool) -> None:
    """Sign the current tree head (size, root) and log it."""
    from verimesh.ledger.store import Ledger

    led = Ledger.open(ledger_url)
    key_path = operator_key or (Path(led.meta["operator_key_path"]) if led.meta.get("operator_key_path") else None)
    from verimesh.signing.keys import key_is_encrypted

    passphrase = _passphrase(confirm=False) if key_path and key_is_encrypted(key_path) else None
    cp = led.checkpoint(led.operator_key(operator_key, passphrase=passphrase))
    doc = cp.to_json()
    if out:
        out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    _emit(
        as_json, doc, f"checkpoint: {cp.tree_size} entries, root {doc['root']}" + (f"; saved to {out}" if out else "")
    )


@ledger.command("prove", epilog=EXIT_CODES_HELP)
@click.argument("entry", type=click.IntRange(min=0))
@ledger_option
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the proof here.")
def ledger_prove(entry: int, ledger_url: str, out: Path | None) -> None:
    """An inclusion proof of ENTRY under the latest signed checkpoint, verifiable offline."""
    from verimesh.ledger.store import Ledger, inclusion_document

    doc = inclusion_document(Ledger.open(ledger_url), entry)
    text = json.dumps(doc, indent=2, sort_keys=True)
    if out:
        out.write_text(text + "\n")
    click.echo(text)


@ledger.command("check-proof", epilog=EXIT_CODES_HELP)
@click.argument("proof", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--operator-key",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The operator's public key file.",
)
@json_option
@click.pass_context
def ledger_check_proof(ctx: click.Context, proof: Path, operator_key: Path, as_json: bool) -> None:
    """Check an inclusion proof offline: exit 0 when the entry is in the signed log."""
    from verimesh.ledger.store import check_inclusion_document
    from verimesh.signing.keys import load_public_key

    ok, event, reason = check_inclusion_document(proof, load_public_key(operator_key))
    _emit(as_json, {"included": ok, "reason": reason, "entry": event},
          f"{'INCLUDED' if ok else 'NOT PROVEN'}: {reason}")  # fmt: skip
    if not ok:
        ctx.exit(EXIT_REJECTED)


@ledger.command("verify", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option(
    "--checkpoint",
    "checkpoint_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A signed tree head saved earlier: the log must still extend it.",
)
@json_option
@click.pass_context
def ledger_verify(ctx: click.Context, ledger_url: str, checkpoint_file: Path | None, as_json: bool) -> None:
    """Recompute the whole log; exit 0 intact, 1 tampered (naming the first bad entry)."""
    from verimesh.ledger.store import Checkpoint, Ledger, verify_ledger

    cp = Checkpoint.from_file(checkpoint_file) if checkpoint_file else None
    report = verify_ledger(Ledger.open(ledger_url), checkpoint=cp)
    if as_json:
        _emit(True, report.to_json(), "")
    elif report.ok:
        click.echo(f"INTACT: {report.size} entries, {report.checkpoints_checked} checkpoints, "
                   f"root {report.to_json()['root']}")  # fmt: skip
    else:
        click.echo(f"TAMPERED: first bad entry {report.first_bad_entry}")
        for problem in report.problems[:20]:
            click.echo(f"  {problem}")
    if not report.ok:
        ctx.exit(EXIT_REJECTED)


@ledger.command("slash", epilog=EXIT_CODES_HELP)
@click.option("--evidence", type=click.Path(dir_okay=False, path_type=Path), required=True)
@ledger_option
@json_option
def ledger_slash(evidence: Path, ledger_url: str, as_json: bool) -> None:
    """Slash a node with evidence (equivocation: the whole stake; fraud: a fraction), re-checked first."""
    from verimesh.ledger.store import Ledger
    from verimesh.settlement import slash_with_evidence

    result = slash_with_evidence(Ledger.open(ledger_url), evidence)
    _emit(as_json, result.to_json(),
          f"slashed {result.node_id} by {result.amount} ({result.reason}), evidence {result.evidence_digest} "
          f"(entry {result.seq})")  # fmt: skip


@ledger.command("bench", epilog=EXIT_CODES_HELP)
@click.option("--entries", type=click.IntRange(min=10), default=100_000, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write results as JSON.")
def ledger_bench(entries: int, batch: int, json_out: Path | None) -> None:
    """Appends per second (batched, SQLite) and proof times at the given size."""
    from verimesh.assurance.bench import bench_ledger, ledger_table

    result = bench_ledger(entries, batch=batch)
    click.echo("\n".join(ledger_table([result])))
    if json_out:
        _write_report(json_out, json.dumps(result, indent=2) + "\n")


def main() -> None:
    cli(prog_name="verimesh")
