"""The red team in generate mode (``verimesh redteam LM.onnx --prompt P --max-new-tokens N``).

Each strategy is what a dishonest node could ship for a generate job, sealed and signed with
its own key: another model's answer (weights retrained, in fp16 or int8, a rank-reduced
"smaller" model), edited tokens, a steered answer (one token the node chose, the rest generated
on from it, so that only that position's record is wrong), a truncated or extended answer, a swapped prompt, another
sampling seed or temperature, and a lazy node that generates with the cheap model and commits
the real model's records at a few positions only. Every trial is verified with fresh verifier
randomness at the job's policy; honest bundles made with other thread counts must all pass.

Predictions: a cheat that changes the model changes every position's logits beyond the
tolerance (checked per trial on the first position, else the trial is not played), and every
position is checked, so it is caught with probability 1. An edited token is caught unless its
position is a near-tie (the verifier allows either candidate there): the prediction is the
share of trials whose edited position is not one; a steered answer, times the share of
positions the job's policy checks.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from verimesh.assurance.redteam import Outcome
from verimesh.core.digest import sha256_bytes
from verimesh.errors import InvalidInputError
from verimesh.jobs.generate_job import new_generate_job
from verimesh.jobs.generation import Sampling, allowed_tokens, generate, record, sketch_matrix
from verimesh.jobs.job import Job
from verimesh.jobs.runtime import StepRunner
from verimesh.jobs.tolerance import Tolerance, compare_tensors
from verimesh.signing.keys import SecretKey, generate_key
from verimesh.workflows import Worker, seal_trace, verify

STRATEGIES = (
    "retrained-model", "fp16-weights", "int8-weights", "smaller-model", "edited-token", "steered", "truncated",
    "extended", "prompt-swapped", "seed-changed", "temperature-changed", "lazy",
)  # fmt: skip
MODEL_CHEATS = ("retrained-model", "fp16-weights", "int8-weights", "smaller-model")
Trace = dict[str, np.ndarray]


def altered_model(model_bytes: bytes, strategy: str, rng: np.random.Generator) -> bytes:
    """The job's model with its float weights changed the way ``strategy`` says."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(model_bytes)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32 or w.size < 2:
            continue
        if strategy == "retrained-model":
            w = w + rng.standard_normal(w.shape).astype(np.float32) * np.float32(0.1 * (w.std() or 1.0))
        elif strategy == "fp16-weights":
            w = w.astype(np.float16).astype(np.float32)
        elif strategy == "int8-weights":
            scale = np.float32(np.abs(w).max() / 127 or 1.0)
            w = (np.round(w / scale).clip(-127, 127) * scale).astype(np.float32)
        elif strategy == "smaller-model" and w.ndim == 2 and min(w.shape) >= 4:
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            rank = max(1, min(w.shape) // 4)
            w = ((u[:, :rank] * s[:rank]) @ vt[:rank]).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(w, init.name))
    return bytes(model.SerializeToString())


