"""The built-in tamper set: deterministic attacks on an honest bundle that ``verify`` must never accept.

``verimesh regress`` runs it on every case. Each tamper is something a dishonest node or a party
on the wire can do with the public API and the honest bundle in hand; none depends on the
verifier's sampling (the regression suite verifies them with ``samples="all"``, and the
probabilistic cheats are measured by the red team's detection budgets instead).

Spot mode: the final output or an intermediate tensor changed and honestly re-committed and
signed, a wrong job input, fp16 weights, a tensor swapped after signing, another node's
signature, a replay against another job, one flipped byte, a truncated file.
zk mode: the claimed output other than the proven one, an edited output instance, a truncated
proof, and the same wire-level tampers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verimesh.core.tensors import TensorRef
from verimesh.errors import InvalidInputError, StepExecutionError
from verimesh.jobs.bundle import Bundle, read_bundle, write_bundle
from verimesh.jobs.job import Job
from verimesh.jobs.runtime import StepRunner
from verimesh.signing.keys import SecretKey

SPOT_TAMPERS = (
    "output-perturbed",
    "intermediate-perturbed",
    "wrong-input",
    "weights-fp16",
    "tensor-swapped-after-signing",
    "signed-by-another-key",
    "replayed-to-another-job",
    "byte-flipped",
    "truncated",
)
ZK_TAMPERS = (
    "claimed-output-not-proven",
    "output-instance-edited",
    "proof-truncated",
    "tensor-swapped-after-signing",
    "signed-by-another-key",
    "replayed-to-another-job",
    "byte-flipped",
    "truncated",
)


@dataclass(frozen=True)
class Inapplicable:
    """A tamper the model offers nothing to work on (a step that cannot run on any change of an
    integer input, say), and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Tampered:
    """A tampered bundle and the job it is to be verified against (another one for a replay)."""

    name: str
    bundle: Path
    job: Job


def garble(array: np.ndarray, rng: random.Random, scale: float) -> np.ndarray:
    """A copy with one element changed. Floats: moved by ``scale`` times (1 + the largest
    magnitude). Integers and bools (token ids, indices, shapes): replaced by another value the
    tensor already holds, or the next one within its range, so that the change stays a value the
    model accepts wherever the tensor has more than one."""
    out = np.array(array, copy=True)
    flat = out.reshape(-1)
    if not flat.size:
        return out
    i = rng.randrange(flat.size)
    if out.dtype.kind == "f":
        flat[i] += out.dtype.type(scale * (1 + float(np.abs(flat).max())))
    elif out.dtype.kind == "b":
        flat[i] = not flat[i]
    else:
        others = np.unique(flat[flat != flat[i]])
        flat[i] = others[rng.randrange(others.size)] if others.size else flat[i] + 1
    return out


def swap_after_signing(bundle: Path, out: Path, rng: random.Random) -> Path:
    """Change one shipped tensor and its declared digest, keeping the signed envelope as it was."""
    parsed = read_bundle(bundle)
    victim = rng.choice([e.name for e in parsed.trace])
    tensors = {k: np.array(v) for k, v in parsed.tensors.items()}
    tensors[victim] = garble(tensors[victim], rng, 0.01)
    entries = tuple(TensorRef.of(e.name, tensors[e.name]) if e.name == victim else e for e in parsed.trace)
    write_bundle(out, parsed.envelope, entries, tensors, parsed.proofs, version=parsed.version)
    return out


