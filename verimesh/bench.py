"""Spot-check benchmarks (DESIGN §6): ratios measured in one process, medians after warm-up.

- prove overhead = ``Worker.prove`` (run steps, hash, Merkle, sign, write bundle) / plain
  onnxruntime inference of the whole model with the same optimization level, both warm;
- verify cost = ``verify`` at the job's default policy / the same plain inference (a job owner's
  alternative is re-running the whole model). The verifier's sample is random, so its median is
  taken over one seed per repeat.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROVE_TARGET = 1.25
VERIFY_TARGET = 0.35


@dataclass(frozen=True)
class SpotBench:
    model: str
    steps: int
    samples: int
    repeats: int
    inference_s: float
    prove_s: float
    verify_s: float
    verify_mean_s: float
    verify_all_s: float
    bundle_bytes: int

    @property
    def prove_overhead(self) -> float:
        return self.prove_s / self.inference_s

    @property
    def verify_ratio(self) -> float:
        return self.verify_s / self.inference_s

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "prove_overhead": round(self.prove_overhead, 4),
            "verify_ratio": round(self.verify_ratio, 4),
            "prove_target_met": self.prove_overhead <= PROVE_TARGET,
            "verify_target_met": self.verify_ratio <= VERIFY_TARGET,
        }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from verimesh.runtime import onnxruntime_version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime_version(),
        "platform": platform.platform(),
    }


def _median_time(fn: Callable[[int], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    for i in range(warmup):
        fn(-1 - i)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times), statistics.fmean(times)


def _input_for(model: Path) -> Path | None:
    candidate = model.with_name(model.stem + ".input.npy")
    return candidate if candidate.exists() else None


def bench_spot(model: Path, *, repeats: int = 7, input_file: Path | None = None) -> SpotBench:
    import onnxruntime as ort

    from verimesh.job import new_job
    from verimesh.keys import generate_key
    from verimesh.plan import load_model, model_io
    from verimesh.runtime import StepRunner
    from verimesh.workflows import Worker, verify

    with tempfile.TemporaryDirectory(prefix="verimesh-bench-") as tmp:
        work = Path(tmp)
        input_file = input_file or _input_for(model)
        if input_file is None:  # random input of the model's shape (symbolic dims = 1)
            specs = model_io(load_model(model)[0])[0]
            rng = np.random.default_rng(0)
            tensors = {
                s.name: rng.standard_normal([d if isinstance(d, int) and d > 0 else 1 for d in s.shape or ()]).astype(
                    s.dtype
                )
                for s in specs
            }
            input_file = work / "input.npz"
            np.savez(input_file, **tensors)  # type: ignore[arg-type]
        job = new_job(model, input_file, work / "job.json")
        feeds = job.read_input()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.log_severity_level = 3
        plain = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
        inference, _ = _median_time(lambda i: plain.run(None, feeds), repeats, warmup=2)
        worker = Worker(generate_key(), device="cpu")
        bundle = work / "result.vmb"
        # A worker writes a new file per job; each timed prove does too (replacing one file by
        # another would time the file system freeing the old one).
        prove_s, _ = _median_time(lambda i: worker.prove(job, out=work / f"result-{i}.vmb"), repeats, warmup=2)
        (work / "result-0.vmb").replace(bundle)
        public = worker.key.public
        verifier = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
        verify_all, _ = _median_time(
            lambda i: verify(bundle, job=job, node_key=public, samples="all", runner=verifier, seed=0), repeats
        )

        def verify_default(i: int) -> None:
            verdict = verify(bundle, job=job, node_key=public, runner=verifier, seed=1000 + i)
            if not verdict:
                raise RuntimeError(f"benchmark bundle was rejected: {verdict.reason}")

        verify_s, verify_mean = _median_time(verify_default, max(repeats, 15))
        return SpotBench(
            model=model.name,
            steps=len(job.steps),
            samples=job.policy.samples,
            repeats=repeats,
            inference_s=inference,
            prove_s=prove_s,
            verify_s=verify_s,
            verify_mean_s=verify_mean,
            verify_all_s=verify_all,
            bundle_bytes=bundle.stat().st_size,
        )


def markdown_table(results: list[SpotBench], info: dict[str, Any]) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, onnxruntime {info['onnxruntime']}",
        "",
        "| model | steps | inference ms | prove ms | prove / inference | verify ms (median, mean) "
        "| verify / inference | verify all ms | bundle KB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.steps} | {r.inference_s * 1e3:.2f} | {r.prove_s * 1e3:.2f} | "
            f"{r.prove_overhead:.2f} (≤ {PROVE_TARGET}) | {r.verify_s * 1e3:.2f}, {r.verify_mean_s * 1e3:.2f} | "
            f"{r.verify_ratio:.2f} (≤ {VERIFY_TARGET}) | {r.verify_all_s * 1e3:.2f} | {r.bundle_bytes / 1024:.1f} |"
        )
    return "\n".join(lines) + "\n"
