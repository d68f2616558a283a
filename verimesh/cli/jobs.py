"""The job owner's and the node operator's commands: ``plan``, ``job``, ``prove``, ``verify``, ``evidence``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from verimesh.cli.common import (
    EXIT_CODES_HELP,
    SamplesType,
    emit,
    force_option,
    init_runtime,
    input_option,
    json_option,
    load_signing_key,
    note,
    plural,
    progress_bar,
    srs_option,
    steps_option,
)
from verimesh.errors import EXIT_INVALID_INPUT, EXIT_REJECTED


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@steps_option
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
        "notes": list(planned.plan.notes),
    }
    for line in planned.plan.notes:
        note(line)
    if as_json:
        emit(True, payload, "")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model.name}: {plural(len(rows), 'step')}, est. {planned.plan.total_cost / 1e6:.3g} MFLOP")
    for col in ("step", "nodes", "est. MFLOP", "boundary tensors", "digest"):
        table.add_column(col)
    for r in rows:
        outs = ", ".join(r["outputs"])
        table.add_row(str(r["index"]), str(r["nodes"]), f"{r['cost'] / 1e6:.3g}", outs[:60], r["digest"][:19] + "…")
    Console(width=160).print(table)


@click.group(epilog=EXIT_CODES_HELP)
def job() -> None:
    """Create and inspect jobs."""


@job.command("new", epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_option(required=False, help="Input tensors: .npy, .npz or .json (spot and zk modes).")
@click.option("--mode", type=click.Choice(["spot", "zk", "generate"]), default="spot", show_default=True,
              help="generate: token generation from a decoder model (--prompt, --max-new-tokens).")  # fmt: skip
@click.option("--prompt", "prompt_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='generate: prompt.json, {"input_ids": [[...]]} or {"text": "..."} with --tokenizer.')  # fmt: skip
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="generate: tokens to make at most.")
@click.option("--sampling", default="greedy", show_default=True,
              help='generate: "greedy" or "temperature=T[,top_p=P]" (reproducible from the job\'s nonce).')  # fmt: skip
@click.option("--stop-token", "stop_tokens", type=click.IntRange(min=0), multiple=True,
              help="generate: a token id that ends the answer (repeatable).")  # fmt: skip
@click.option("--tokenizer", "tokenizer_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="generate: a Hugging Face tokenizers JSON file, pinned in the job by digest.")  # fmt: skip
@click.option(
    "--tolerance", "tolerance_file", type=click.Path(dir_okay=False, path_type=Path),
    help="Per-step tolerance profile written by `verimesh calibrate` (same --steps).",
)  # fmt: skip
@click.option(
    "--circuit", "circuit_dir", type=click.Path(file_okay=False, path_type=Path),
    help="zk mode: the circuit folder built by `verimesh circuit build`.",
)  # fmt: skip
@steps_option
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
@click.option(
    "--window",
    type=click.Choice(["1", "2"]),
    default="2",
    show_default=True,
    help="2: a verifier also runs the step after each sampled one from its own outputs (catches boundary "
    "values nudged inside the tolerance); 1: each step alone.",
)
@click.option(
    "--upgrade-opset",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Convert the model to opset N first (onnx's version converter) and pin the converted model.",
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
    window: str = "2",
    upgrade_opset: int | None = None,
    prompt_file: Path | None = None,
    max_new_tokens: int | None = None,
    sampling: str = "greedy",
    stop_tokens: tuple[int, ...] = (),
    tokenizer_file: Path | None = None,
) -> None:
    """Plan MODEL and write a job pinning its digests (OUT plus an OUT-stem.files folder). The model
    runs once on the input first: one that cannot run, or that verimesh will not run, is refused.
    --mode generate: a decoder model, a prompt and how many tokens to generate."""
    from verimesh.jobs.job import new_job

    generate_only = {"--prompt": prompt_file, "--max-new-tokens": max_new_tokens, "--tokenizer": tokenizer_file,
                     "--stop-token": stop_tokens or None,
                     "--sampling": None if sampling == "greedy" else sampling}  # fmt: skip
    if mode == "generate":
        _generate_job(model, out, force, as_json, prompt_file, max_new_tokens, sampling, stop_tokens, tokenizer_file,
                      input_file, samples, precision, optimization, circuit_dir, tolerance_file, steps)  # fmt: skip
        return
    given = [flag for flag, value in generate_only.items() if value is not None]
    if given:
        raise click.UsageError(f"{', '.join(given)} go with --mode generate")
    if input_file is None:
        raise click.UsageError("Missing option '--input' (spot and zk jobs run the model on an input).")
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
        window=int(window),
        upgrade_opset=upgrade_opset,
        on_note=note,
    )
    payload = {
        "job": str(out),
        "job_id": j.job_id,
        "steps": len(j.steps),
        "mode": j.mode,
        "model_digest": j.model_digest,
        "input_digest": j.input_digest,
    }
    emit(
        as_json, payload, f"{j.job_id}\nwrote {out} ({plural(len(j.steps), 'step')}, mode {mode}) and {out.stem}.files/"
    )


def _generate_job(model: Path, out: Path, force: bool, as_json: bool, prompt_file: Path | None,
                  max_new_tokens: int | None, sampling: str, stop_tokens: tuple[int, ...], tokenizer_file: Path | None,
                  input_file: Path | None, samples: int, precision: str, optimization: str,
                  circuit_dir: Path | None, tolerance_file: Path | None, steps: int | None) -> None:  # fmt: skip
    from verimesh.jobs.generate_job import new_generate_job
    from verimesh.jobs.generation import parse_sampling

    if prompt_file is None or max_new_tokens is None:
        raise click.UsageError("--mode generate needs --prompt prompt.json and --max-new-tokens N")
    others = {"--input": input_file, "--circuit": circuit_dir, "--steps": steps}
    given = [flag for flag, value in others.items() if value is not None]
    if given:
        raise click.UsageError(f"{', '.join(given)} do not go with --mode generate (the prompt is its input)")
    source = click.get_current_context().get_parameter_source("samples")
    j = new_generate_job(
        model, prompt_file, out, max_new_tokens=max_new_tokens, sampling=parse_sampling(sampling),
        stop_tokens=tuple(stop_tokens), tokenizer=tokenizer_file, precision=precision, optimization=optimization,
        samples=None if source is click.core.ParameterSource.DEFAULT else samples, overwrite=force,
        profile=tolerance_file,
    )  # fmt: skip
    spec = j.generate
    assert spec is not None
    payload = {"job": str(out), "job_id": j.job_id, "mode": "generate", "model_digest": j.model_digest,
               "input_digest": j.input_digest, "max_new_tokens": spec.max_new_tokens,
               "layers": len(spec.layout.past), "kv_cache": bool(spec.layout.past),
               "vocab": spec.layout.vocab}  # fmt: skip
    cache = f"{len(spec.layout.past)} layers, KV cache" if spec.layout.past else "no KV cache"
    emit(as_json, payload, f"{j.job_id}\nwrote {out} (generate: up to {spec.max_new_tokens} tokens, {cache}, "
                           f"vocab {spec.layout.vocab}) and {out.stem}.files/")  # fmt: skip


@job.command("show", epilog=EXIT_CODES_HELP)
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def job_show(job_file: Path, as_json: bool) -> None:
    """Check a job file and the files it pins (step files, input; the model where it is), and show
    what it pins. A file that does not match its digest is exit 3."""
    from verimesh.errors import InvalidInputError
    from verimesh.jobs.job import load_job

    j = load_job(job_file)
    j.read_input()
    if j.mode == "zk":
        j.load_circuit()
    for index in range(len(j.steps)):
        j.read_step_model(index)
    try:
        j.check_model_file()
        model_state = "checked"
    except InvalidInputError:  # not there: a worker passes --model; a mismatch is still an error
        model_state = "not found (prove and calibrate take --model)"
    checked = f"{plural(len(j.steps), 'step file')} and the input match their digests; model file {model_state}"
    doc = {**j.document(), "job_id": j.job_id, "checked": checked}
    lines = [
        f"job id     {j.job_id}",
        f"mode       {j.mode}",
        f"model      {j.model_digest} ({j.model_path})",
        f"input      {j.input_digest}",
        f"files      {checked}",
        f"policy     samples={j.policy.samples} precision={j.policy.precision} optimization={j.policy.optimization}",
    ]
    lines += [
        f"step {s.index:<4}  {s.digest}  {plural(s.nodes, 'node')} -> {', '.join(s.outputs)[:50]}" for s in j.steps
    ]
    emit(as_json, doc, "\n".join(lines))


@click.command(epilog=EXIT_CODES_HELP)
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
@click.option(
    "--inputs-from", "inputs_from", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
    help="A segment: the bundle of an earlier segment whose outputs it starts from (repeat per segment).",
)  # fmt: skip
@srs_option
@force_option
@json_option
@click.pass_context
def prove(
    ctx: click.Context,
    job_file: Path,
    key_file: Path,
    out: Path,
    device: str,
    model_file: Path | None,
    inputs_from: tuple[Path, ...],
    srs: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Run JOB_FILE's steps, commit to the trace, sign, and write one bundle file (an existing
    one only with --force). JOB_FILE may be a segment from `job split`; a segment after the
    first starts from the bundles of the segments it builds on (--inputs-from), checked against
    their seals and signed outputs before anything runs."""
    from verimesh.errors import InvalidInputError
    from verimesh.workflows import prove as run_prove

    init_runtime(ctx)
    if out.exists() and not force:
        raise InvalidInputError(f"{out} already exists", hint="pass --force to overwrite it")
    key = load_signing_key(key_file)
    bar, update = progress_bar("proving", not as_json)
    if bar:
        bar.start()
    try:
        result = run_prove(job_file, key=key, out=out, device=device, model=model_file, progress=update, srs=srs,
                           inputs_from=inputs_from)  # fmt: skip
    finally:
        if bar:
            bar.stop()
    human = (
        f"wrote {out} ({result.bytes_written} bytes) in {result.seconds:.2f}s on {result.provider}\n"
        f"{'proofs digest' if result.provider == 'ezkl' else 'commitment root'} {result.root}"
    )
    emit(as_json, result.to_json(), human)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("bundles", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--job", "job_file", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--node-key", type=click.Path(dir_okay=False, path_type=Path), help="The node's public key file.")
