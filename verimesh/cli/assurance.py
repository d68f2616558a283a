"""Assurance tools: ``bench``, ``calibrate``, ``redteam``, ``regress``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from verimesh.cli.common import (
    EXIT_CODES_HELP,
    emit,
    init_runtime,
    input_option,
    json_option,
    plural,
    steps_option,
    write_report,
)
from verimesh.errors import EXIT_REJECTED, InvalidInputError


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--quick", is_flag=True,
              help="Fewer repeats, the fixtures only, a 10^4-entry ledger: minutes, not half an hour.")  # fmt: skip
@click.option("--repeats", type=click.IntRange(min=1), help="Timed spot runs per model [default: 11; quick: 3].")
@steps_option
@click.option("--only", "only",
              help="Comma-separated sections: spot,subtasks,mesh,costs,zk,signatures,ledger,startup,generate "
              "[default: all].")  # fmt: skip
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
    """Measure docs/design.md §8's targets: spot prove overhead and verify cost, zk warm proof vs bare
    ezkl, envelope verifications/s, ledger appends and proofs; prints the tables and the targets.
    The costs section sets each step's estimated share of the cost beside its measured share of
    the time.

    MODELS default to ./fixtures/*.onnx, plus ./bench-out/resnet50.onnx when it exists (made by
    `make bench`) and --quick is not given. The costs section's default is ./bench-out/resnet50,
    recurrent and encoder.onnx (`make bench`), or ./fixtures/*.onnx with --quick or without them."""
    from verimesh.assurance.bench import SECTIONS, BenchOptions, render_markdown, run_benchmarks, write_markdown

    init_runtime(ctx)
    sections = tuple(s.strip() for s in only.split(",")) if only else SECTIONS
    if not sections or any(s not in SECTIONS for s in sections):
        raise click.UsageError(f"--only takes sections from {', '.join(SECTIONS)}")
    # A decoder with a prompt beside it is the generate section's, not a spot model.
    fixtures = tuple(p for p in sorted(Path("fixtures").glob("*.onnx")) if not p.with_suffix(".prompt.json").exists())
    decoders = tuple((p, p.with_suffix(".prompt.json")) for p in sorted(Path("fixtures").glob("*.onnx"))
                     if p.with_suffix(".prompt.json").exists())  # fmt: skip
    large = Path("bench-out/lm-large.onnx")  # `make bench` exports it
    large_decoders = ((large, large.with_suffix(".prompt.json")),) if large.exists() and not quick else ()
    cost_models = models
    if not cost_models and "costs" in sections:
        built = (Path(f"bench-out/{name}.onnx") for name in ("resnet50", "recurrent", "encoder"))
        big = tuple(p for p in built if p.exists())
        cost_models = fixtures if quick or not big else big
        if not cost_models:
            raise InvalidInputError("no models given and no ./fixtures/*.onnx found")
    if not models and ("spot" in sections or "subtasks" in sections or "mesh" in sections):
        models = fixtures
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
        cost_models=cost_models,
        startup_model=next((p for p in (Path("fixtures/mlp.onnx"),) if p.exists()), None),
        generate_models=decoders + large_decoders,
    )
    say = (lambda m: click.echo(f"bench: {m}", err=True)) if sys.stderr.isatty() else None
    report = run_benchmarks(options, progress=say)
    command = "verimesh bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "verimesh bench"
    text = render_markdown(report, command=command)
    click.echo(text)
    if json_out:
        write_report(json_out, json.dumps(report, indent=2) + "\n")
    if md_out:
        write_markdown(md_out, text)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_option(required=False, help="Input tensors: .npy, .npz or .json.")
@click.option("--prompt", "prompt_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Generate mode: a decoder MODEL's prompt.json (instead of --input).")  # fmt: skip
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Generate mode: positions measured.")  # fmt: skip
@steps_option
@click.option("--precision", type=click.Choice(["fp32-strict", "tf32"]), default="fp32-strict", show_default=True)
@click.option("--optimization", type=click.Choice(["disable", "basic", "extended", "all"]), default="extended",
              show_default=True)  # fmt: skip
@click.option("--headroom", type=click.FloatRange(min=1, min_open=True), default=10.0, show_default=True,
              help="Tolerance = honest maximum x HEADROOM.")  # fmt: skip
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Profile to write.")
@json_option
@click.pass_context
def calibrate(ctx: click.Context, model: Path, input_file: Path | None, prompt_file: Path | None,
              max_new_tokens: int, steps: int | None, precision: str, optimization: str, headroom: float, out: Path,
              as_json: bool) -> None:  # fmt: skip
    """Per-step tolerances from honest variations and cheats; refuses when they overlap. With
    --prompt (a decoder model): the tolerance of a generate job's records, from the spread between
    decode loops and the verifier's prefill pass (`job new --mode generate --tolerance`)."""
    from verimesh.assurance.calibrate import calibrate as run_calibrate
    from verimesh.assurance.calibrate import calibrate_generate, write_profile
    from verimesh.core.tensors import load_input_file
    from verimesh.jobs.plan import load_model, model_io

    init_runtime(ctx)
    if (input_file is None) == (prompt_file is None):
        raise click.UsageError("give --input (a model's input) or --prompt (a decoder's prompt), one of them")
    if prompt_file is not None:
        if steps is not None:
            raise click.UsageError("--steps does not go with --prompt: a generate job is one step, the model")
        profile = calibrate_generate(model, prompt_file, max_new_tokens=max_new_tokens, precision=precision,
                                     optimization=optimization, headroom=headroom)  # fmt: skip
    else:
        assert input_file is not None
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
        emit(True, profile.to_json(), "")
        return
    click.echo(f"{'step':>4}  {'honest max':>11}  {'tolerance':>10}  {'closest cheat':>13}  {'margin':>8}  strategy")
    for st in profile.steps:
        margin = "inf" if st.cheat_rel_frobenius == float("inf") else f"{st.margin:.0f}x"
        cheat = "-" if st.cheat_rel_frobenius == float("inf") else f"{st.cheat_rel_frobenius:.3g}"
        click.echo(f"{st.index:>4}  {st.honest_rel_frobenius:>11.3g}  {st.tolerance.max_rel_frobenius:>10.3g}  "
                   f"{cheat:>13}  {margin:>8}  {st.cheat_name}")  # fmt: skip
    click.echo(f"wrote {out} ({plural(len(profile.steps), 'step')}; honest: {', '.join(profile.honest)})")


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mesh", "mesh_url", default=None,
              help="Instead: run cheating node daemons against this coordinator (your own deployment).")  # fmt: skip
@click.option("--strategy", type=click.Choice(["lazy", "perturb-final", "perturb-intermediate"]), default="lazy",
              show_default=True, help="With --mesh: what the cheating nodes do.")  # fmt: skip
@click.option("--nodes", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              help="With --mesh: how many cheating nodes.")  # fmt: skip
@click.option("--keys-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("redteam-keys"),
              show_default=True, help="With --mesh: where the cheating nodes' keys are kept.")  # fmt: skip
@click.option("--max-tasks", type=click.IntRange(min=1), default=None, help="With --mesh: tasks per node.")
@click.option("--idle-exit", type=click.FloatRange(min=0.1), default=None,
              help="With --mesh: a node stops after this many idle seconds.")  # fmt: skip
@click.option(
    "--input",
    "input_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Input for a single model (default: MODEL.input.npy beside each model).",
)
@click.option("--prompt", "prompt_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Generate mode: the prompt (prompt.json) of a decoder MODEL; plays its cheats.")  # fmt: skip
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=24, show_default=True,
              help="Generate mode: tokens per answer.")  # fmt: skip
@click.option("--sampling", default="greedy", show_default=True,
              help='Generate mode: "greedy" or "temperature=T[,top_p=P]".')  # fmt: skip
@click.option("--trials", type=click.IntRange(min=1), default=200, show_default=True, help="Trials per strategy.")
@click.option("--honest", type=click.IntRange(min=1), default=1000, show_default=True, help="Honest verifications.")
@click.option("--samples", type=click.IntRange(min=0), default=1, show_default=True, help="Verifier policy.")
@steps_option
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
def redteam(ctx: click.Context, models: tuple[Path, ...], mesh_url: str | None, strategy: str, nodes: int,
            keys_dir: Path, max_tasks: int | None, idle_exit: float | None, input_file: Path | None,
            prompt_file: Path | None, max_new_tokens: int, sampling: str, trials: int, honest: int, samples: int,
            steps: int | None, gain: float, json_out: Path | None, md_out: Path | None,
            plot_out: Path | None) -> None:  # fmt: skip
    """Play every cheating strategy against the verifier; exit 1 if a cheat beats its prediction
    or an honest run is rejected. With --mesh URL: run cheating nodes against a live coordinator."""
    from verimesh.assurance.redteam import detection_curves, markdown_report, plot_curves, run_redteam

    init_runtime(ctx)
    if mesh_url is not None:
        from verimesh.assurance.mesh_redteam import run_mesh_redteam

        if models:
            raise click.UsageError("--mesh runs against a coordinator's own jobs: give no MODELS")

        def say_line(line: str) -> None:
            click.echo(f"verimesh: redteam: {line}", err=True)

        report = run_mesh_redteam(mesh_url, strategy=strategy, nodes=nodes, keys_dir=keys_dir,
                                  max_tasks=max_tasks, idle_exit=idle_exit, on_event=say_line)  # fmt: skip
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        if json_out:
            write_report(json_out, json.dumps(report, indent=2) + "\n")
        return
    if not models:
        raise click.UsageError("give MODELS, or --mesh URL")
    if input_file is not None and len(models) > 1:
        raise click.UsageError("--input goes with a single model")
    reports, curves = [], []
    if prompt_file is not None:
        from verimesh.assurance.generate_redteam import run_generate_redteam
        from verimesh.jobs.generation import parse_sampling

        if len(models) != 1 or input_file is not None or plot_out is not None:
            raise click.UsageError("--prompt goes with one decoder MODEL (and no --input or --plot)")
        say_gen = (lambda m: click.echo(f"  {models[0].name} {m}", err=True)) if sys.stderr.isatty() else None
        reports.append(run_generate_redteam(models[0], prompt_file, max_new_tokens=max_new_tokens, trials=trials,
                                            honest=honest, sampling=parse_sampling(sampling),
                                            progress=say_gen))  # fmt: skip
        models = ()
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
        write_report(json_out, json.dumps({"reports": reports, "curves": curves}, indent=2) + "\n")
    if md_out:
        from verimesh.assurance.bench import machine

        info = machine()
        header = (
            "# Red-team report\n\nProduced by `verimesh redteam` (`make redteam`): each strategy is played "
            f"{trials} times against the verifier at samples = {samples} (the last step plus {samples} cost-weighted "
            f"step(s)), each trial a fresh cheat and fresh verifier randomness; predictions are exact for the "
            f"sampler; intervals are 95% Wilson intervals. Machine: {info['cpu']}, {info['cores']} cores, "
            f"onnxruntime {info['onnxruntime']}." + (" Plot: [redteam.png](redteam.png)." if plot_out else "") + "\n\n"
            "Columns: *detected* trials the verifier rejected; *predicted* the sampler's exact detection "
            "probability; *min stake* the stake that makes the cheat unprofitable for a gain of 1; *harmful* "
            "trials whose model outputs differ from the honest ones beyond the job's tolerance (for the "
            "laundering strategies, which nudge values inside the tolerance, the ones that did harm); "
            "*wrong accepted* harmful trials the verifier accepted: wrong results a job owner would have "
            "received (both measured for the laundering strategies; every other strategy moves values beyond "
            "the tolerance, so each of its undetected trials is a wrong result accepted).\n\n"
        )
        write_report(md_out, header + text)
    if plot_out:
        plot_curves(curves, plot_out)
    # A strategy with no trials (nothing on the model for it to work on) is not beaten.
    broken = [(r["model"], s["strategy"]) for r in reports for s in r["strategies"] if s["within_ci"] is False]
    if broken or any(r["honest"]["false_positives"] for r in reports):
        click.echo(f"verimesh: error[redteam-failed]: outside prediction: {broken or 'none'}; honest "
                   f"false positives: {[r['honest']['false_positives'] for r in reports]}", err=True)  # fmt: skip
        ctx.exit(EXIT_REJECTED)


@click.command(epilog=EXIT_CODES_HELP)
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
@click.option("--case", "only", metavar="NAME", help="Run only this case.")
@click.pass_context
def regress(ctx: click.Context, suite_file: Path, profile: str | None, jobs: int, junit_out: Path | None,
            json_out: Path | None, md_out: Path | None, update_golden: bool, only: str | None) -> None:  # fmt: skip
    """Run a proof regression suite: honest proofs accepted, tampering caught, budgets held,
    golden files from earlier versions still verifying, pinned circuits reproducing.

    Exit 0 only when every case holds; 1 when any fails (each failing check is listed)."""
    from verimesh.assurance.regress import junit_xml, load_suite, markdown_summary, run_suite

    init_runtime(ctx)
    suite = load_suite(suite_file)
    cases = suite.selected(profile, only)
    with _RegressBoard([c.name for c in cases], {c.name: c.mode for c in cases}) as board:
        report = run_suite(suite, profile=profile, jobs=jobs, update_golden=update_golden, on_event=board.update,
                           only=only)  # fmt: skip
    if json_out:
        write_report(json_out, json.dumps(report.to_json(), indent=2) + "\n")
    if junit_out:
        write_report(junit_out, junit_xml(report))
    if md_out:
        write_report(md_out, markdown_summary(report))
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
            if self.live is None:  # a CI log: one line when a case starts, one when it ends
                click.echo(f"regress: {name}: started", err=True)
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
