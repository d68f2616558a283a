"""Tolerance calibration (docs/design.md §4): per step, from honest variations and from cheats.

Honest variations are what a real mesh will see from honest workers: onnxruntime on CPU at every
graph optimization level and at one and two threads (and, with a GPU, the CUDA provider with TF32
off). Cheats are what a dishonest worker would try to save work or substitute: the step's float
weights cast to fp16 and to bf16, perturbed by 1e-3, and replaced by another model's (the same
weights shuffled). Each variation re-runs every step from the reference step inputs, so nothing
compounds. A step's tolerance is its honest maximum times ``headroom``; a profile is refused when
that reaches the smallest cheat value, naming the step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from verimesh.core.canonical import canonical_json
from verimesh.core.digest import sha256_bytes
from verimesh.errors import InvalidInputError
from verimesh.jobs.tolerance import DEFAULT_TOLERANCES, PROFILE_TYPE, Tolerance, compare_tensors

DEFAULT_HEADROOM = 10.0
FLOOR = 1e-7  # no tolerance is set below this (float32 noise around values near 1e-1)


def _bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest even on the top 16 bits) and back."""
    bits = a.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


CHEATS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "weights-fp16": lambda w, rng: w.astype(np.float16).astype(np.float32),
    "weights-bf16": lambda w, rng: _bf16(w),
    "weights-perturbed-1e-3": lambda w, rng: (w * (1 + 1e-3 * rng.standard_normal(w.shape))).astype(np.float32),
    "substituted-model": lambda w, rng: rng.permutation(w.reshape(-1)).reshape(w.shape).astype(np.float32),
}


Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def cheat_step(blob: bytes, cheat: str | Transform, seed: int = 0) -> bytes | None:
    """The step model with its float32 weights altered by ``cheat``; None when nothing changes."""
    model = onnx.load_model_from_string(blob)
    rng = np.random.default_rng(seed)
    changed = False
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and int(np.prod(init.dims)) > 1:
            w = numpy_helper.to_array(init)
            altered = (CHEATS[cheat] if isinstance(cheat, str) else cheat)(w, rng)
            if np.array_equal(altered, w):
                continue  # e.g. LayerNorm's ones and zeros: fp16, bf16 and shuffling leave them as they are
            init.CopyFrom(numpy_helper.from_array(altered, init.name))
            changed = True
    return model.SerializeToString() if changed else None


@dataclass(frozen=True)
class StepCalibration:
    index: int
    digest: str
    honest_rel_frobenius: float
    honest_max_abs: float
    cheat_rel_frobenius: float  # smallest over cheats; inf when the step has no weights to cheat on
    cheat_name: str
    tolerance: Tolerance
    # The window ending at this step (none for step 0): this step run from the step before's
    # honest-variation outputs, against the reference chain.
    window_tolerance: Tolerance | None = None
    window_rel_frobenius: float = 0.0

    @property
    def margin(self) -> float:
        return self.cheat_rel_frobenius / self.tolerance.max_rel_frobenius

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "digest": self.digest,
            "tolerance": self.tolerance.to_json(),
            "honest_max": {"rel_frobenius": repr(self.honest_rel_frobenius), "max_abs": repr(self.honest_max_abs)},
            "cheat_min": {"rel_frobenius": repr(self.cheat_rel_frobenius), "strategy": self.cheat_name},
            **({"window_tolerance": self.window_tolerance.to_json()} if self.window_tolerance else {}),
        }


@dataclass(frozen=True)
class Profile:
    model_digest: str
    precision: str
    optimization: str
    headroom: float
    honest: tuple[str, ...]
    steps: tuple[StepCalibration, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "type": PROFILE_TYPE,
            "version": 1,
            "model_digest": self.model_digest,
            "precision": self.precision,
            "optimization": self.optimization,
            "headroom": repr(self.headroom),
            "honest_variations": list(self.honest),
            "cheats": sorted(CHEATS),
            "steps": [s.to_json() for s in self.steps],
        }