@click.option(
    "--node-keys", default=None,
    help="A chain of segments: the public key files of the nodes, comma-separated, one per bundle in order.",
)  # fmt: skip
@click.option(
    "--shards", "batch_file", type=click.Path(dir_okay=False, path_type=Path),
    help="A job split into shards: the batch that was split (one bundle per row, with --node-keys).",
)  # fmt: skip
@click.option(
    "--receipt-out", type=click.Path(dir_okay=False, path_type=Path),
    help="A chain: on an accept, write a receipt signed with --key.",
)  # fmt: skip
@click.option(
    "--key", "receipt_key", type=click.Path(dir_okay=False, path_type=Path),
    help="With --receipt-out: the verifier's secret key that signs the receipt.",
)  # fmt: skip
@click.option(
    "--ledger", "ledger_url", envvar="VERIMESH_LEDGER", default=None,
    help="Ledger URL instead of --node-key: key and audit policy from the ledger; the result is recorded.",
)  # fmt: skip
@click.option(
    "--verifier-key", type=click.Path(dir_okay=False, path_type=Path), envvar="VERIMESH_VERIFIER_KEY", default=None,
    help="With --ledger: the secret key that signs what is recorded (the operator's, or a verifier registered in "
    "the ledger); env VERIMESH_VERIFIER_KEY.",
)  # fmt: skip
@click.option(
    "--samples", type=SamplesType(), default=None, help="Steps checked beside the last (default: the job's policy)."
)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Sampling seed, for reproducible audits.")
@click.option(
    "--evidence-out", type=click.Path(dir_okay=False, path_type=Path), help="Where to write evidence on a reject."
)
@click.option(
    "--outputs-out", type=click.Path(dir_okay=False, path_type=Path),
    help="On an accept, also write the verified output values here (.npz or .json).",
)  # fmt: skip
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
    bundles: tuple[Path, ...],
    job_file: Path,
    node_key: Path | None,
    node_keys: str | None,
    batch_file: Path | None,
    receipt_out: Path | None,
    receipt_key: Path | None,
    ledger_url: str | None,
    verifier_key: Path | None,
    samples: Any,
    seed: int | None,
    evidence_out: Path | None,
    outputs_out: Path | None,
    max_bundle_size: int | None,
    check_all_digests: bool,
    srs: Path | None,
    as_json: bool,
) -> None:
    """Verify a worker's bundle against the job and the node key (--node-key, or --ledger which also
    records receipt, verdict and reward or slash, signed with --verifier-key); exit 0 accept, 1 reject.
    With --ledger, a ledger that does not verify, an unknown node or job, or a node without stake is
    refused (exit 3) and nothing is recorded.

    A job split into segments (`job split`): give every segment's bundle and --node-keys, one key
    per bundle; the chain is verified as one job (--receipt-out writes a signed receipt)."""
    from verimesh.core.container import DEFAULT_LIMITS, Limits
    from verimesh.workflows import verify as run_verify

    init_runtime(ctx)
    limits = DEFAULT_LIMITS if max_bundle_size is None else Limits(max_file_bytes=max_bundle_size)
    if outputs_out is not None and outputs_out.suffix.lower() not in (".npz", ".json"):
        raise click.UsageError("--outputs-out writes .npz or .json")
    if node_keys is not None or len(bundles) > 1 or batch_file is not None:
        _verify_chain(ctx, bundles, job_file, node_keys, receipt_out, receipt_key, samples, seed, evidence_out,
                      outputs_out, limits, as_json, node_key=node_key, ledger_url=ledger_url,
                      batch_file=batch_file, verifier_key=verifier_key)  # fmt: skip
        return
    if receipt_out is not None or receipt_key is not None:
        raise click.UsageError("--receipt-out and --key go with a chain of segments or shards (--node-keys)")
    bundle = bundles[0]
    payload: dict[str, Any]
    if ledger_url and node_key is None:
        from verimesh.ledger.store import Ledger
        from verimesh.settlement import verify_and_settle

        if verifier_key is None:
            raise click.UsageError("--ledger needs --verifier-key: what is recorded is signed by its writer")
        writer = load_signing_key(verifier_key)
        settled = verify_and_settle(bundle, job=job_file, ledger=Ledger.open(ledger_url), writer=writer,
                                    samples=samples, seed=seed, evidence_out=evidence_out, limits=limits,
                                    outputs_out=outputs_out)  # fmt: skip
        verdict, payload = settled.verdict, settled.to_json()
    elif node_key is not None and not ledger_url:
        verdict = run_verify(bundle, job=job_file, node_key=node_key, samples=samples, seed=seed,
                             evidence_out=evidence_out, limits=limits, check_all_digests=check_all_digests,
                             srs=srs, outputs_out=outputs_out)  # fmt: skip
        payload = verdict.to_json()
    else:
        raise click.UsageError("give exactly one of --node-key (a pinned key) or --ledger (keys from the ledger)")
    if as_json:
        emit(True, payload, "")
    elif verdict.status != "error":
        click.echo(f"{verdict.status.upper()}: {verdict.reason}")
        for check in verdict.checks:
            mark = "ok  " if check.ok else "FAIL"
            extra = f" (expected {check.expected}, got {check.got})" if not check.ok and check.expected else ""
            click.echo(f"  {mark} {check.name:<16} {check.detail}{extra}")
        if verdict.evidence:
            click.echo(f"evidence written to {verdict.evidence} (re-check: verimesh evidence check {verdict.evidence})")
        if outputs_out is not None and verdict.status == "accept":
            click.echo(f"verified outputs written to {outputs_out}")
        for entry in payload.get("ledger_entries", []):
            click.echo(f"ledger: appended entry {entry['seq']} ({entry['kind']})")
        if payload.get("ledger_note"):
            click.echo(f"ledger: {payload['ledger_note']}")
        if payload.get("equivocation_evidence"):
            slashed = any(e["kind"] == "slash" for e in payload.get("ledger_entries", []))
            click.echo(f"EQUIVOCATION: evidence written to {payload['equivocation_evidence']}"
                       + ("; the slashable stake slashed" if slashed else ""))  # fmt: skip
    if verdict.status == "error":
        click.echo(f"verimesh: error[bundle-invalid]: {verdict.reason}", err=True)
        ctx.exit(EXIT_INVALID_INPUT)
    if verdict.status == "reject":
        ctx.exit(EXIT_REJECTED)


