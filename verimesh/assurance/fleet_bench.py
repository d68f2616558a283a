"""``verimesh bench --only fleet``: verify throughput in process vs 1 and 2 Ray verifier actors.

One bundle of the model, verified ``bundles`` times with every step re-checked (the same work
each time, so the rates compare the verifiers, not the bundles); medians over ``repeats``. The
Ray runs share one loopback cluster whose start-up is reported apart; each actor is up (its
process started) before the clock runs, and its sessions warm up in the first repeat.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from verimesh.fleet.cluster import ray_cluster
from verimesh.fleet.verifiers import LocalVerifiers, RayVerifiers, Verifiers, VerifyTask
from verimesh.jobs.job import new_job
from verimesh.signing.keys import generate_key
from verimesh.workflows import prove


def _rate(fleet: Verifiers, tasks: list[VerifyTask], repeats: int) -> tuple[float, float]:
    """(median bundles/s, median seconds per batch); every outcome must be an accept."""
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        statuses = [o.verdict.status for o in fleet.run(tasks)]
        walls.append(time.perf_counter() - started)
        if statuses != ["accept"] * len(tasks):
            raise RuntimeError(f"fleet bench: an honest bundle was not accepted: {sorted(set(statuses))}")
    wall = statistics.median(walls)
    return len(tasks) / wall, wall


def bench_fleet(model: Path, input_file: Path, *, bundles: int = 100, repeats: int = 3) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="verimesh-fleet-bench-") as tmp:
        folder = Path(tmp)
        key = generate_key()
        job = new_job(model, input_file, folder / "job.json")
        prove(job, key=key, out=folder / "b.vmb", device="cpu")
        tasks = [VerifyTask(f"b{i}", folder / "b.vmb", folder / "job.json", key.public, "all") for i in range(bundles)]
        local_rate, local_s = _rate(LocalVerifiers(), tasks, repeats)
        rows: dict[str, Any] = {"in_process": {"bundles_per_s": local_rate, "batch_s": local_s}}
        started = time.perf_counter()
        with ray_cluster(num_cpus=2) as cluster:
            start_s = time.perf_counter() - started
            for actors in (1, 2):
                fleet = RayVerifiers(actors)
                try:
                    fleet.pids()
                    rate, wall = _rate(fleet, tasks, repeats)
                finally:
                    fleet.close()
                rows[f"ray_{actors}"] = {"bundles_per_s": rate, "batch_s": wall, "over_in_process": rate / local_rate}
    return {"model": model.name, "steps": len(job.steps), "bundles": bundles, "repeats": repeats,
            "cluster_start_s": start_s, "cluster_cpus": cluster.cpus, **rows}  # fmt: skip


def fleet_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | steps | bundles | repeats | in process bundles/s | 1 Ray actor bundles/s | ratio "
        "| 2 Ray actors bundles/s | ratio | cluster start s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        one, two = r["ray_1"], r["ray_2"]
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['bundles']} | {r['repeats']} | {r['in_process']['bundles_per_s']:.1f} "
            f"| {one['bundles_per_s']:.1f} | {one['over_in_process']:.2f} | {two['bundles_per_s']:.1f} "
            f"| {two['over_in_process']:.2f} | {r['cluster_start_s']:.1f} |"
        )
    return lines