def calibrate(
    model_path: Path,
    inputs: Mapping[str, np.ndarray],
    *,
    steps: int | None = None,
    precision: str = "fp32-strict",
    optimization: str = "extended",
    headroom: float = DEFAULT_HEADROOM,
) -> Profile:
    """Measure honest and cheating variations per step and derive per-step tolerances.

    1. Plan the model exactly as ``job new`` would (same steps, same step digests).
    2. Reference run at the job's configuration; keep every step's inputs and outputs.
    3. Honest variations and cheats re-run each step from the reference inputs.
    4. Per step: tolerance = honest maximum x headroom (at least FLOOR); refuse on overlap.
    """
    from verimesh.jobs.plan import build_step_models, load_model, plan_model
    from verimesh.jobs.runtime import OPT_LEVELS, StepRunner, resolve_device

    if headroom <= 1:
        raise InvalidInputError("headroom must be above 1")
    # 1.
    model, data = load_model(model_path)
    plan = plan_model(model, steps=steps, input_shapes={k: tuple(v.shape) for k, v in inputs.items()})
    planned = build_step_models(model, data, plan)
    # 2.
    reference_runner = StepRunner(device="cpu", precision=precision, optimization=optimization)
    trace: dict[str, np.ndarray] = dict(inputs)
    for step, blob, digest in zip(plan.steps, planned.step_bytes, planned.step_digests, strict=True):
        trace.update(reference_runner.run(digest, blob, {n: trace[n] for n in step.inputs}, step.outputs))
    # 3.
    honest: list[tuple[str, StepRunner]] = [
        (
            f"cpu/{level}/threads={threads}",
            StepRunner(device="cpu", precision=precision, optimization=level, threads=threads),
        )
        for level in OPT_LEVELS
        for threads in (1, 2)
    ]
    if resolve_device("auto") == "cuda":
        honest.append(("cuda/tf32-off", StepRunner(device="cuda", precision="fp32-strict", optimization=optimization)))
    outputs = set(plan.outputs[i].name for i in range(len(plan.outputs)))
    results = []
    previous: dict[str, dict[str, np.ndarray]] = {}  # each variation's outputs of the step before
    for step, blob, digest in zip(plan.steps, planned.step_bytes, planned.step_digests, strict=True):
        feeds = {n: trace[n] for n in step.inputs}
        honest_fro, honest_abs = 0.0, 0.0
        window_fro, window_abs = 0.0, 0.0
        current: dict[str, dict[str, np.ndarray]] = {}
        for name_v, runner in honest:
            got = runner.run(digest, blob, feeds, step.outputs)
            current[name_v] = got
            for name in step.outputs:
                metrics = spread_metrics(name, got[name], trace[name], discrete=name in outputs)
                honest_fro = max(honest_fro, metrics["rel_frobenius"])
                honest_abs = max(honest_abs, metrics["max_abs_diff"])
            if step.index:
                # The window: this step run by the variation from its own outputs of the step
                # before, against the reference chain (what a verifier's window compares).
                chained = runner.run(digest, blob, {**feeds, **previous[name_v]}, step.outputs)
                for name in step.outputs:
                    metrics = spread_metrics(name, chained[name], trace[name], discrete=name in outputs)
                    window_fro = max(window_fro, metrics["rel_frobenius"])
                    window_abs = max(window_abs, metrics["max_abs_diff"])
        previous = {v: {n: o[n] for n in o} for v, o in current.items()}
        cheat_fro, cheat_name = float("inf"), "none (no float weights in this step)"
        for cheat in sorted(CHEATS):
            cheated = cheat_step(blob, cheat)
            if cheated is None:
                continue
            key = "cheat-" + hashlib.sha256(cheated).hexdigest()
            got = reference_runner.run(key, cheated, feeds, step.outputs)
            worst = max(spread_metrics(n, got[n], trace[n], discrete=False)["rel_frobenius"] for n in step.outputs)
            if worst < cheat_fro:
                cheat_fro, cheat_name = worst, cheat
        # 4.
        base = DEFAULT_TOLERANCES[precision]
        threshold = max(honest_fro * headroom, FLOOR)
        atol = max(honest_abs * headroom, FLOOR)
        tol = Tolerance(rtol=0.0, atol=atol, max_outside_fraction=0.0, max_rel_frobenius=threshold,
                        argmax_margin=base.argmax_margin)  # fmt: skip
        if threshold >= cheat_fro:
            raise InvalidInputError(
                f"step {step.index}: honest maximum x{headroom:g} ({threshold:.3g}) reaches the smallest cheat "
                f"({cheat_name}: {cheat_fro:.3g}); no tolerance separates them",
                code="calibration-overlap",
                hint="use fewer steps, the tf32 class, or a smaller --headroom",
            )
        window = None
        if step.index:
            window = Tolerance(rtol=0.0, atol=max(window_abs * headroom, atol), max_outside_fraction=0.0,
                               max_rel_frobenius=max(window_fro * headroom, threshold),
                               argmax_margin=base.argmax_margin)  # fmt: skip
        results.append(
            StepCalibration(step.index, digest, honest_fro, honest_abs, cheat_fro, cheat_name, tol, window, window_fro)
        )
    return Profile(sha256_bytes(data), precision, optimization, headroom, tuple(h for h, _ in honest), tuple(results))


