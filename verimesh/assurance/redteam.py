"""Red team: cheating workers written against the public API, run against the verifier.

Each strategy makes a bundle for a job the way a dishonest node would, using only what the
library offers an honest one (``run_steps``, ``seal_trace``, ``StepRunner``). ``run_redteam``
plays every strategy ``trials`` times (each trial a fresh cheat and a fresh verifier seed),
plays as many honest runs spread over the honest variations, and reports measured detection
with a 95% Wilson interval beside the predicted rate, the honest false-positive rate, and the
smallest stake that makes each strategy unprofitable (slash >= gain * (1 - p) / p).

Predictions are exact for the verifier's sampler: the last step always, plus ``samples`` steps
drawn one after another with probability proportional to cost among those left (which is what
Efraimidis–Spirakis keys amount to).
"""

from __future__ import annotations

import math
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from verimesh.assurance.calibrate import cheat_step
from verimesh.assurance.tamper import garble, swap_after_signing
from verimesh.errors import InvalidInputError, StepExecutionError
from verimesh.jobs.bundle import read_bundle, write_bundle
from verimesh.jobs.job import Job, new_job
from verimesh.jobs.runtime import OPT_LEVELS, StepRunner
from verimesh.jobs.tolerance import compare_tensors
from verimesh.ledger.reputation import minimum_deterring_stake
from verimesh.signing.keys import SecretKey, generate_key
from verimesh.spot.spotcheck import mandatory_steps, recheck_step, run_steps
from verimesh.workflows import seal_trace, verify

STRATEGIES = (
    "lazy",
    "perturb-final",
    "perturb-intermediate",
    "weights-fp16",
    "weights-bf16",
    "substituted-model",
    "wrong-input",
    "replay",
    "forged-commitment",
    "equivocation",
    "tf32-emulated",
    "launder-special",
    "launder-threshold",
    "launder-chain",
    "unsealed-bytes",
)
# Laundering strategies keep every boundary inside the tolerance; their predictions replay the
# verifier's own checks (which steps' checks would see the cheat), and each trial also records
# whether the result is wrong (the outputs beyond the tolerance of the honest ones).
LAUNDERING = ("launder-special", "launder-threshold", "launder-chain")


def miss_probability(
    costs: Sequence[int], cheated: frozenset[int], samples: int, always: frozenset[int] | None = None
) -> float:
    """P(the verifier checks none of ``cheated``): the ``always`` steps (default: the last one;
    ``spotcheck.mandatory_steps``) every time, then ``samples`` weighted draws from the rest."""
    always = frozenset({len(costs) - 1}) if always is None else always
    if always & cheated:
        return 0.0
    others = tuple(i for i in range(len(costs)) if i not in always)
    weights = {i: max(costs[i], 1) for i in others}

    @cache
    def miss(available: frozenset[int], k: int) -> float:
        if k == 0 or not available:
            return 1.0
        total = sum(weights[i] for i in available)
        return sum(weights[j] / total * miss(available - {j}, k - 1) for j in available if j not in cheated)

    return miss(frozenset(others), min(samples, len(others)))


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Outcome:
    strategy: str
    trials: int = 0
    detected: int = 0
    predicted: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    harmful: int = 0  # trials whose outputs differ from the honest ones beyond the tolerance
    wrong_accepted: int = 0  # of those, accepted
    inapplicable: int = 0  # trials where the model offered the strategy nothing to work on

    def to_json(self, gain: float) -> dict[str, Any]:
        rate = self.detected / self.trials if self.trials else 0.0
        low, high = wilson(self.detected, self.trials)
        predicted = sum(self.predicted) / len(self.predicted) if self.predicted else None
        return {
            "strategy": self.strategy,
            "trials": self.trials,
            "detected": self.detected,
            "rate": rate,
            "ci95": [low, high],
            "predicted": predicted,
            "within_ci": None if predicted is None or not self.trials else low - 1e-9 <= predicted <= high + 1e-9,
            "min_stake": minimum_deterring_stake(gain, rate),
            "reasons": self.reasons,
            "harmful": self.harmful,
            "wrong_accepted": self.wrong_accepted,
            "inapplicable": self.inapplicable,
        }


