"""``job new --mode generate``: a generate job (docs/format.md §15) for a decoder ONNX model."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from verimesh.core.digest import sha256_bytes, tensor_set_digest
from verimesh.core.tensors import TensorRef, TensorSpec, npz_bytes
from verimesh.errors import InvalidInputError, StepExecutionError
from verimesh.jobs.generation import (
    DEFAULT_SKETCH,
    DEFAULT_TOP_K,
    MAX_NEW_TOKENS,
    RECORDS,
    GenerateSpec,
    Layout,
    Sampling,
    discover_layout,
    feeds_for,
    load_prompt,
    sequence_logits,
    tokenizer_digest,
)
from verimesh.jobs.job import Job, Policy, StepRef, publish_job, stage_job_files
from verimesh.jobs.tolerance import DEFAULT_TOLERANCES, Tolerance


def new_generate_job(
    model_path: Path,
    prompt_path: Path,
    out: Path,
    *,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    stop_tokens: tuple[int, ...] = (),
    tokenizer: Path | None = None,
    top_k: int = DEFAULT_TOP_K,
    sketch: int = DEFAULT_SKETCH,
    samples: int | None = None,
    precision: str = "fp32-strict",
    optimization: str = "extended",
    tolerance: Tolerance | None = None,
    overwrite: bool = False,
    profile: Path | None = None,
) -> Job:
    """Check the model (model safety, the decoder layout), read the prompt, run the model once
    over the longest sequence the job can produce (a model that cannot is refused now, not on a
    worker), and write ``out`` with its ``.files`` folder (the prompt, the tokenizer).

    ``samples``: generated positions a verifier checks beside the last (default: all of them;
    one prefill pass computes every position's logits, so checking all costs no more)."""
    from verimesh.jobs.plan import load_model
    from verimesh.jobs.runtime import StepRunner

    if out.exists() and not overwrite:
        raise InvalidInputError(f"{out} already exists", hint="pass --force to overwrite it")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InvalidInputError(f"--max-new-tokens must be 1 .. {MAX_NEW_TOKENS}")
    if precision not in DEFAULT_TOLERANCES:
        raise InvalidInputError(f"unknown precision class {precision!r}", hint="use fp32-strict or tf32")
    model, model_bytes = load_model(model_path)
    layout = discover_layout(model)
    if profile is not None:
        tolerance = _profiled(profile, sha256_bytes(model_bytes), precision)
    prompt = load_prompt(prompt_path, tokenizer)
    digest = sha256_bytes(model_bytes)
    runner = StepRunner(device="cpu", precision=precision, optimization=optimization)
    longest = np.zeros((1, prompt.shape[1] + max_new_tokens - 1), dtype=np.int64)
    longest[0, : prompt.shape[1]] = prompt[0]
    probe = Layout(**{**layout.__dict__, "vocab": layout.vocab or 1})

    def run(feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        return runner.run(digest, model_bytes, feeds, names)

    try:
        raw = run(feeds_for(probe, longest, 0, None), [layout.logits])[layout.logits]
    except StepExecutionError as exc:
        raise InvalidInputError(
            f"the model does not run over prompt + {max_new_tokens - 1} tokens: {exc.message}",
            hint="a shorter --max-new-tokens, or a prompt the model takes",
        ) from exc
    vocab = int(raw.shape[-1]) if raw.ndim == 3 else 0
    if vocab < 2 or (layout.vocab and layout.vocab != vocab):
        raise InvalidInputError(f"the model's logits are {list(raw.shape)}: expected [1, sequence, vocab]")
    layout = Layout(**{**layout.__dict__, "vocab": vocab})
    sequence_logits(run, layout, longest)  # the verifier's pass, as it will run
    if int(prompt.max()) >= vocab or any(not 0 <= s < vocab for s in stop_tokens):
        raise InvalidInputError(f"the prompt and --stop-token ids must be below the vocabulary size {vocab}")
    if not 2 <= top_k <= min(64, vocab) or not 1 <= sketch <= 64:
        raise InvalidInputError("--top-k must be 2 .. min(64, vocab) and the sketch 1 .. 64 wide")
    base, files, staging = stage_job_files(out)
    try:
        (staging / "input.npz").write_bytes(npz_bytes({"input_ids": prompt}))
        pinned_tokenizer = None
        if tokenizer is not None:
            shutil.copyfile(tokenizer, staging / "tokenizer.json")
            pinned_tokenizer = (f"{files.name}/tokenizer.json", tokenizer_digest(staging / "tokenizer.json"))
        spec = GenerateSpec(max_new_tokens, sampling or Sampling("greedy"), tuple(sorted(set(stop_tokens))), top_k,
                            sketch, layout, pinned_tokenizer)  # fmt: skip
        ref = TensorRef.of("input_ids", prompt)
        model_rel = os.path.relpath(model_path.resolve(), base)
        job = Job(
            job_id="",
            nonce=secrets.token_hex(16),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            mode="generate",
            model_digest=digest,
            model_path=model_rel,
            model_inputs=(TensorSpec("input_ids", "int64", tuple(int(d) for d in prompt.shape)),),
            model_outputs=(TensorSpec("tokens", "int64", (1, None)),),
            input_digest=tensor_set_digest({ref.name: ref.digest}),
            input_path=f"{files.name}/input.npz",
            input_tensors=(ref,),
            steps=(StepRef(0, model_rel, digest, ("input_ids",), RECORDS, 0, len(model.graph.node)),),
            policy=Policy(
                max_new_tokens if samples is None else samples,
                precision,
                optimization,
                tolerance or DEFAULT_TOLERANCES[precision],
            ),
            base_dir=base,
            generate=spec,
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish_job(job, staging, files, out)


def _profiled(path: Path, model_digest: str, precision: str) -> Tolerance:
    """The tolerance of a generate calibration (``calibrate --prompt``): one step, the model."""
    from verimesh.jobs.tolerance import load_tolerance_profile

    loaded = load_tolerance_profile(path)
    if loaded.model_digest != model_digest or set(loaded.steps) != {0} or loaded.steps[0][0] != model_digest:
        raise InvalidInputError(f"tolerance profile {path} was not calibrated for this model's generation",
                                hint="calibrate with `verimesh calibrate MODEL --prompt prompt.json`")  # fmt: skip
    if loaded.precision != precision:
        raise InvalidInputError(
            f"tolerance profile {path} is for precision {loaded.precision}, the job uses {precision}"
        )
    return loaded.steps[0][1]


def generated_text(job: Job, tokens: np.ndarray) -> str | None:
    """The generated tokens as text, with the tokenizer the job pins (None when it pins none)."""
    from verimesh.core.files import read_user_file
    from verimesh.errors import IntegrityError
    from verimesh.jobs.generation import load_tokenizer

    if job.generate is None or job.generate.tokenizer is None:
        return None
    path = job.resolve(job.generate.tokenizer[0])
    if sha256_bytes(read_user_file(path, what="tokenizer", max_bytes=64 << 20)) != job.generate.tokenizer[1]:
        raise IntegrityError(f"tokenizer {path} is not the one the job pins")
    return str(load_tokenizer(path).decode([int(t) for t in tokens.reshape(-1)], skip_special_tokens=False))
