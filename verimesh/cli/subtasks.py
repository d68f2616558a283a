"""Sub-task commands: ``job split`` and ``receipt check|cosign`` (chain verification is ``verify``
with several bundles, in cli/jobs.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from verimesh.cli.common import EXIT_CODES_HELP, emit, force_option, json_option, load_signing_key
from verimesh.errors import EXIT_REJECTED


@click.command("split", epilog=EXIT_CODES_HELP)
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--segments", type=click.IntRange(min=1), default=None,
              help="Cut the job's steps into this many contiguous segments of about equal cost.")  # fmt: skip
@click.option("--shards", "batch_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="One sub-job per row of this .npz/.npy batch (arrays named after the model inputs, a leading "
              "batch axis; the model needs a dynamic batch axis).")  # fmt: skip
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for seg-K.json (or shard-K.json and its input), each pointing at JOB_FILE.")  # fmt: skip
@force_option
@json_option
def job_split(
    job_file: Path, segments: int | None, batch_file: Path | None, out_dir: Path, force: bool, as_json: bool
) -> None:
    """Split JOB_FILE into sub-jobs that different nodes prove: --segments N (segment K runs steps
    [a, b) and starts from the outputs of the segments before it: `prove --inputs-from`), or
    --shards BATCH (shard K is the whole job on row K of the batch)."""
    from verimesh.jobs.segments import write_segments, write_shards

    if (segments is None) == (batch_file is None):
        raise click.UsageError("give exactly one of --segments N and --shards BATCH")
    if batch_file is not None:
        shards = write_shards(job_file, batch_file, out_dir, overwrite=force)
        rows_out = [{"file": str(p), "index": k, "shard_id": v.job_id, "input_digest": v.input_digest}
                    for k, (p, v) in enumerate(shards)]  # fmt: skip
        human = f"split {job_file} into {len(shards)} shards in {out_dir} (one per row of {batch_file})"
        emit(as_json, {"job": str(job_file), "shards": rows_out}, human)
        return
    assert segments is not None
    written = write_segments(job_file, segments, out_dir, overwrite=force)
    rows: list[dict[str, Any]] = []
    for path, view in written:
        assert view.segment is not None
        sources = sorted(view.segment.links())
        rows.append({"file": str(path), "index": view.segment.index, "step_range": list(view.segment.range),
                     "segment_id": view.job_id, "inputs_from": sources,
                     "outputs": list(view.output_names)})  # fmt: skip
    lines = [f"split {job_file} into {len(rows)} segments in {out_dir}"]
    for row in rows:
        frm = ", ".join(f"seg-{k}" for k in row["inputs_from"]) or "the job's input"
        lines.append(f"  {row['file']}  steps [{row['step_range'][0]}, {row['step_range'][1]})  from {frm}")
    emit(as_json, {"job": str(job_file), "segments": rows}, "\n".join(lines))


@click.group(epilog=EXIT_CODES_HELP)
def receipt() -> None:
    """Receipts signed by verifiers for jobs verified as a chain of segments."""


@receipt.command("check", epilog=EXIT_CODES_HELP)
@click.argument("receipt_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("bundles", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--verifier-key", "verifier_keys", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="A verifier's public key the receipt must be signed by (repeat for co-signers).")  # fmt: skip
@click.option("--full", is_flag=True, help="Also verify BUNDLES again (needs --job).")
@click.option("--job", "job_file", type=click.Path(dir_okay=False, path_type=Path),
              help="With --full: the job that was split.")  # fmt: skip
@click.option("--shards", "batch_file", type=click.Path(dir_okay=False, path_type=Path),
              help="With --full, a shards receipt: the batch that was split.")  # fmt: skip
@json_option
@click.pass_context
def receipt_check(
    ctx: click.Context, receipt_file: Path, bundles: tuple[Path, ...], verifier_keys: tuple[Path, ...], full: bool,
    job_file: Path | None, batch_file: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Check RECEIPT_FILE offline: the verifiers' aggregate signature and the chain of digests;
    with --full, verify the BUNDLES again. Exit 0 if it holds, 1 if it does not."""
    from verimesh.signing.keys import load_public_key
    from verimesh.subtasks.receipt import check_receipt, load_receipt, recheck_receipt

    if full and (job_file is None or not bundles):
        raise click.UsageError("--full needs --job JOB and the bundles: receipt check R --full --job J s0.vmb ...")
    if bundles and not full:
        raise click.UsageError("bundles are re-verified only with --full")
    doc = load_receipt(receipt_file)
    result = check_receipt(doc, [load_public_key(k) for k in verifier_keys])
    payload: dict[str, Any] = result.to_json()
    if result.ok and full:
        assert job_file is not None
        from verimesh.cli.common import init_runtime

        init_runtime(ctx)
        again = recheck_receipt(doc, job=job_file, bundles=bundles, batch=batch_file)
        payload = {**again.to_json(), "signatures": result.reason}
        result = again
    emit(as_json, payload, f"{'HOLDS' if result.ok else 'DOES NOT HOLD'}: {result.reason}")
    if not result.ok:
        ctx.exit(EXIT_REJECTED)


@receipt.command("cosign", epilog=EXIT_CODES_HELP)
@click.argument("receipt_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The co-signing verifier's secret key.")  # fmt: skip
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the co-signed receipt here (default: in place).")  # fmt: skip
@json_option
def receipt_cosign(receipt_file: Path, key_file: Path, out: Path | None, as_json: bool) -> None:
    """Add a verifier's signature to RECEIPT_FILE (aggregated with the others). Co-sign only what
    you verified: run `receipt check --full` first."""
    from verimesh.subtasks.receipt import cosign_receipt, load_receipt, write_receipt

    key = load_signing_key(key_file)
    doc = cosign_receipt(load_receipt(receipt_file), key)
    target = out or receipt_file
    write_receipt(target, doc)
    emit(as_json, {"receipt": str(target), "signers": doc["signers"]},
         f"co-signed {target} as {key.node_id} ({len(doc['signers'])} signers)")  # fmt: skip