class _Cheater:
    """Makes cheating bundles for one job; every choice is the cheater's own randomness."""

    def __init__(self, job: Job, key: SecretKey, work: Path, rng: random.Random) -> None:
        self.job, self.key, self.work, self.rng = job, key, work, rng
        self.runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
        self.models = job.read_step_models()
        self.honest = run_steps(job, self.models, job.read_input(), self.runner)
        self.count = 0
        self.last_trace: dict[str, np.ndarray] = {}  # what the last cheat sealed
        self._cheated: dict[str, tuple[bytes | None, ...]] = {}

    def retarget(self, job: Job, key: SecretKey) -> None:
        """Cheat on ``job`` as ``key`` from now on: another job of the same model and input (its
        own id), so the honest values and the altered models made so far still hold."""
        if (job.model_digest, job.input_digest) != (self.job.model_digest, self.job.input_digest):
            raise InvalidInputError("a cheater retargets only to a job of the same model and input")
        self.job, self.key = job, key

    def _seal(self, trace: dict[str, np.ndarray]) -> Path:
        self.last_trace = trace
        self.count += 1
        out = self.work / f"cheat-{self.count}.vmb"
        seal_trace(self.job, trace, key=self.key, runner=self.runner, out=out)
        return out

    def _recompute(self, trace: dict[str, np.ndarray], first: int, models: Sequence[bytes] | None = None) -> None:
        for step in self.job.steps[first:]:
            blob = (models or self.models)[step.index]
            key = step.digest if models is None else f"alt-{hash(blob)}"
            trace.update(self.runner.run(key, blob, {n: trace[n] for n in step.inputs}, step.outputs))

    def _garble(self, name: str, scale: float) -> np.ndarray:
        return garble(self.honest[name], self.rng, scale)

    def lazy(self, fraction: float) -> Path:
        """Skip steps worth about ``fraction`` of the cost: their outputs are copied inputs or zeros.
        Steps with only integer outputs (shapes, indices) are not skipped: they cost nothing, and
        garbage there would not run."""
        costs = [max(s.cost, 1) for s in self.job.steps]
        order = [s.index for s in self.job.steps if any(self.honest[n].dtype.kind == "f" for n in s.outputs)]
        self.rng.shuffle(order)
        skipped: set[int] = set()
        for i in order:
            if sum(costs[j] for j in skipped) >= fraction * sum(costs):
                break
            skipped.add(i)
        trace = {n: self.honest[n] for n in (s.name for s in self.job.model_inputs)}
        for step in self.job.steps:
            if step.index in skipped:
                for name in step.outputs:
                    like = self.honest[name]
                    if like.dtype.kind != "f":  # shapes and indices: cheap, and garbage would not run
                        trace[name] = like
                        continue
                    src = next((trace[i] for i in step.inputs if trace[i].shape == like.shape), None)
                    trace[name] = np.array(src if src is not None else np.zeros_like(like), dtype=like.dtype)
            else:
                trace.update(
                    self.runner.run(
                        step.digest, self.models[step.index], {n: trace[n] for n in step.inputs}, step.outputs
                    )
                )
        return self._seal(trace)

    def perturb_step(self, index: int) -> Path:
        trace = dict(self.honest)
        name = self.job.steps[index].outputs[0]
        trace[name] = self._garble(name, 0.01)
        self._recompute(trace, index + 1)
        return self._seal(trace)

    def cheated_models(self, cheat: str) -> tuple[bytes | None, ...]:
        """Each step with its weights altered by ``cheat`` (None where nothing changes), made once:
        the alteration is deterministic, so every trial of a weight cheat uses the same models."""
        if cheat not in self._cheated:
            transform = _tf32 if cheat == "tf32-emulated" else cheat
            self._cheated[cheat] = tuple(cheat_step(m, transform) for m in self.models)
        return self._cheated[cheat]

    def altered_weights(self, cheat: str) -> Path:
        """A bundle computed with altered weights."""
        cheated = self.cheated_models(cheat)
        models = [c or m for c, m in zip(cheated, self.models, strict=True)]
        trace = {n: self.honest[n] for n in (s.name for s in self.job.model_inputs)}
        self._recompute(trace, 0, models)
        return self._seal(trace)

    def wrong_input(self) -> Path:
        trace = {n: self._garble(n, 0.5) for n in (s.name for s in self.job.model_inputs)}
        self._recompute(trace, 0)
        return self._seal(trace)

    def forged_commitment(self) -> Path:
        """Sign honestly, then swap a tensor and its declared digest in the bundle afterwards."""
        honest = self._seal(dict(self.honest))
        return swap_after_signing(honest, self.work / f"forged-{self.count}.vmb", self.rng)

    def unsealed_bytes(self, fraction: float) -> Path:
        """The lazy worker's old trick: seal the honest trace, ship garbage for skipped steps."""
        lazy = self.lazy(fraction)
        honest = self._seal(dict(self.honest))
        shipped = read_bundle(lazy)
        envelope = read_bundle(honest).envelope
        out = self.work / f"unsealed-{self.count}.vmb"
        write_bundle(out, envelope, shipped.trace, dict(shipped.tensors), version=shipped.version)
        return out

    def _boundaries(self) -> list[tuple[int, str]]:
        outputs = set(self.job.output_names)
        return [
            (s.index, n) for s in self.job.steps[:-1] for n in s.outputs
            if n not in outputs and self.honest[n].dtype.kind == "f" and self.honest[n].size
        ]  # fmt: skip

    def _band(self, index: int, x: np.ndarray) -> np.ndarray:
        tol = self.job.policy.tolerance_for(index)
        return 0.9 * (tol.atol + tol.rtol * np.abs(x.astype(np.float64)))

    def launder(self, strategy: str) -> tuple[Path, dict[str, np.ndarray]] | None:
        """A trace that keeps every boundary inside the tolerance and recomputes the rest honestly.

        launder-special: flip the sign of the infinities (and of the zeros a later step divides by)
        of one boundary. launder-threshold: move the elements of one boundary nearest zero across
        it, by no more than the tolerance allows. launder-chain: move every boundary by 0.9 of
        the Frobenius bound, each from the moved one before. None: nothing on this model to move."""
        trace = dict(self.honest)
        boundaries = self._boundaries()
        if strategy == "launder-special":
            sensitive = set(self.job.policy.sign_sensitive)
            found = [(i, n) for i, n in boundaries if np.isinf(self.honest[n]).any()
                     or (n in sensitive and (self.honest[n] == 0).any())]  # fmt: skip
            if not found:
                return None
            index, name = self.rng.choice(found)
            x = np.array(self.honest[name])
            flip = np.isinf(x) | ((x == 0) if name in sensitive else np.zeros_like(x, dtype=bool))
            x[flip] = -x[flip] if np.isinf(x[flip]).all() else np.copysign(x[flip], -np.copysign(1.0, x[flip]))
            trace[name] = x
            self._recompute(trace, index + 1)
        elif strategy == "launder-threshold":
            if not boundaries:
                return None
            index, name = self.rng.choice(boundaries)
            x = np.array(self.honest[name])
            finite = np.isfinite(x)
            if not finite.any():
                return None
            band = np.where(finite, self._band(index, np.where(finite, x, 0)), 0)
            near = finite & (np.abs(x) <= band)
            if not near.any():  # nothing within reach of zero: move the nearest element as far as allowed
                near = finite & (np.abs(x) == np.abs(x[finite]).min())
            x[near] = np.where(np.abs(x[near]) <= band[near], -x[near], x[near] + band[near])
            trace[name] = x.astype(self.honest[name].dtype)
            self._recompute(trace, index + 1)
        else:
            if not boundaries:
                return None
            for step in self.job.steps:
                if step.index:
                    trace.update(self.runner.run(step.digest, self.models[step.index],
                                                 {n: trace[n] for n in step.inputs}, step.outputs))  # fmt: skip
                for name in step.outputs:
                    if (step.index, name) in boundaries:
                        x = trace[name].astype(np.float64)
                        tol = self.job.policy.tolerance_for(step.index)
                        bound = 0.9 * tol.max_rel_frobenius * float(np.linalg.norm(x)) / np.sqrt(x.size)
                        nudge = np.minimum(np.full_like(x, bound), self._band(step.index, x))
                        trace[name] = (x + np.copysign(nudge, x)).astype(trace[name].dtype)
        return self._seal(trace), trace

    def caught_by(self, trace: dict[str, np.ndarray]) -> frozenset[int]:
        """The sampled steps whose checks would reject ``trace``: replay the verifier's checks."""
        job, caught = self.job, set()
        tensors, sensitive = dict(trace), frozenset(job.policy.sign_sensitive)
        for step in job.steps:
            tol = job.policy.tolerance_for(step.index)
            own = recheck_step(job, step.index, self.models[step.index], tensors, self.runner, tol,
                               sign_sensitive=sensitive)  # fmt: skip
            if not own.ok:
                caught.add(step.index)
                continue
            if job.policy.window == 2 and step.index + 1 < len(job.steps):
                following = step.index + 1
                window = recheck_step(job, following, self.models[following], tensors, self.runner,
                                      job.policy.window_tolerance_for(following), feeds=own.recomputed,
                                      sign_sensitive=sensitive)  # fmt: skip
                if not window.ok:
                    caught.add(step.index)
        return frozenset(caught)

    def harmful(self, trace: dict[str, np.ndarray]) -> bool:
        """Do the outputs differ from the honest ones beyond the job's tolerance?"""
        tol = self.job.policy.tolerance_for(len(self.job.steps) - 1)
        return any(
            not compare_tensors(n, trace[n], self.honest[n], tol, discrete=True).ok for n in self.job.output_names
        )


