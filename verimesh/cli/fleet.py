"""verimesh verify-many: a batch audit of many bundles, in this process or on a Ray verifier fleet."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from verimesh.cli.common import EXIT_CODES_HELP, SamplesType, emit, init_runtime, json_option, plural
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
        click.echo(f"{plural(len(results), 'bundle')}: {counts['accept']} accepted, {counts['reject']} rejected, "
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


@click.command(epilog=EXIT_CODES_HELP)
@click.option("--nodes", type=click.IntRange(1, 1_000_000), default=1000, show_default=True, help="Simulated nodes.")
@click.option(
    "--jobs",
    type=click.IntRange(1, 100_000_000),
    default=100_000,
    show_default=True,
    help="Simulated jobs (the analytic model).",
)
@click.option(
    "--cheaters",
    default="lazy:3%,perturb:1%,equivocate:0.5%",
    show_default=True,
    help="Share of the nodes playing each cheating strategy (lazy, perturb, equivocate).",
)
@click.option(
    "--audit",
    default="adaptive",
    show_default=True,
    help="adaptive (the ledger's policy), full (every step), or K samples per job beside the last.",
)
@click.option("--stake", type=click.IntRange(min=1), default=1000, show_default=True, help="Each node's stake.")
@click.option("--reward", type=click.IntRange(min=1), default=1, show_default=True, help="Reward per accepted answer.")
@click.option(
    "--gain",
    type=float,
    default=1.0,
    show_default=True,
    help="What a wrong result accepted (perturb) or a second one sold (equivocate) is worth to the cheater.",
)
@click.option(
    "--work-cost",
    type=float,
    default=0.5,
    show_default=True,
    help="An honest answer's compute cost, as a share of the reward (lazy saves part of it).",
)
@click.option("--lazy-fraction", type=float, default=0.25, show_default=True, help="Share of the work lazy skips.")
@click.option("--slash-fraction", default="0.5", show_default=True, help="Share of the stake a fraud slash takes.")
@click.option(
    "--replicas",
    type=click.IntRange(1, 8),
    default=1,
    show_default=True,
    help="Nodes per job (quorum; disagreement calls the referee).",
)
@click.option(
    "--drop",
    type=float,
    default=0.01,
    show_default=True,
    help="Chance a node misses a task's deadline (the task is reassigned).",
)
@click.option(
    "--real",
    type=click.IntRange(min=0),
    default=500,
    show_default=True,
    help="Jobs run through real prove, verify and ledger settlement (0: none; the check needs 500).",
)
@click.option(
    "--model",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The workload's ONNX model (default: a built-in 7-layer MLP).",
)
@click.option(
    "--input",
    "input_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The model's input (with --model).",
)
@click.option("--steps", type=click.IntRange(1, 12), default=6, show_default=True, help="Steps the job is cut into.")
@click.option(
    "--shards",
    type=click.IntRange(1, 4096),
    default=8,
    show_default=True,
    help="Simulated nodes are cut into at most this many shards of at least 100 nodes, each scheduling its own "
    "(the same report in process and on Ray).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="The run's randomness: the same seed and options give the same results (timings aside).",
)
@click.option(
    "--ray", "use_ray", is_flag=True, help="Run the shards on Ray actors (a local loopback cluster, or $RAY_ADDRESS)."
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option(
    "--plot",
    "plot_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draw profit by strategy and wrong results accepted against the audit rate (PNG).",
)
@click.pass_context
def simulate(ctx: click.Context, nodes: int, jobs: int, cheaters: str, audit: str, stake: int, reward: int, gain: float,
             work_cost: float, lazy_fraction: float, slash_fraction: str, replicas: int, drop: float, real: int,
             model: Path | None, input_file: Path | None, steps: int, shards: int, seed: int, use_ray: bool,
             json_out: Path | None, plot_out: Path | None) -> None:  # fmt: skip
    """Simulate the mesh: real jobs through prove, verify and the ledger for the rates, an analytic
    model of the protocol for the scale. Prints a table; exit 0, or 1 when an honest node was
    slashed (the policy rejected an honest node)."""
    import json

    from verimesh.assurance import simulate as sim

    init_runtime(ctx)
    if (model is None) != (input_file is None):
        raise click.UsageError("--model and --input go together")
    config = sim.Config(nodes=nodes, jobs=jobs, cheaters=sim.parse_cheaters(cheaters), audit=sim.parse_audit(audit),
                        stake=stake, reward=reward, gain=gain, work_cost=work_cost, lazy_fraction=lazy_fraction,
                        slash_fraction=slash_fraction, replicas=replicas, drop=drop, real=real, seed=seed,
                        shards=shards, steps=steps)  # fmt: skip
    sim.check_config(config)

    def say(message: str) -> None:
        click.echo(f"verimesh: {message}", err=True)

    if plot_out is not None:
        _plot_backend()
    if use_ray:
        from verimesh.fleet.cluster import parse_verifiers, ray_cluster
        from verimesh.fleet.parallel import map_on_ray

        _, address = parse_verifiers("ray")
        with ray_cluster(address) as cluster:
            actors = max(1, int(cluster.cpus))
            say(f"Ray cluster at {cluster.address}: {actors} simulation actors")

            def on_ray(shards: Sequence[sim.Shard]) -> list[dict[str, Any]]:
                return map_on_ray(sim.run_shard, shards, actors=actors)

            report = sim.run_simulation(config, model=model, input_file=input_file, sweep=plot_out is not None,
                                        runner=on_ray,
                                        progress=say)  # fmt: skip
            report["speed"]["runner"] = f"ray ({actors} actors)"
    else:
        report = sim.run_simulation(config, model=model, input_file=input_file, sweep=plot_out is not None,
                                    progress=say)  # fmt: skip
        report["speed"]["runner"] = "this process"
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if plot_out is not None:
        sim.plot(report, plot_out)
    click.echo(sim.summary(report))
    if report["honest_slashed"]:
        ctx.exit(EXIT_REJECTED)


def _plot_backend() -> None:
    """Refuse --plot before the run, not after it, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from verimesh.errors import BackendUnavailableError

        raise BackendUnavailableError("--plot needs matplotlib", hint="pip install matplotlib") from None
