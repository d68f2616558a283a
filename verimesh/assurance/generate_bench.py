"""``verimesh bench --only generate``: generation with and without the proof, and its verification.

Each repeat times plain greedy generation (the same decode loop with the KV cache, choosing the
argmax and committing nothing), ``Worker.prove`` of the generate job (records, the self-check
that the verifier's pass accepts the answer, seal, signature, bundle file), the same without the
self-check, and ``verify`` with every position checked (one prefill pass over prompt + answer),
back to back with warm sessions; medians, ratios medians of per-repeat ratios.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from verimesh.jobs.generate_job import new_generate_job
from verimesh.jobs.generation import generate
from verimesh.jobs.runtime import StepRunner
from verimesh.signing.keys import generate_key
from verimesh.workflows import Worker, shared_runner, verify

PROVE_TARGET = 1.05  # prove / plain generation
VERIFY_TARGET = 0.10  # verify (all positions) / generation
MIN_JUDGED_GENERATION_S = 0.5  # below this, fixed costs (a BLS signature, a file) are what a ratio measures


def bench_generate(model: Path, prompt: Path, *, new_tokens: int = 128, repeats: int = 5) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="verimesh-bench-generate-") as tmp:
        work = Path(tmp)
        job = new_generate_job(model, prompt, work / "job.json", max_new_tokens=new_tokens)
        spec = job.generate
        assert spec is not None
        key = generate_key()
        worker = Worker(key, device="cpu")
        unchecked = Worker(key, device="cpu", self_check=False)  # the commitment alone, no pre-signing check
        runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
        blob = job.read_step_model(0)
        digest = job.steps[0].digest
        prompt_ids = job.read_input()["input_ids"]

        def run(feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
            return runner.run(digest, blob, feeds, names)

        def plain() -> int:
            return len(generate(run, spec, prompt_ids, job.nonce, lambda _t, _logits: None))

        verifier = shared_runner(job.policy.precision, job.policy.optimization)
        plain()  # warm every session first
        bundle = worker.prove(job, out=work / "warm.vmb").bundle
        unchecked.prove(job, out=work / "warm-unchecked.vmb")
        verify(bundle, job=job, node_key=key.public, samples="all", runner=verifier)
        rows = []
        for i in range(repeats):
            started = time.perf_counter()
            tokens = plain()
            plain_s = time.perf_counter() - started
            started = time.perf_counter()
            proved = worker.prove(job, out=work / f"gen-{i}.vmb")
            prove_s = time.perf_counter() - started
            started = time.perf_counter()
            unchecked.prove(job, out=work / f"unchecked-{i}.vmb")
            unchecked_s = time.perf_counter() - started
            started = time.perf_counter()
            verdict = verify(proved.bundle, job=job, node_key=key.public, samples="all", runner=verifier)
            verify_s = time.perf_counter() - started
            if verdict.status != "accept":
                raise RuntimeError(f"the bench's honest generation was rejected: {verdict.reason}")
            rows.append((plain_s, prove_s, verify_s, tokens, proved.bytes_written, unchecked_s))
        plain_s = statistics.median(r[0] for r in rows)
        tokens = rows[-1][3]
        size = rows[-1][4]
        return {
            "model": model.name, "new_tokens": tokens, "repeats": repeats, "layers": len(spec.layout.past),
            "vocab": spec.layout.vocab, "plain_s": plain_s, "prove_s": statistics.median(r[1] for r in rows),
            "verify_s": statistics.median(r[2] for r in rows),
            "plain_tokens_per_s": tokens / plain_s,
            "prove_over_plain": statistics.median(r[1] / r[0] for r in rows),
            "unchecked_prove_s": statistics.median(r[5] for r in rows),
            "unchecked_over_plain": statistics.median(r[5] / r[0] for r in rows),
            "verify_over_generation": statistics.median(r[2] / r[0] for r in rows),
            "bundle_bytes": size, "bytes_per_token": size / max(tokens, 1),
        }  # fmt: skip


def generate_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | layers | vocab | tokens | repeats | plain tokens/s | plain ms | prove ms | prove / plain "
        "| prove without self-check / plain | verify ms (all positions) | verify / generation | bundle KB "
        "| bytes / token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['vocab']} | {r['new_tokens']} | {r['repeats']} | "
            f"{r['plain_tokens_per_s']:.0f} | {r['plain_s'] * 1e3:.1f} | {r['prove_s'] * 1e3:.1f} | "
            f"{r['prove_over_plain']:.2f} | {r['unchecked_over_plain']:.2f} | {r['verify_s'] * 1e3:.1f} | "
            f"{r['verify_over_generation']:.3f} | "
            f"{r['bundle_bytes'] / 1024:.1f} | {r['bytes_per_token']:.0f} |"
        )
    return lines