def run_redteam(
    model: Path,
    input_file: Path,
    *,
    trials: int = 200,
    honest: int = 1000,
    samples: int = 1,
    steps: int | None = None,
    gain: float = 1.0,
    lazy_fraction: float = 0.25,
    seed: int = 0,
    strategies: Sequence[str] = STRATEGIES,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Each of ``strategies`` ``trials`` times and ``honest`` honest runs; returns the report (JSON-ready)."""
    from verimesh.ledger.store import Ledger
    from verimesh.settlement import register_node, verify_and_settle

    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise InvalidInputError(f"unknown cheating strategies {unknown}", hint=f"known: {', '.join(STRATEGIES)}")
    rng = random.Random(seed)
    say = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="verimesh-redteam-") as tmp:
        work = Path(tmp)
        job = new_job(model, input_file, work / "job.json", steps=steps, samples=samples)
        other_job = new_job(model, input_file, work / "other.json", steps=steps, samples=samples)
        key = generate_key()
        cheater = _Cheater(job, key, work, rng)
        costs = [s.cost for s in job.steps]
        always = frozenset(mandatory_steps(job))
        outcomes = {name: Outcome(name) for name in STRATEGIES}

        def judge(strategy: str, bundle: Path, predicted_miss: float, target: Job | None = None) -> bool:
            """Verify one cheat; True when it was accepted."""
            verdict = verify(
                bundle, job=target or job, node_key=key.public, seed=rng.getrandbits(53), evidence_out=work / "ev.vme"
            )
            outcome = outcomes[strategy]
            outcome.trials += 1
            outcome.predicted.append(1.0 - predicted_miss)
            if verdict.status != "accept":
                outcome.detected += 1
                reason = verdict.reason.split(":")[0]
                outcome.reasons[reason] = outcome.reasons.get(reason, 0) + 1
            return verdict.status == "accept"

        # With no honest runs asked for, one honest bundle still serves the replay strategy.
        honest_variations = [(level, threads) for level in OPT_LEVELS for threads in (1, 2)][: 8 if honest else 1]
        honest_bundles = []
        for level, threads in honest_variations:
            runner = StepRunner(device="cpu", optimization=level, threads=threads)
            trace = run_steps(job, None, job.read_input(), runner)
            out = work / f"honest-{level}-{threads}.vmb"
            seal_trace(job, trace, key=key, runner=cheater.runner, out=out)
            honest_bundles.append(out)
        false_positives = 0
        say(f"honest: {honest} verifications over {len(honest_variations)} variations")
        for t in range(honest):
            verdict = verify(
                honest_bundles[t % len(honest_bundles)],
                job=job,
                node_key=key.public,
                seed=rng.getrandbits(53),
                samples="all" if t % 10 == 0 else None,
            )
            false_positives += verdict.status != "accept"

        def play(strategy: str) -> None:
            """One trial of ``strategy``."""
            if strategy == "lazy":
                bundle = cheater.lazy(lazy_fraction)
                judge(strategy, bundle, miss_probability(costs, cheater.caught_by(cheater.last_trace), samples, always))
            elif strategy == "perturb-final":
                judge(strategy, cheater.perturb_step(len(job.steps) - 1), 0.0)
            elif strategy == "perturb-intermediate":
                index = rng.randrange(len(job.steps) - 1) if len(job.steps) > 1 else 0
                bundle = cheater.perturb_step(index)
                judge(strategy, bundle, miss_probability(costs, cheater.caught_by(cheater.last_trace), samples, always))
            elif strategy in ("weights-fp16", "weights-bf16", "substituted-model", "tf32-emulated"):
                bundle = cheater.altered_weights(strategy)
                judge(strategy, bundle, miss_probability(costs, cheater.caught_by(cheater.last_trace), samples, always))
            elif strategy == "wrong-input":
                judge(strategy, cheater.wrong_input(), 0.0)
            elif strategy == "replay":
                judge(strategy, honest_bundles[0], 0.0, target=other_job)
            elif strategy == "forged-commitment":
                judge(strategy, cheater.forged_commitment(), 0.0)
            elif strategy == "unsealed-bytes":
                judge(strategy, cheater.unsealed_bytes(lazy_fraction), 0.0)
            elif strategy in LAUNDERING:
                made = cheater.launder(strategy)
                if made is None:
                    outcomes[strategy].inapplicable += 1
                    return
                bundle, laundered = made
                caught = cheater.caught_by(laundered)
                harmful = cheater.harmful(laundered)
                accepted = judge(strategy, bundle, miss_probability(costs, caught, samples, always))
                outcomes[strategy].harmful += harmful
                outcomes[strategy].wrong_accepted += harmful and accepted

        for strategy in (s for s in STRATEGIES if s in strategies):
            say(f"{strategy}: {trials} trials")
            for _ in range(trials):
                try:
                    play(strategy)
                except StepExecutionError:  # the model does not run on what the cheat changed
                    outcomes[strategy].inapplicable += 1
            if strategy == "equivocation":
                outcomes[strategy] = _equivocation_trials(
                    job, key, cheater, work, trials, Ledger, register_node, verify_and_settle
                )
        report = {
            "model": model.name,
            "steps": len(job.steps),
            "samples": samples,
            "trials": trials,
            "gain": gain,
            "lazy_fraction": lazy_fraction,
            "step_costs": costs,
            "honest": {
                "verifications": honest,
                "false_positives": false_positives,
                "variations": [f"cpu/{lv}/threads={th}" for lv, th in honest_variations],
            },
            "strategies": [outcomes[s].to_json(gain) for s in STRATEGIES if s in strategies],
        }
        return report


def _tf32(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """TF32 keeps 10 mantissa bits: round float32 weights to them (no GPU here; weights only)."""
    bits = w.astype(np.float32).view(np.uint32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return rounded.astype(np.uint32).view(np.float32)


def _equivocation_trials(
    job: Job, key: SecretKey, cheater: _Cheater, work: Path, trials: int, ledger_cls: Any, register: Any, settle: Any
) -> Outcome:
    """The node signs two results for one job whose outputs differ beyond the tolerance: the
    equivocation evidence made from the two bundles must slash it every time.

    Each trial is a fresh ledger: the node registers with a request it signs, the job owner posts
    the job, the operator settles the honest bundle, then anyone holding both bundles writes the
    evidence (``spot.equivocation``) and the operator slashes with it. (Two statements whose
    outputs agree within the tolerance, an honest re-prove on another platform, prove nothing.)"""
    from verimesh.errors import VerificationFailedError
    from verimesh.ledger.events import sign_request
    from verimesh.settlement import register_job, slash_with_evidence
    from verimesh.spot.equivocation import write_equivocation_evidence

    outcome = Outcome("equivocation")
    op, owner = generate_key(), generate_key()
    for t in range(trials):
        ledger = ledger_cls.create(str(work / f"eq-{t}.db"), op)
        register(ledger, sign_request(key, action="register", ledger_id=ledger.ledger_id, amount=100), writer=op)
        post = sign_request(owner, action="job", ledger_id=ledger.ledger_id, amount=10, job_id=job.job_id)
        register_job(ledger, post, writer=op)
        honest = cheater._seal(dict(cheater.honest))
        settle(honest, job=job, ledger=ledger, writer=op)
        second = cheater.perturb_step(len(job.steps) - 1)  # other outputs, beyond the tolerance
        evidence = work / f"eq-{t}.vme"
        write_equivocation_evidence(
            evidence,
            job=job,
            first=read_bundle(honest, version=job.version),
            second=read_bundle(second, version=job.version),
            public=key.public,
        )
        outcome.trials += 1
        outcome.predicted.append(1.0)
        try:
            slashed = slash_with_evidence(ledger, evidence, writer=op)
        except VerificationFailedError:
            continue
        if slashed.reason == "equivocation" and slashed.amount > 0:
            outcome.detected += 1
            outcome.reasons["equivocation"] = outcome.reasons.get("equivocation", 0) + 1
    return outcome


def detection_curves(
    model: Path,
    input_file: Path,
    *,
    trials: int,
    steps: int | None = None,
    seed: int = 0,
    lazy_fraction: float = 0.25,
) -> dict[str, Any]:
    """Measured and predicted detection against samples per job, for the cheats whose detection
    depends on sampling (lazy, one intermediate step)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="verimesh-curves-") as tmp:
        work = Path(tmp)
        job = new_job(model, input_file, work / "job.json", steps=steps)
        key = generate_key()
        cheater = _Cheater(job, key, work, rng)
        costs = [s.cost for s in job.steps]
        always = frozenset(mandatory_steps(job))
        ks = list(range(0, len(job.steps)))
        curves: dict[str, dict[str, list[float]]] = {}
        for strategy in ("lazy", "perturb-intermediate"):
            measured, predicted = [], []
            for k in ks:
                hits, preds = 0, []
                for _ in range(trials):
                    if strategy == "lazy":
                        bundle = cheater.lazy(lazy_fraction)
                    else:
                        index = rng.randrange(max(len(job.steps) - 1, 1))
                        bundle = cheater.perturb_step(index)
                    verdict = verify(bundle, job=job, node_key=key.public, samples=k, seed=rng.getrandbits(53))
                    hits += verdict.status != "accept"
                    preds.append(1 - miss_probability(costs, cheater.caught_by(cheater.last_trace), k, always))
                measured.append(hits / trials)
                predicted.append(sum(preds) / len(preds))
            curves[strategy] = {"measured": measured, "predicted": predicted}
        return {"model": model.name, "samples": ks, "trials": trials, "curves": curves}