def _verify_chain(
    ctx: click.Context, bundles: tuple[Path, ...], job_file: Path, node_keys: str | None, receipt_out: Path | None,
    receipt_key: Path | None, samples: Any, seed: int | None, evidence_out: Path | None, outputs_out: Path | None,
    limits: Any, as_json: bool, *, node_key: Path | None, ledger_url: str | None, batch_file: Path | None,
    verifier_key: Path | None,
) -> None:  # fmt: skip
    from verimesh.core.tensors import write_tensor_file
    from verimesh.subtasks.chain import verify_chain, verify_shards

    if (node_keys is None) == (not ledger_url) or node_key is not None:
        raise click.UsageError(
            "several bundles are a chain of segments or shards: give --node-keys K0,K1,... (one per bundle), "
            "or --ledger (segments: keys from the ledger, each segment settled with its node)"
        )
    if receipt_out is not None and receipt_key is None:
        raise click.UsageError("--receipt-out needs --key: the verifier's secret key signs the receipt")
    signer = load_signing_key(receipt_key) if receipt_key is not None else None
    settled: Any = None
    if ledger_url:
        from verimesh.ledger.store import Ledger
        from verimesh.settlement import settle_chain

        if batch_file is not None:
            raise click.UsageError("--ledger settles a chain of segments; shards are settled one by one")
        if verifier_key is None:
            raise click.UsageError("--ledger needs --verifier-key: what is recorded is signed by its writer")
        settled = settle_chain(bundles, job=job_file, ledger=Ledger.open(ledger_url), writer=load_signing_key(
            verifier_key), samples=samples, seed=seed, evidence_out=evidence_out, limits=limits)  # fmt: skip
        verdict, values = settled.verdict, settled.values
    elif batch_file is not None:
        keys = [Path(k) for k in str(node_keys).split(",") if k]
        verdict, values = verify_shards(bundles, job=job_file, node_keys=keys, batch=batch_file, samples=samples,
                                        seed=seed, evidence_out=evidence_out, limits=limits)  # fmt: skip
    else:
        keys = [Path(k) for k in str(node_keys).split(",") if k]
        verdict, values = verify_chain(bundles, job=job_file, node_keys=keys, samples=samples, seed=seed,
                                       evidence_out=evidence_out, limits=limits)  # fmt: skip
    payload = settled.to_json() if settled is not None else verdict.to_json()
    if verdict and outputs_out is not None:
        write_tensor_file(outputs_out, values)
    if verdict and receipt_out is not None:
        from verimesh.subtasks.receipt import receipt_body, sign_receipt, write_receipt

        assert signer is not None
        write_receipt(receipt_out, sign_receipt(receipt_body(verdict), signer))
        payload["receipt"] = str(receipt_out)
    if as_json:
        emit(True, payload, "")
    elif verdict.status != "error":
        click.echo(f"{verdict.status.upper()}: {verdict.reason}")
        for check in verdict.checks:
            click.echo(f"  {'ok  ' if check.ok else 'FAIL'} {check.name:<16} {check.detail}")
        for seg in verdict.segments:
            mark = "ok  " if seg.verdict else "FAIL"
            a, b = seg.step_range
            what = f"shard {seg.index:<10}" if verdict.kind == "shards" else f"segment {seg.index:<8} steps [{a}, {b})"
            click.echo(f"  {mark} {what} by {seg.public.node_id}: {seg.verdict.reason}; "
                       f"re-checked {list(seg.sampled_steps)}")  # fmt: skip
        if verdict.evidence:
            click.echo(f"evidence written to {verdict.evidence} (re-check: verimesh evidence check {verdict.evidence})")
        if verdict and outputs_out is not None:
            click.echo(f"verified outputs written to {outputs_out}")
        if verdict and receipt_out is not None:
            click.echo(f"receipt written to {receipt_out} (check: verimesh receipt check {receipt_out} "
                       "--verifier-key ...)")  # fmt: skip
        for entry in payload.get("ledger_entries", []):
            click.echo(f"ledger: appended entry {entry['seq']} ({entry['kind']})")
        if payload.get("ledger_note"):
            click.echo(f"ledger: {payload['ledger_note']}")
    if verdict.status == "error":
        click.echo(f"verimesh: error[bundle-invalid]: {verdict.reason}", err=True)
        ctx.exit(EXIT_INVALID_INPUT)
    if verdict.status == "reject":
        ctx.exit(EXIT_REJECTED)


@click.group(epilog=EXIT_CODES_HELP)
def evidence() -> None:
    """Evidence files written on a reject."""


@evidence.command("check", epilog=EXIT_CODES_HELP)
@click.argument("evidence_file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@click.pass_context
def evidence_check(ctx: click.Context, evidence_file: Path, as_json: bool) -> None:
    """Re-check EVIDENCE_FILE from scratch; exit 0 if it proves fraud, 1 if it does not."""
    from verimesh.spot.evidence import check_evidence

    init_runtime(ctx)
    result = check_evidence(evidence_file)
    word = "FRAUD PROVEN" if result.proves_fraud else "NOT PROVEN"
    emit(as_json, result.to_json(), f"{word} ({result.kind}) node {result.node_id}: {result.reason}")
    if not result.proves_fraud:
        ctx.exit(EXIT_REJECTED)
