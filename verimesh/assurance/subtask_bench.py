"""``verimesh bench``'s sub-tasks section: a job proven whole by one node against the same job
split into segments, each proven by its own node, and verified as one chain.

Each repeat times, back to back: ``Worker.prove`` of the whole job; each segment's prove by its
own warm worker (reading its predecessor's bundle first, as a node does); ``verify`` of the whole
bundle; ``verify_chain`` of the segments. Both verifications use the job's default policy and the
same seeds; the chain re-runs more steps (each segment's first and last steps, and every step
producing what a later segment consumes), which is the price of letting different nodes run it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any


def bench_subtasks(model: Path, input_file: Path, *, segments: int = 4, repeats: int = 5) -> dict[str, Any]:
    from verimesh.jobs.job import new_job
    from verimesh.jobs.runtime import StepRunner
    from verimesh.jobs.segments import write_segments
    from verimesh.signing.keys import generate_key
    from verimesh.subtasks.chain import verify_chain
    from verimesh.workflows import Worker, verify

    with tempfile.TemporaryDirectory(prefix="verimesh-bench-subtasks-") as tmp:
        work = Path(tmp)
        job_path = work / "job.json"
        job = new_job(model, input_file, job_path)
        count = min(segments, len(job.steps))
        parts = write_segments(job_path, count, work / "parts")
        workers = [Worker(generate_key(), device="cpu") for _ in range(count)]
        runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
        keys = [w.key.public for w in workers]

        def timed(fn: Callable[[], object]) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        def prove_segments(tag: str) -> list[float]:
            times = []
            for k, (part, view) in enumerate(parts):
                assert view.segment is not None
                before = [work / f"{tag}-s{j}.vmb" for j in view.segment.links()]
                times.append(timed(partial(workers[k].prove, part, out=work / f"{tag}-s{k}.vmb", inputs_from=before)))
            return times

        def chain(tag: str, seed: int) -> None:
            verdict, _ = verify_chain([work / f"{tag}-s{k}.vmb" for k in range(count)], job=job, node_keys=keys,
                                      seed=seed, runner=runner)  # fmt: skip
            if not verdict:
                raise RuntimeError(f"benchmark chain was rejected: {verdict.reason}")

        def whole(tag: str, seed: int) -> None:
            verdict = verify(work / f"{tag}-whole.vmb", job=job, node_key=keys[0], seed=seed, runner=runner)
            if not verdict:
                raise RuntimeError(f"benchmark bundle was rejected: {verdict.reason}")

        workers[0].prove(job, out=work / "warm-whole.vmb")  # warm-up: every session on every side
        prove_segments("warm")
        chain("warm", 0)
        verify(work / "warm-whole.vmb", job=job, node_key=keys[0], samples="all", runner=runner)
        rows = []
        for i in range(repeats):
            tag = f"r{i}"
            t_whole = timed(partial(workers[0].prove, job, out=work / f"{tag}-whole.vmb"))
            t_segments = prove_segments(tag)
            seeds = [1000 * i + s for s in range(3)]
            t_verify = statistics.fmean(timed(partial(whole, tag, s)) for s in seeds)
            t_chain = statistics.fmean(timed(partial(chain, tag, s)) for s in seeds)
            rows.append((t_whole, t_segments, t_verify, t_chain))
        verdict, _ = verify_chain([work / f"r0-s{k}.vmb" for k in range(count)], job=job, node_keys=keys, seed=1,
                                  runner=runner)  # fmt: skip
        rechecked = sum(len(s.sampled_steps) for s in verdict.segments)
        return {
            "model": model.name,
            "steps": len(job.steps),
            "segments": count,
            "ranges": [list(v.segment.range) for _, v in parts if v.segment is not None],
            "repeats": repeats,
            "whole_prove_s": statistics.median(r[0] for r in rows),
            "segment_prove_s": [statistics.median(r[1][k] for r in rows) for k in range(count)],
            # The segments run one after another (each starts from its predecessors' outputs): the
            # sum is the chain's latency; what a split buys is spreading the work and memory.
            "segments_over_whole": statistics.median(sum(r[1]) / r[0] for r in rows),
            "whole_verify_s": statistics.median(r[2] for r in rows),
            "chain_verify_s": statistics.median(r[3] for r in rows),
            "chain_over_whole_verify": statistics.median(r[3] / r[2] for r in rows),
            "chain_steps_rechecked": rechecked,
        }


def subtasks_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | steps | segments | repeats | whole prove ms | segment proves ms | sum of segments / whole "
        "| whole verify ms | chain verify ms | chain / whole verify | steps re-run by the chain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        segs = " / ".join(f"{t * 1e3:.1f}" for t in r["segment_prove_s"])
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['segments']} | {r['repeats']} | {r['whole_prove_s'] * 1e3:.2f} | "
            f"{segs} | {r['segments_over_whole']:.2f} | {r['whole_verify_s'] * 1e3:.2f} | "
            f"{r['chain_verify_s'] * 1e3:.2f} | {r['chain_over_whole_verify']:.2f} | {r['chain_steps_rechecked']} |"
        )
    return lines