def plot_curves(curves: Sequence[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from verimesh.errors import BackendUnavailableError

        raise BackendUnavailableError("--plot needs matplotlib", hint="pip install matplotlib") from exc
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, data in zip(axes[0], curves, strict=True):
        for strategy, series in data["curves"].items():
            line = ax.plot(data["samples"], series["predicted"], label=f"{strategy} (predicted)")[0]
            ax.plot(data["samples"], series["measured"], "o", color=line.get_color(), label=f"{strategy} (measured)")
        ax.set_xticks(data["samples"])
        ax.set_title(f"{data['model']} ({data['trials']} trials per point)")
        ax.set_xlabel("samples per job (beside the last step)")
        ax.set_ylabel("detection rate per job")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def markdown_report(reports: Sequence[dict[str, Any]]) -> str:
    lines = []
    for r in reports:
        h = r["honest"]
        lines += [
            f"### {r['model']} ({r['steps']} steps, samples = {r['samples']}, {r['trials']} trials per strategy)",
            "",
            f"Honest: {h['false_positives']} false positives in {h['verifications']} verifications over "
            f"{len(h['variations'])} variations ({', '.join(h['variations'])}).",
            "",
            "| strategy | detected | rate | 95% interval | predicted | within | min stake (gain 1) | harmful | "
            "wrong accepted | caught by |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        idle = []
        for s in r["strategies"]:
            if not s["trials"]:  # the strategy found nothing to attack in this model
                idle.append(s["strategy"])
                continue
            pred = "-" if s["predicted"] is None else f"{max(s['predicted'], 0.0):.3f}"  # never "-0.000"
            stake = "inf" if s["min_stake"] == float("inf") else f"{s['min_stake']:.2f}"
            reasons = ", ".join(f"{k} ({v})" for k, v in sorted(s["reasons"].items(), key=lambda kv: -kv[1])[:3])
            # Measured for the laundering strategies only: every other cheat moves values beyond the
            # tolerance, so each of its undetected trials is a wrong result accepted.
            measured = s["strategy"] in LAUNDERING
            harm = s.get("harmful", 0) if measured else "-"
            wrong = s.get("wrong_accepted", 0) if measured else "-"
            lines.append(
                f"| {s['strategy']} | {s['detected']}/{s['trials']} | {s['rate']:.3f} | "
                f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | {pred} | {'yes' if s['within_ci'] else 'NO'} | "
                f"{stake} | {harm} | {wrong} | {reasons} |"
            )
        if idle:
            lines += ["", f"Not played (nothing in this model to attack that way): {', '.join(idle)}."]
        lines.append("")
    return "\n".join(lines)