def spread_metrics(name: str, got: np.ndarray, ref: np.ndarray, *, discrete: bool) -> dict[str, float]:
    """How far ``got`` is from ``ref``: relative Frobenius distance and largest absolute difference
    (inf for a special-value mismatch; 1.0 for any difference of integer or discrete outputs)."""
    loose = Tolerance(rtol=1.0, atol=1.0, max_outside_fraction=1.0, max_rel_frobenius=1.0, argmax_margin=1.0)
    result = compare_tensors(name, got, ref, loose, discrete=discrete)
    if "special_values" in result.metrics:
        return {"rel_frobenius": float("inf"), "max_abs_diff": float("inf")}
    if "mismatched" in result.metrics:  # integer outputs: any difference is total
        bad = float(result.metrics["mismatched"] > 0)
        return {"rel_frobenius": bad, "max_abs_diff": bad}
    return {
        "rel_frobenius": float(result.metrics["rel_frobenius"]),
        "max_abs_diff": float(result.metrics["max_abs_diff"]),
    }


def write_profile(profile: Profile, path: Path) -> None:
    path.write_bytes(canonical_json(profile.to_json()))


def calibrate_generate(
    model_path: Path,
    prompt: Path,
    *,
    max_new_tokens: int,
    precision: str = "fp32-strict",
    optimization: str = "extended",
    headroom: float = DEFAULT_HEADROOM,
    tokenizer: Path | None = None,
) -> Profile:
    """Generate mode: the tolerance of what the verifier compares (each position's top-k values
    and sketch), from the honest spread between a worker's decode loop (KV cache, every
    optimization level, one and two threads, CUDA where present) and the verifier's one prefill
    pass, against the smallest cheat (fp16, bf16 or shuffled weights on the same tokens).

    1. A reference answer (greedy, at the job's configuration) and the verifier's logits for it.
    2. Each honest variation decodes the same tokens (teacher-forced: it feeds the reference
       tokens, so every position compares like with like); each cheat does the same.
    3. Tolerance = honest maximum x headroom (at least FLOOR); refuse when it reaches a cheat.
    The profile has one step, the model (a generate job's one step)."""
    from verimesh.jobs.generation import (
        DEFAULT_SKETCH,
        DEFAULT_TOP_K,
        GenerateSpec,
        Layout,
        Sampling,
        discover_layout,
        feeds_for,
        load_prompt,
        record,
        sequence_logits,
        sketch_matrix,
    )
    from verimesh.jobs.generation import generate as decode
    from verimesh.jobs.plan import load_model
    from verimesh.jobs.runtime import OPT_LEVELS, StepRunner, resolve_device

    if headroom < 2:  # the spread measured here is one machine's: leave room for the others'
        raise InvalidInputError("headroom must be at least 2 for a generate calibration")
    model, data = load_model(model_path)
    digest = sha256_bytes(data)
    ids = load_prompt(prompt, tokenizer)
    reference_runner = StepRunner(device="cpu", precision=precision, optimization=optimization)

    def runner_of(runner: StepRunner, blob: bytes, key: str) -> Any:
        return lambda feeds, names: runner.run(key, blob, feeds, names)

    layout = discover_layout(model)
    probe = runner_of(reference_runner, data, digest)
    vocab = int(probe(feeds_for(layout, ids, 0, None), [layout.logits])[layout.logits].shape[-1])
    layout = Layout(**{**layout.__dict__, "vocab": vocab})
    spec = GenerateSpec(max_new_tokens, Sampling("greedy"), (), DEFAULT_TOP_K, DEFAULT_SKETCH, layout)
    tokens = decode(probe, spec, ids, "calibration", lambda _t, _row: None)
    full = np.concatenate([ids, np.array([tokens[:-1]], dtype=np.int64)], axis=1)
    verifier_rows = sequence_logits(probe, layout, full)[ids.shape[1] - 1 :]
    matrix = sketch_matrix("calibration", vocab, DEFAULT_SKETCH)

    def forced_rows(run: Any) -> list[np.ndarray]:
        """The decode loop's logits on the reference tokens (fed, not chosen)."""
        rows: list[np.ndarray] = []
        decode(run, spec, ids, "calibration", lambda _t, row: rows.append(row), forced=tokens)
        return rows

    def spread(rows: list[np.ndarray]) -> tuple[float, float]:
        fro, worst = 0.0, 0.0
        for row, ref in zip(rows, verifier_rows, strict=True):
            values, indices, sketch = record(row, DEFAULT_TOP_K, matrix)
            for name, got, want in (("top-k", values, ref[indices]), ("sketch", sketch, ref @ matrix)):
                metrics = spread_metrics(name, got, want, discrete=False)
                fro, worst = max(fro, metrics["rel_frobenius"]), max(worst, metrics["max_abs_diff"])
        return fro, worst

    honest = [(f"cpu/{level}/threads={threads}", StepRunner(device="cpu", precision=precision, optimization=level,
                                                            threads=threads))
              for level in OPT_LEVELS for threads in (1, 2)]  # fmt: skip
    if resolve_device("auto") == "cuda":
        honest.append(("cuda/tf32-off", StepRunner(device="cuda", precision="fp32-strict", optimization=optimization)))
    honest_fro, honest_abs = 0.0, 0.0
    for _name, runner in honest:
        fro, worst = spread(forced_rows(runner_of(runner, data, digest)))
        honest_fro, honest_abs = max(honest_fro, fro), max(honest_abs, worst)
    cheat_fro, cheat_name = float("inf"), "none (no float weights)"
    for cheat in sorted(CHEATS):
        cheated = cheat_step(data, cheat)
        if cheated is None:
            continue
        fro, _ = spread(forced_rows(runner_of(reference_runner, cheated, "cheat-" + sha256_bytes(cheated))))
        if fro < cheat_fro:
            cheat_fro, cheat_name = fro, cheat
    base = DEFAULT_TOLERANCES[precision]
    threshold = max(honest_fro * headroom, FLOOR)
    tol = Tolerance(rtol=0.0, atol=max(honest_abs * headroom, FLOOR), max_outside_fraction=0.0,
                    max_rel_frobenius=threshold, argmax_margin=base.argmax_margin)  # fmt: skip
    if threshold >= cheat_fro:
        raise InvalidInputError(
            f"honest maximum x{headroom:g} ({threshold:.3g}) reaches the smallest cheat ({cheat_name}: "
            f"{cheat_fro:.3g}); no tolerance separates them",
            code="calibration-overlap",
            hint="use the tf32 class or a smaller --headroom",
        )
    step = StepCalibration(0, digest, honest_fro, honest_abs, cheat_fro, cheat_name, tol)
    return Profile(digest, precision, optimization, headroom, tuple(h for h, _ in honest), (step,))