def flip_byte(bundle: Path, out: Path, rng: random.Random) -> Path:
    data = bytearray(bundle.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    out.write_bytes(bytes(data))
    return out


def truncate(bundle: Path, out: Path) -> Path:
    data = bundle.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


class Tamperer:
    """Makes the tampers of one job's mode from its honest bundle (signed by ``key``).

    ``other_job`` is the same model and input under another job id (the replay target);
    ``other_key`` is another node's key."""

    def __init__(self, job: Job, *, key: SecretKey, other_key: SecretKey, other_job: Job, seed: int = 0) -> None:
        self.job, self.other_job = job, other_job
        self.rng = random.Random(seed)
        self.names = SPOT_TAMPERS if job.mode == "spot" else ZK_TAMPERS
        self._makers = _spot_makers(job, key, other_key) if job.mode == "spot" else _zk_makers(job, key, other_key)

    def make(self, name: str, bundle: Path, out: Path) -> Tampered | Inapplicable:
        try:
            return self._make(name, bundle, out)
        except StepExecutionError as exc:
            return Inapplicable(name, f"the model does not run on the changed trace ({exc.message[:160]})")

    def _make(self, name: str, bundle: Path, out: Path) -> Tampered:
        if name not in self.names:
            raise InvalidInputError(f"no tamper {name!r} in {self.job.mode} mode", hint=f"known: {self.names}")
        if name == "replayed-to-another-job":
            return Tampered(name, bundle, self.other_job)
        if name == "tensor-swapped-after-signing":
            return Tampered(name, swap_after_signing(bundle, out, self.rng), self.job)
        if name == "byte-flipped":
            return Tampered(name, flip_byte(bundle, out, self.rng), self.job)
        if name == "truncated":
            return Tampered(name, truncate(bundle, out), self.job)
        return Tampered(name, self._makers[name](read_bundle(bundle), out, self.rng), self.job)


def tamper_set(
    job: Job,
    bundle: Path,
    *,
    key: SecretKey,
    other_key: SecretKey,
    other_job: Job,
    work: Path,
    seed: int = 0,
) -> Iterator[Tampered | Inapplicable]:
    """Yield every tamper of the job's mode made from the honest ``bundle``, written under ``work``
    (or why the model offers it nothing to work on)."""
    work.mkdir(parents=True, exist_ok=True)
    tamperer = Tamperer(job, key=key, other_key=other_key, other_job=other_job, seed=seed)
    for name in tamperer.names:
        yield tamperer.make(name, bundle, work / f"{name}.vmb")


_Maker = Callable[[Bundle, Path, random.Random], Path]


def _spot_makers(job: Job, key: SecretKey, other_key: SecretKey) -> dict[str, _Maker]:
    from verimesh.assurance.calibrate import cheat_step
    from verimesh.workflows import seal_trace

    runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
    models = job.read_step_models()

    def honest(parsed: Bundle) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in parsed.tensors.items()}

    def recompute(trace: dict[str, np.ndarray], first: int, blobs: Sequence[bytes] | None = None) -> None:
        for step in job.steps[first:]:
            blob = (blobs or models)[step.index]
            cache_key = step.digest if blobs is None else f"tampered-{step.digest}"
            trace.update(runner.run(cache_key, blob, {n: trace[n] for n in step.inputs}, step.outputs))

    def seal(trace: dict[str, np.ndarray], out: Path, signer: SecretKey = key) -> Path:
        seal_trace(job, trace, key=signer, runner=runner, out=out)
        return out

    def output_perturbed(parsed: Bundle, out: Path, rng: random.Random) -> Path:
        trace = honest(parsed)
        name = job.output_names[0]
        trace[name] = garble(trace[name], rng, 0.01)
        return seal(trace, out)

    def intermediate_perturbed(parsed: Bundle, out: Path, rng: random.Random) -> Path:
        trace = honest(parsed)
        name = job.steps[0].outputs[0]
        trace[name] = garble(trace[name], rng, 0.01)
        recompute(trace, 1)  # every later step honest: only step 0's re-run can tell
        return seal(trace, out)

    def wrong_input(parsed: Bundle, out: Path, rng: random.Random) -> Path:
        trace = honest(parsed)
        for spec in job.model_inputs:
            trace[spec.name] = garble(trace[spec.name], rng, 0.5)
        recompute(trace, 0)
        return seal(trace, out)

    def weights_fp16(parsed: Bundle, out: Path, rng: random.Random) -> Path:
        trace = honest(parsed)
        recompute(trace, 0, [cheat_step(m, "weights-fp16") or m for m in models])
        return seal(trace, out)

    def another_key(parsed: Bundle, out: Path, rng: random.Random) -> Path:
        return seal(honest(parsed), out, other_key)

    return {
        "output-perturbed": output_perturbed,
        "intermediate-perturbed": intermediate_perturbed,
        "wrong-input": wrong_input,
        "weights-fp16": weights_fp16,
        "signed-by-another-key": another_key,
    }


def _zk_makers(job: Job, key: SecretKey, other_key: SecretKey) -> dict[str, _Maker]:
    from verimesh.zk.zkmode import write_zk_bundle

    circuit = job.load_circuit()

    def reseal(
        parsed: Bundle,
        out: Path,
        *,
        signer: SecretKey = key,
        proofs: tuple[bytes, ...] | None = None,
        outputs: dict[str, np.ndarray] | None = None,
    ) -> Path:
        """What a cheating worker can do: any proofs and outputs, validly signed by itself."""
        proofs = parsed.proofs if proofs is None else proofs
        tensors = outputs or {k: np.array(v) for k, v in parsed.tensors.items()}
        write_zk_bundle(job, circuit, key=signer, outputs=tensors, proofs=proofs, out=out)
        return out

    def claimed_output(parsed: Bundle, out: Path, rng: random.Random) -> Path:
        outputs = {k: np.array(v) for k, v in parsed.tensors.items()}
        name = job.output_names[0]
        outputs[name] = garble(outputs[name], rng, 0.01)
        return reseal(parsed, out, outputs=outputs)

    def instance_edited(parsed: Bundle, out: Path, rng: random.Random) -> Path:
        proof = json.loads(parsed.proofs[-1])
        row = proof["instances"][0]
        i = rng.randrange(len(row))
        row[i] = ("01" if row[i][:2] != "01" else "02") + row[i][2:]
        return reseal(parsed, out, proofs=(*parsed.proofs[:-1], json.dumps(proof).encode()))

    def proof_truncated(parsed: Bundle, out: Path, rng: random.Random) -> Path:
        last = parsed.proofs[-1]
        return reseal(parsed, out, proofs=(*parsed.proofs[:-1], last[: len(last) // 2]))

    def another_key(parsed: Bundle, out: Path, rng: random.Random) -> Path:
        return reseal(parsed, out, signer=other_key)

    return {
        "claimed-output-not-proven": claimed_output,
        "output-instance-edited": instance_edited,
        "proof-truncated": proof_truncated,
        "signed-by-another-key": another_key,
    }