class _Cheater:
    """Makes each strategy's bundle for one job with one key."""

    def __init__(self, job: Job, key: SecretKey, work: Path, rng: random.Random) -> None:
        assert job.generate is not None
        self.job, self.key, self.work, self.rng = job, key, work, rng
        self.spec = job.generate
        self.model = job.read_step_model(0)
        self.runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
        self.prompt = job.read_input()["input_ids"]
        self.matrix = sketch_matrix(job.nonce, self.spec.layout.vocab, self.spec.sketch)
        self.honest, self.logits = self.answer(self.model)
        self.count = 0

    def run_with(self, blob: bytes) -> Callable[[Mapping[str, np.ndarray], Sequence[str]], dict[str, np.ndarray]]:
        digest = sha256_bytes(blob)
        return lambda feeds, names: self.runner.run(digest, blob, feeds, names)

    def answer(self, blob: bytes, *, prompt: np.ndarray | None = None, nonce: str | None = None,
               sampling: Sampling | None = None) -> tuple[Trace, list[np.ndarray]]:  # fmt: skip
        """What a node running ``blob`` commits (with another prompt, seed or sampling if given)."""
        spec = self.spec if sampling is None else type(self.spec)(**{**self.spec.__dict__, "sampling": sampling})
        rows: list[np.ndarray] = []
        tokens = generate(self.run_with(blob), spec, self.prompt if prompt is None else prompt,
                          nonce or self.job.nonce, lambda _t, logits: rows.append(logits))  # fmt: skip
        return self.trace(tokens, rows), rows

    def trace(self, tokens: Sequence[int], rows: Sequence[np.ndarray]) -> Trace:
        records = [record(r, self.spec.top_k, self.matrix) for r in rows]
        return {"input_ids": self.prompt, "tokens": np.array([list(tokens)], dtype=np.int64),
                "topk_values": np.stack([r[0] for r in records]), "topk_indices": np.stack([r[1] for r in records]),
                "sketch": np.stack([r[2] for r in records])}  # fmt: skip

    def seal(self, trace: Trace) -> Path:
        self.count += 1
        out = self.work / f"cheat-{self.count}.vmb"
        seal_trace(self.job, trace, key=self.key, runner=self.runner, out=out)
        return out

    def steered(self, tokens: Sequence[int], tol: Tolerance) -> tuple[Trace, float]:
        """One token chosen by the node (the most plausible other one, at a random position), then
        the answer generated on from it by the real model: every record but that one is what the
        verifier's pass over the steered sequence recomputes, so only a check of that very
        position catches it. Predicted: the share of positions a verifier at the job's policy
        checks (unless the edit is at a near-tie, where either token is allowed)."""
        return self.steered_at(tokens, self.rng.randrange(len(tokens)), tol)

    def steered_at(self, tokens: Sequence[int], t: int, tol: Tolerance) -> tuple[Trace, float]:
        """``steered`` at position ``t``."""
        from verimesh.jobs.generation import choose, sequence_logits

        row = self.logits[t]
        other = next(int(i) for i in np.argsort(-row, kind="stable") if int(i) != tokens[t])
        run, layout, spec = self.run_with(self.model), self.spec.layout, self.spec
        answer = [*tokens[:t], other]
        while answer[-1] not in spec.stop_tokens and len(answer) < spec.max_new_tokens:
            ids = np.concatenate([self.prompt, np.array([answer], dtype=np.int64)], axis=1)
            answer.append(choose(sequence_logits(run, layout, ids)[-1], spec.sampling, self.job.nonce, len(answer)))
        full = np.concatenate([self.prompt, np.array([answer[:-1]], dtype=np.int64)], axis=1)
        rows = sequence_logits(run, layout, full)[self.prompt.shape[1] - 1 :]
        if other in allowed_tokens(spec, tol, self.job.nonce, t, row):
            return self.trace(answer, list(rows)), 0.0
        others = len(answer) - 1
        checked = 1.0 if t == others else min(self.job.policy.samples, others) / others
        return self.trace(answer, list(rows)), checked

    def play(self, strategy: str, np_rng: np.random.Generator) -> tuple[Trace, float] | None:
        """(the cheat's trace, its predicted detection), or None when the job offers it nothing."""
        honest, n = self.honest, self.honest["tokens"].shape[1]
        tokens = honest["tokens"][0].tolist()
        tol = self.job.policy.tolerance_for(0)
        if strategy in MODEL_CHEATS:
            blob = altered_model(self.model, strategy, np_rng)
            trace, rows = self.answer(blob)
            if compare_tensors("logits", rows[0], self.logits[0], tol).ok:
                return None  # this alteration does not move the logits beyond the tolerance
            return trace, 1.0
        if strategy == "edited-token":
            t = self.rng.randrange(n)
            row = self.logits[t]
            # The most plausible other token: the best-scoring one that is not the honest choice.
            other = next(int(i) for i in np.argsort(-row, kind="stable") if int(i) != tokens[t])
            edited = dict(honest, tokens=honest["tokens"].copy())
            edited["tokens"][0, t] = other
            if other in self.spec.stop_tokens and t < n - 1:
                return edited, 1.0  # an early stop token is caught by the stop rule
            return edited, 0.0 if other in allowed_tokens(self.spec, tol, self.job.nonce, t, row) else 1.0
        if strategy == "steered":
            return self.steered(tokens, tol)
        if strategy == "truncated":
            if n < 2:
                return None
            keep = max(1, n // 2)
            return {**honest, **{k: honest[k][:keep] for k in ("topk_values", "topk_indices", "sketch")},
                    "tokens": honest["tokens"][:, :keep]}, 1.0  # fmt: skip
        if strategy == "extended":
            extra = int(self.rng.randrange(self.spec.layout.vocab))
            return {**honest, "tokens": np.concatenate([honest["tokens"], [[extra]]], axis=1),
                    **{k: np.concatenate([honest[k], honest[k][-1:]]) for k in ("topk_values", "topk_indices",
                                                                                "sketch")}}, 1.0  # fmt: skip
        if strategy == "prompt-swapped":
            swapped = np_rng.integers(0, self.spec.layout.vocab, size=self.prompt.shape, dtype=np.int64)
            trace, _ = self.answer(self.model, prompt=swapped)
            trace["input_ids"] = self.prompt
            return trace, 1.0
        if strategy == "seed-changed":
            if self.spec.sampling.kind == "greedy":
                return None
            trace, _ = self.answer(self.model, nonce=f"{self.job.nonce}-{self.rng.random()}")
            return trace, 1.0 if trace["tokens"][0].tolist() != tokens else 0.0
        if strategy == "temperature-changed":
            now = self.spec.sampling
            changed = Sampling("sample", 1.0, 1.0) if now.kind == "greedy" else Sampling("sample", now.temperature * 2,
                                                                                          now.top_p)  # fmt: skip
            trace, _ = self.answer(self.model, sampling=changed)
            return trace, 1.0 if trace["tokens"][0].tolist() != tokens else 0.0
        if strategy == "lazy":  # the cheap model's answer, the real model's records at a few positions
            cheap = altered_model(self.model, "smaller-model", np_rng)
            trace, _ = self.answer(cheap)
            full = np.concatenate([self.prompt, trace["tokens"][:, :-1]], axis=1)
            from verimesh.jobs.generation import sequence_logits

            real = sequence_logits(self.run_with(self.model), self.spec.layout, full)[self.prompt.shape[1] - 1 :]
            count = trace["tokens"].shape[1]
            for t in self.rng.sample(range(count), min(3, count)):
                values, indices, sketch = record(real[t], self.spec.top_k, self.matrix)
                trace["topk_values"][t], trace["topk_indices"][t], trace["sketch"][t] = values, indices, sketch
            return trace, 1.0
        raise InvalidInputError(f"unknown generate strategy {strategy!r}")


def run_generate_redteam(
    model: Path, prompt: Path, *, max_new_tokens: int, trials: int = 20, honest: int = 20,
    sampling: Sampling | None = None, stop_tokens: tuple[int, ...] = (), seed: int = 0,
    strategies: Sequence[str] = STRATEGIES, progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Play every strategy ``trials`` times and ``honest`` honest runs; the report's shape is
    ``redteam.run_redteam``'s (``markdown_report`` prints it)."""
    say = progress or (lambda _m: None)
    work = Path(tempfile.mkdtemp(prefix="verimesh-generate-redteam-"))
    try:
        job = new_generate_job(model, prompt, work / "job.json", max_new_tokens=max_new_tokens,
                               sampling=sampling, stop_tokens=stop_tokens)  # fmt: skip
        key = generate_key()
        variations = [1, 2, 0]
        false_positives = 0
        say(f"honest: {honest} runs")
        workers = [Worker(key, device="cpu", threads=t) for t in variations]
        for i in range(honest):
            bundle = workers[i % len(workers)].prove(job, out=work / "honest.vmb").bundle
            if verify(bundle, job=job, node_key=key.public).status != "accept":
                false_positives += 1
        cheater = _Cheater(job, key, work, random.Random(seed))
        np_rng = np.random.default_rng(seed)
        outcomes = {s: Outcome(s) for s in strategies}
        for strategy in strategies:
            say(f"{strategy}: {trials} trials")
            for _ in range(trials):
                played = cheater.play(strategy, np_rng)
                if played is None:
                    outcomes[strategy].inapplicable += 1
                    continue
                trace, predicted = played
                verdict = verify(cheater.seal(trace), job=job, node_key=key.public)
                outcome = outcomes[strategy]
                outcome.trials += 1
                outcome.predicted.append(predicted)
                harmful = trace["tokens"][0].tolist() != cheater.honest["tokens"][0].tolist()
                outcome.harmful += harmful
                if verdict.status != "accept":
                    outcome.detected += 1
                    failed = next((c.name for c in verdict.checks if not c.ok), verdict.status)
                    outcome.reasons[failed] = outcome.reasons.get(failed, 0) + 1
                elif harmful:
                    outcome.wrong_accepted += 1
        spec = job.generate
        assert spec is not None
        return {
            "model": model.name, "mode": "generate", "steps": 1, "samples": "all positions", "trials": trials,
            "gain": 1.0, "max_new_tokens": max_new_tokens, "sampling": spec.sampling.to_json(),
            "honest": {"verifications": honest, "false_positives": false_positives,
                       "variations": [f"cpu/{job.policy.optimization}/threads={t}" for t in variations]},
            "strategies": [outcomes[s].to_json(1.0) for s in strategies],
        }  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
