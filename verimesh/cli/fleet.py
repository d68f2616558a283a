"""verimesh verify-many: a batch audit of many bundles, in this process or on a Ray verifier fleet."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from verimesh.cli.common import EXIT_CODES_HELP, SamplesType, emit, init_runtime, json_option
from verimesh.errors import EXIT_INVALID_INPUT, EXIT_REJECTED, InvalidInputError

MAX_JOB_FILES = 10_000


def index_jobs(folder: Path) -> dict[str, Path]:
    """Job id -> job file, for every ``*.json`` in ``folder`` (and one level below) that is a job
    document; other JSON files are passed over. A job id pins the document and, through its
    digests, the step files beside it: of several files with one id, the first whose step files
    all match is taken (a stale or broken copy sorting first must not hide the good one)."""
    from verimesh.jobs.job import load_job

    if not folder.is_dir():
        raise InvalidInputError(f"--jobs-from {folder} is not a folder")
    found: dict[str, list[Path]] = {}
    candidates = sorted([*folder.glob("*.json"), *folder.glob("*/*.json")])
    if len(candidates) > MAX_JOB_FILES:
        raise InvalidInputError(f"--jobs-from {folder} holds more than {MAX_JOB_FILES} JSON files")
    for path in candidates:
        try:
            if path.is_file() and path.stat().st_size < 64 * 1024 * 1024:
                found.setdefault(load_job(path).job_id, []).append(path)
        except (InvalidInputError, OSError, ValueError, RecursionError):  # not a job document: passed over
            continue
    return {job_id: paths[0] if len(paths) == 1 else _intact(paths) for job_id, paths in found.items()}


def _intact(paths: list[Path]) -> Path:
    """The first of several copies of one job whose step files all match their digests (else the first)."""
    from verimesh.jobs.job import load_job

    for path in paths:
        try:
            job = load_job(path)
            for index in range(len(job.steps)):
                job.read_step_model(index)
        except (InvalidInputError, OSError, ValueError, RecursionError):
            continue
        return path
    return paths[0]


def _named_job(bundle: Path) -> tuple[str | None, str | None]:
    """(the job id the bundle's statement names, None), or (None, why) when it cannot be read."""
    from verimesh.jobs.bundle import read_bundle

    try:
        predicate = read_bundle(bundle).envelope.statement()["predicate"]
    except InvalidInputError as exc:
        return None, exc.message
    except (KeyError, TypeError, ValueError):
        return None, "its statement names no job"
    job_id = predicate.get("job_id") if isinstance(predicate, dict) else None
    return (job_id, None) if isinstance(job_id, str) else (None, "its statement names no job")


@click.command("verify-many", epilog=EXIT_CODES_HELP)
@click.argument("bundles", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--jobs-from",
    "jobs_from",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="A folder of job files (*.json): each bundle is verified against the job its statement names.",
)
@click.option(
    "--node-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The public key every bundle must be signed by.",
)
@click.option(
    "--ledger",
    "ledger_url",
    envvar="VERIMESH_LEDGER",
    default=None,
    help="Instead of --node-key: each bundle's signer and audit policy from this ledger (read only).",
)
@click.option(
    "--verifiers",
    default="local",
    show_default=True,
    help="local (this process), ray (a local loopback Ray cluster, or $RAY_ADDRESS), or ray://HOST:PORT.",
)
@click.option(
    "--actors",
    type=click.IntRange(1, 256),
    default=None,
    help="Ray verifier actors (default: the cluster's CPUs, at most the bundles).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=600.0,
    show_default=True,
    help="Seconds one bundle may take (enforced on Ray, where a verifier can be killed).",
)
@click.option("--samples", type=SamplesType(), default=None, help="Steps checked beside the last (default: policy).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Sampling seed (the same for every bundle).")
@json_option
@click.pass_context
def verify_many(ctx: click.Context, bundles: tuple[Path, ...], jobs_from: Path, node_key: Path | None,
                ledger_url: str | None, verifiers: str, actors: int | None, timeout: float, samples: Any,
                seed: int | None, as_json: bool) -> None:  # fmt: skip
    """Verify many bundles, each against the job its statement names (found in --jobs-from) and the
    key it must be signed by; one line per bundle and a summary. Exit 0 every bundle accepted, 1 any
    rejected, 3 none rejected but some could not be verified (no job, unreadable, unregistered)."""
    from verimesh.fleet.cluster import parse_verifiers
    from verimesh.fleet.verifiers import VerifyOutcome, VerifyTask, failed

    init_runtime(ctx)
    if (node_key is None) == (ledger_url is None):
        raise click.UsageError("give exactly one of --node-key (one pinned key) or --ledger (keys from the ledger)")
    kind, address = parse_verifiers(verifiers)
    jobs = index_jobs(jobs_from)
    tasks: list[VerifyTask] = []
    undecided: list[VerifyOutcome] = []
    pinned = None
    if node_key is not None:
        from verimesh.signing.keys import load_public_key

        pinned = load_public_key(node_key)
    ledger = None
    if ledger_url is not None:
        from verimesh.ledger.store import Ledger

        ledger = Ledger.open(ledger_url)
    for bundle in bundles:
        job_id, why = _named_job(bundle)
        if job_id is None or job_id not in jobs:
            reason = f"unreadable: {why}" if job_id is None else f"no job {job_id} in {jobs_from}"
            undecided.append(failed(str(bundle), reason, "none"))
            continue
        if pinned is not None:
            tasks.append(VerifyTask(str(bundle), bundle, jobs[job_id], pinned, samples, seed, job_id))
            continue
        from verimesh.settlement import registered_signer

        assert ledger is not None
        try:
            public, in_force = registered_signer(bundle, job=jobs[job_id], ledger=ledger)
        except InvalidInputError as exc:
            undecided.append(failed(str(bundle), exc.message, "none"))
            continue
        tasks.append(VerifyTask(str(bundle), bundle, jobs[job_id], public, samples if samples is not None
                                else in_force, seed, job_id))  # fmt: skip
    outcomes = {o.label: o for o in undecided}
    fleet_note, start_s, wall = _run(kind, address, actors, tasks, timeout, outcomes)
    results = [_row(outcomes[str(b)]) for b in bundles]
    counts = {s: sum(1 for r in results if r["verdict"] == s) for s in ("accept", "reject", "error")}
    summary = {"bundles": len(results), **counts, "verifiers": fleet_note, "seconds": round(wall, 4),
               "cluster_start_s": round(start_s, 4),
               "bundles_per_s": round(len(tasks) / wall, 3) if wall > 0 and tasks else None}  # fmt: skip
    if as_json:
        emit(True, {"results": results, "summary": summary}, "")
    else:
        for r in results:
            job = (r["job_id"] or "-")[:19]
            click.echo(f"{r['verdict'].upper():<7} {r['bundle']}  job {job}  {r['reason']}")
        click.echo(f"{len(results)} bundles: {counts['accept']} accepted, {counts['reject']} rejected, "
                   f"{counts['error']} not verified; {wall:.2f} s on {fleet_note}"
                   + (f" (after {start_s:.1f} s to start it)" if start_s else ""))  # fmt: skip
    if counts["reject"]:
        ctx.exit(EXIT_REJECTED)
    if counts["error"]:
        ctx.exit(EXIT_INVALID_INPUT)


def _run(kind: str, address: str | None, actors: int | None, tasks: list[Any], timeout: float,
         outcomes: dict[str, Any]) -> tuple[str, float, float]:  # fmt: skip
    """Run the tasks; (what ran them, seconds to start the fleet, seconds verifying)."""
    from verimesh.fleet.verifiers import LocalVerifiers, RayVerifiers

    started = time.perf_counter()
    if kind == "local" or not tasks:
        for outcome in LocalVerifiers().run(tasks, timeout=timeout):
            outcomes[outcome.label] = outcome
        return "local (this process)", 0.0, time.perf_counter() - started
    from verimesh.fleet.cluster import ray_cluster

    with ray_cluster(address, num_cpus=None) as cluster:
        count = actors or max(1, min(len(tasks), int(cluster.cpus) or 1, os.cpu_count() or 1))
        fleet = RayVerifiers(count)
        try:
            fleet.pids()  # every actor up (and its process started) before the clock runs
            ready = time.perf_counter()
            for outcome in fleet.run(tasks, timeout=timeout):
                outcomes[outcome.label] = outcome
            wall = time.perf_counter() - ready
        finally:
            fleet.close()
        where = "a local loopback Ray cluster" if cluster.local else f"the Ray cluster at {cluster.address}"
        return f"{count} Ray verifier actor{'s' if count > 1 else ''} on {where}", ready - started, wall


def _row(outcome: Any) -> dict[str, Any]:
    verdict = outcome.verdict
    return {
        "bundle": outcome.label, "verdict": verdict.status, "reason": verdict.reason, "job_id": verdict.job_id,
        "node_id": verdict.node_id, "seed": verdict.seed, "sampled_steps": list(verdict.sampled_steps),
        "evidence": verdict.evidence, "verifier": outcome.verifier, "seconds": round(outcome.seconds, 6),
    }  # fmt: skip
