"""What a job owner does with a bundle besides verifying it: ``outputs`` (the verified values) and
``bundle show`` (what a bundle holds, read without verifying)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from verimesh.cli.common import EXIT_CODES_HELP, SamplesType, emit, init_runtime, json_option, srs_option
from verimesh.errors import EXIT_REJECTED, InvalidInputError


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("bundles", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--job", "job_file", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--node-key", type=click.Path(dir_okay=False, path_type=Path), help="The node's public key file.")
@click.option("--node-keys", default=None,
              help="A split job: the nodes' public key files, comma-separated, one per bundle in order.")  # fmt: skip
@click.option("--shards", "batch_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A job split into shards: the batch that was split (outputs joined into the batch).")  # fmt: skip
@click.option(
    "--ledger", "ledger_url", default=None,
    help="Ledger URL instead of --node-key: the signer's registered key and the audit policy in force (read only: "
    "nothing is recorded; `verify --ledger` records).",
)  # fmt: skip
@click.option(
    "--samples", type=SamplesType(), default=None, help="Steps checked beside the last (default: the job's policy)."
)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Sampling seed, for reproducible audits.")
@click.option("--unverified", is_flag=True, help="Print the values without verifying the bundle (a warning says so).")
@click.option(
    "-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the values to OUT (.npz or .json)."
)
@srs_option
@json_option
@click.pass_context
def outputs(
    ctx: click.Context,
    bundles: tuple[Path, ...],
    job_file: Path,
    node_key: Path | None,
    node_keys: str | None,
    batch_file: Path | None,
    ledger_url: str | None,
    samples: Any,
    seed: int | None,
    unverified: bool,
    out: Path | None,
    srs: Path | None,
    as_json: bool,
) -> None:
    """The output values of a bundle, after verifying it exactly as `verify` does (exit 1 and no
    values on a reject). With -o they are written to a file; else printed. A split job: every
    segment's bundle (or every shard's, with --shards) and --node-keys; verified as one job."""
    from verimesh.jobs.bundle import read_bundle
    from verimesh.jobs.job import load_job
    from verimesh.workflows import verified_outputs

    init_runtime(ctx)
    job = load_job(job_file)
    if node_keys is not None or len(bundles) > 1 or batch_file is not None:
        if node_keys is None or unverified or node_key is not None or ledger_url is not None:
            raise click.UsageError("a split job's bundles take --node-keys (one per bundle), verified together")
        from verimesh.subtasks.chain import verify_chain, verify_shards

        keys = [Path(k) for k in node_keys.split(",") if k]
        if batch_file is not None:
            chain, values = verify_shards(
                bundles, job=job, node_keys=keys, batch=batch_file, samples=samples, seed=seed
            )
        else:
            chain, values = verify_chain(bundles, job=job, node_keys=keys, samples=samples, seed=seed)
        if chain.status == "error":
            raise InvalidInputError(chain.reason, code="bundle-invalid")
        if not chain:
            emit(as_json, {**chain.to_json(), "values": None}, f"REJECT: {chain.reason}")
            ctx.exit(EXIT_REJECTED)
        _show(job, values, out, True, "accept", as_json)
        return
    bundle = bundles[0]
    if job.segment is not None and not unverified:
        raise InvalidInputError(
            "a segment's outputs are verified only as part of its chain",
            hint="verify every segment's bundle together: verify s0.vmb s1.vmb ... --job JOB --node-keys ... "
            "--outputs-out FILE",
        )
    if unverified:
        parsed = read_bundle(bundle, version=job.version)
        values = {n: parsed.tensors[n] for n in job.output_names if n in parsed.tensors}
        click.echo("verimesh: warning: --unverified: these values are the node's claim, not verified", err=True)
        verdict = None
    else:
        key: Any = node_key
        if (node_key is None) == (ledger_url is None):
            raise click.UsageError("give exactly one of --node-key or --ledger (or --unverified)")
        if ledger_url is not None:
            from verimesh.ledger.store import Ledger
            from verimesh.settlement import registered_signer

            key, in_force = registered_signer(bundle, job=job, ledger=Ledger.open(ledger_url))
            samples = in_force if samples is None else samples
        verdict, values = verified_outputs(bundle, job=job, node_key=key, samples=samples, seed=seed, srs=srs)
        if verdict.status == "error":
            raise InvalidInputError(verdict.reason, code="bundle-invalid")
        if not verdict:
            payload = {**verdict.to_json(), "values": None}
            emit(as_json, payload, f"REJECT: {verdict.reason}")
            ctx.exit(EXIT_REJECTED)
    _show(job, values, out, verdict is not None, verdict.status if verdict else None, as_json)


def _show(
    job: Any, values: dict[str, Any], out: Path | None, verified: bool, status: str | None, as_json: bool
) -> None:
    from verimesh.core.tensors import tensors_to_json, write_tensor_file

    if out is not None:
        write_tensor_file(out, values)
    text, generated = None, {}
    if getattr(job, "mode", None) == "generate" and "tokens" in values:
        from verimesh.jobs.generate_job import generated_text

        text = generated_text(job, values["tokens"])
        generated = {"token_ids": [int(t) for t in values["tokens"].reshape(-1)]}
    payload = {
        "verified": verified,
        "verdict": status,
        "job_id": job.job_id,
        "outputs": {n: str(v.dtype) + str(list(v.shape)) for n, v in values.items()},
        "written": str(out) if out else None,
        **({} if out else {"values": tensors_to_json(values)}),
        **generated,
        **({} if text is None else {"text": text}),
    }
    human = [f"{'VERIFIED' if verified else 'UNVERIFIED'} outputs of job {job.job_id[:19]}…"]
    for name, value in values.items():
        human.append(f"{name}: {value.dtype}{list(value.shape)}")
        if out is None:
            human.append(json.dumps(value.tolist()) if value.size <= 64 else f"  ({value.size} values: use -o)")
    if text is not None:
        human.append(f"text: {text}")
    if out is not None:
        human.append(f"wrote {out}")
    emit(as_json, payload, "\n".join(human))


@click.group(epilog=EXIT_CODES_HELP)
def bundle() -> None:
    """Inspect bundle files."""


@bundle.command("show", epilog=EXIT_CODES_HELP)
@click.argument("bundle_file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def bundle_show(bundle_file: Path, as_json: bool) -> None:
    """What BUNDLE_FILE holds: format, members, trace, signers and the signed claim. Nothing is
    verified here (use `verimesh verify`)."""
    from verimesh.jobs.bundle import read_bundle

    parsed = read_bundle(bundle_file)
    try:
        statement = parsed.envelope.statement()
    except InvalidInputError:  # shown as it is: nothing here is verified
        statement = {}
    pred = statement.get("predicate", {}) if isinstance(statement, dict) else {}
    members = [{"name": name, "bytes": data.nbytes} for name, data in parsed.members] or [
        {"name": e.name, "bytes": int(parsed.tensors[e.name].nbytes)} for e in parsed.trace
    ]
    payload = {
        "bundle": str(bundle_file),
        "format": parsed.version,
        "bytes": bundle_file.stat().st_size,
        "signers": [s.keyid for s in parsed.envelope.signatures],
        "predicate_type": statement.get("predicateType"),
        "job_id": pred.get("job_id"),
        "node_id": pred.get("node_id"),
        "step_range": pred.get("step_range"),
        "commitment": pred.get("commitment"),
        "subjects": {s["name"]: "sha256:" + s["digest"]["sha256"] for s in statement.get("subject", [])},
        "trace": [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape)} for e in parsed.trace],
        "proofs": len(parsed.proofs),
        "members": members,
        "problems": [{"member": m, "problem": p} for m, p in parsed.problems],
        "opened": None if parsed.opened is None else {"members": len(parsed.members), "of": parsed.size},
        "verified": False,
    }
    lines = [
        f"bundle {bundle_file} (format {parsed.version}, {payload['bytes']} bytes, not verified)",
        f"  job      {payload['job_id']}",
        f"  node     {payload['node_id']} (signed by {', '.join(payload['signers'])})",
        f"  steps    {payload['step_range']}, {len(parsed.trace)} trace tensors, {len(parsed.proofs)} proofs",
    ]
    commitment = payload["commitment"]
    if isinstance(commitment, dict):
        lines.append(f"  root     {commitment.get('root')} ({commitment.get('algorithm')}, {commitment.get('leaves')})")
    if parsed.opened is not None:
        lines.append(f"  opened   {len(parsed.members)} of {parsed.size} members (a challenge's answer: it verifies "
                     "with the seed and samples it was challenged with)")  # fmt: skip
    lines += [f"  output   {name} {digest}" for name, digest in payload["subjects"].items()]
    lines += [f"  PROBLEM  {p['member']}: {p['problem']}" for p in payload["problems"]]
    emit(as_json, payload, "\n".join(lines))
