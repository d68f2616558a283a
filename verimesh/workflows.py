"""The workflows a user runs: ``prove`` (node operator) and ``verify`` (job owner).

Both take their I/O as arguments and return values; neither prints nor exits. ``seal_trace`` is
public so that a worker with its own execution loop (or a red-team cheat) can commit to and sign
a trace with exactly the code honest workers use.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from verimesh.core.container import DEFAULT_LIMITS, Limits
from verimesh.core.digest import parse_digest, sha256_bytes, tensor_digest
from verimesh.core.tensors import DTYPES
from verimesh.errors import InvalidInputError
from verimesh.jobs.bundle import Bundle, BundleWriter, read_bundle, trace_document
from verimesh.jobs.job import Job, load_job
from verimesh.jobs.runtime import StepRunner
from verimesh.jobs.verdict import Check, Verdict
from verimesh.signing.envelope import Envelope, make_statement, sign_statement
from verimesh.signing.keys import PublicKey, SecretKey, load_public_key
from verimesh.spot.evidence import write_evidence
from verimesh.spot.spotcheck import (
    COMMITMENT_ALGORITHM,
    PREDICATE_TYPE,
    Commitment,
    Progress,
    commit_entries,
    recheck_step,
    run_steps,
    sample_steps,
    seeded_rng,
    spot_predicate,
)

Samples = int | Literal["all"] | None


@dataclass(frozen=True)
class ProveResult:
    bundle: Path
    job_id: str
    node_id: str
    root: str
    outputs: dict[str, str]
    provider: str
    bytes_written: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "job_id": self.job_id,
            "node_id": self.node_id,
            "commitment_root": self.root,
            "outputs": self.outputs,
            "provider": self.provider,
            "bytes": self.bytes_written,
            "seconds": round(self.seconds, 4),
        }


def _as_job(job: Job | Path) -> Job:
    return job if isinstance(job, Job) else load_job(job)


def _check_trace_dtypes(job: Job, trace: Mapping[str, np.ndarray]) -> None:
    missing = [n for n in job.trace_names if n not in trace]
    if missing:
        raise InvalidInputError(f"trace lacks tensors {missing[:5]}")
    for name in job.trace_names:
        if trace[name].dtype.name not in DTYPES:
            raise InvalidInputError(f"step output {name!r} has dtype {trace[name].dtype}, which cannot be committed")


def _sign_and_finish(
    job: Job, writer: BundleWriter, *, key: SecretKey, runner: StepRunner
) -> tuple[Envelope, int, Commitment]:
    commitment = commit_entries(writer.entries())
    if tuple(e.name for e in commitment.entries) != job.trace_names:
        raise InvalidInputError("trace tensors were not written in the job's trace order")
    trace_bytes = trace_document(commitment.entries)
    predicate = spot_predicate(
        job, node_id=key.node_id, runner=runner, commitment=commitment, proof_digest=sha256_bytes(trace_bytes)
    )
    by_name = {e.name: e.digest for e in commitment.entries}
    statement = make_statement({n: by_name[n] for n in job.output_names}, PREDICATE_TYPE, predicate)
    envelope = sign_statement(statement, key)
    return envelope, writer.finish(envelope), commitment


def seal_trace(
    job: Job, trace: Mapping[str, np.ndarray], *, key: SecretKey, runner: StepRunner, out: Path
) -> tuple[Envelope, int, Commitment]:
    """Commit to a full trace, sign the statement and write the bundle. Returns (envelope, size, commitment)."""
    _check_trace_dtypes(job, trace)
    writer = BundleWriter(out)
    try:
        for name in job.trace_names:
            writer.add_tensor(name, trace[name])
        return _sign_and_finish(job, writer, key=key, runner=runner)
    except BaseException:
        writer.abort()
        raise


class Worker:
    """A node operator's prover for a serving loop: one key, sessions and file digests reused.

    Step sessions are cached per step digest (a step file is read and digest-checked only the
    first time), and a model file's digest is cached by (path, size, mtime).
    """

    def __init__(
        self, key: SecretKey, *, device: str = "auto", threads: int = 0, srs: Path | None = None,
        zk_timeout: float = 3600.0,
    ) -> None:  # fmt: skip
        self.key = key
        self.device = device
        self.threads = threads
        self.srs = srs
        self.zk_timeout = zk_timeout
        self._zk: Any = None
        self._runners: dict[tuple[str, str], StepRunner] = {}
        self._digests: dict[tuple[str, int, int], str] = {}

    def runner(self, job: Job) -> StepRunner:
        config = (job.policy.precision, job.policy.optimization)
        if config not in self._runners:
            self._runners[config] = StepRunner(
                device=self.device, precision=config[0], optimization=config[1], threads=self.threads
            )
        return self._runners[config]

    def _file_digest(self, path: Path) -> str:
        from verimesh.core.digest import sha256_file

        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = sha256_file(path)
        return self._digests[key]

    def prove(
        self, job: Job | Path, *, out: Path, model: Path | None = None, progress: Progress | None = None
    ) -> ProveResult:
        """Run a spot-mode job and write its bundle.

        1. Check the model, the step files and the input against the job's digests (refuse otherwise).
        2. Run the steps in order with onnxruntime, keeping every boundary tensor.
        3. Commit to the trace (RFC 9162 root over tensor digests), sign the statement, write the bundle.
        """
        started = time.perf_counter()
        job = _as_job(job)
        if job.mode == "zk":
            return self._prove_zk(job, out=out, model=model, progress=progress, started=started)
        # 1. (step files are checked when their session is first created, in run_steps)
        job.check_model_file(model, digest_of=self._file_digest)
        inputs = job.read_input()
        runner = self.runner(job)
        # 2. and 3. overlap: each step's outputs are digested and written while the next step runs.
        writer = BundleWriter(out)
        try:
            trace = run_steps(job, None, inputs, runner, progress=progress, on_tensor=writer.add_tensor)
            _check_trace_dtypes(job, trace)
            _, size, commitment = _sign_and_finish(job, writer, key=self.key, runner=runner)
        except BaseException:
            writer.abort()
            raise
        digests = {e.name: e.digest for e in commitment.entries}
        outputs = {n: digests[n] for n in job.output_names}
        elapsed = time.perf_counter() - started
        return ProveResult(
            out, job.job_id, self.key.node_id, commitment.root_digest, outputs, runner.provider, size, elapsed
        )

    def _prove_zk(
        self, job: Job, *, out: Path, model: Path | None, progress: Progress | None, started: float
    ) -> ProveResult:
        from verimesh.zk.ezkl_backend import ZkProver
        from verimesh.zk.zkmode import prove_zk

        if self._zk is None:
            self._zk = ZkProver(timeout=self.zk_timeout)
        size, proofs_digest, outputs = prove_zk(
            job, key=self.key, prover=self._zk, out=out, srs=self.srs, model=model, progress=progress,
            digest_of=self._file_digest,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        return ProveResult(out, job.job_id, self.key.node_id, proofs_digest, outputs, "ezkl", size, elapsed)

    def close(self) -> None:
        """Stop the zk worker process, if one was started."""
        if self._zk is not None:
            self._zk.close()
            self._zk = None


def prove(
    job: Job | Path,
    *,
    key: SecretKey,
    out: Path,
    device: str = "auto",
    model: Path | None = None,
    progress: Progress | None = None,
    srs: Path | None = None,
) -> ProveResult:
    """One-shot ``Worker(key, device=device).prove(job, out=out)``; see ``Worker.prove``."""
    worker = Worker(key, device=device, srs=srs)
    try:
        return worker.prove(job, out=out, model=model, progress=progress)
    finally:
        worker.close()


class _Rejected(Exception):
    """Internal: stops verification at the first failed check (never escapes ``verify``)."""

    def __init__(self, check: Check, evidence: dict[str, Any] | None = None) -> None:
        super().__init__(check.name)
        self.check = check
        self.evidence = evidence


def verify(
    bundle: Path,
    *,
    job: Job | Path,
    node_key: PublicKey | Path,
    samples: Samples = None,
    seed: int | None = None,
    evidence_out: Path | None = None,
    runner: StepRunner | None = None,
    limits: Limits = DEFAULT_LIMITS,
    check_all_digests: bool = False,
    srs: Path | None = None,
) -> Verdict:
    """Verify a spot-check bundle against the job and the node key the job owner expects.

    ``node_key``: the public key (or key file) the job owner expects; ``settlement`` takes it
    from the ledger.
    ``samples``: extra steps checked beside the last (``None``: the job's policy; ``"all"``: every
    step). ``seed``: makes the sample reproducible (it is recorded in the verdict either way).
    ``check_all_digests``: hash every shipped tensor, not only those the verdict rests on (the job
    input, the outputs and the sampled steps' tensors); the others are bound by the Merkle root
    over their declared digests and by the container's CRCs either way (docs/format.md §7).

    1. Parse the bundle within limits (a malformed bundle is an ``error`` verdict).
    2. Check the envelope signature against the pinned node key.
    3. Check the statement's bindings: job id, node id, model and input digests, step range,
       precision and commitment parameters.
    4. Check the trace: names and order are the job's, the declared digests give the signed root,
       the committed input is the job's input, the outputs are the subjects, and the input and
       output tensors match their digests.
    5. Sample steps with verifier-side randomness: the last one, plus ``samples`` more by cost.
    6. For each sampled step, check its tensors against their digests, re-run it from its
       committed inputs and compare under the job's tolerance.
    7. Return the verdict; on a reject that the node's own signature proves, write evidence.
    """
    job = _as_job(job)
    public = node_key if isinstance(node_key, PublicKey) else load_public_key(node_key)
    # 53 bits: seeds travel in JSON, whose safe integers stop at 2^53 (RFC 8785, I-JSON).
    seed = seed if seed is not None else int.from_bytes(os.urandom(8), "big") >> 11
    checks: list[Check] = []
    sampled: tuple[int, ...] = ()
    outputs: dict[str, str] = {}

    def verdict(status: Literal["accept", "reject", "error"], evidence: str | None = None) -> Verdict:
        return Verdict(status, tuple(checks), job.job_id, public.node_id, seed, sampled, evidence, outputs)

    # 1.
    try:
        parsed = read_bundle(bundle, limits=limits)
    except InvalidInputError as exc:
        checks.append(Check("bundle-format", False, exc.message))
        return verdict("error")
    checks.append(Check("bundle-format", True, f"{len(parsed.trace)} tensors, {len(parsed.proofs)} proofs"))
    if job.mode == "zk":
        from verimesh.zk.zkmode import ZkReject, check_zk

        signature = _signature_check(parsed, public)
        checks.append(signature)
        if not signature.ok:
            return verdict("reject")
        try:
            check_zk(parsed, job, public, checks, srs=srs)
        except ZkReject as rejected:
            checks.append(rejected.check)
            return verdict("reject")
        outputs.update({e.name: e.digest for e in parsed.trace})
        return verdict("accept")
    try:
        # 2.-4.
        digests = _DigestCheck(parsed)
        leaf_hashes = _check_envelope_and_trace(parsed, job, public, checks, digests)
        if check_all_digests:
            digests.require(job.trace_names)
            checks.append(Check("all-digests", True, f"every one of {len(job.trace_names)} tensors hashed"))
        outputs.update({n: t.digest for n in job.output_names for t in parsed.trace if t.name == n})
        # 5.
        k = len(job.steps) if samples == "all" else job.policy.samples if samples is None else samples
        if not isinstance(k, int) or k < 0:
            raise InvalidInputError("samples must be a non-negative integer or 'all'")
        sampled = sample_steps(job, k, seeded_rng(seed))
        checks.append(Check("sampling", True, f"seed {seed}: steps {list(sampled)} of {len(job.steps)}"))
        # 6.
        runner = runner or StepRunner(
            device="cpu", precision=job.policy.precision, optimization=job.policy.optimization
        )
        for index in sampled:
            digests.require([*job.steps[index].inputs, *job.steps[index].outputs])
            # The step file is read and digest-checked only if the runner has no session for it yet.
            load = lambda i=index: job.read_step_model(i)  # noqa: E731
            result = recheck_step(job, index, load, parsed.tensors, runner, job.policy.tolerance_for(index))
            metrics = {n: c.metrics for n, c in zip(job.steps[index].outputs, result.comparisons, strict=True)}
            check = Check(
                f"recheck-step-{index}", result.ok, result.reason or "outputs within tolerance", metrics=metrics
            )
            if not result.ok:
                step = job.steps[index]
                raise _Rejected(
                    check,
                    {
                        "kind": "step-mismatch",
                        "step": index,
                        "step_model": job.read_step_model(index),
                        "tensor_names": [*step.inputs, *step.outputs],
                        "leaf_hashes": leaf_hashes,
                    },
                )
            checks.append(check)
    except _Rejected as rejected:
        checks.append(rejected.check)
        evidence_path = None
        if rejected.evidence is not None:
            evidence_path = evidence_out or bundle.with_name(bundle.stem + ".evidence.vme")
            ev = rejected.evidence
            write_evidence(
                evidence_path,
                kind=ev["kind"],
                job=job,
                envelope=parsed.envelope,
                public=public,
                reason=rejected.check.detail,
                tensors=parsed.tensors,
                tensor_names=ev["tensor_names"],
                leaf_hashes=ev["leaf_hashes"],
                step=ev.get("step"),
                step_model=ev.get("step_model"),
                binding_field=ev.get("field"),
            )
        return verdict("reject", str(evidence_path) if evidence_path else None)
    # 7.
    return verdict("accept")


def _signature_check(parsed: Bundle, public: PublicKey) -> Check:
    if parsed.envelope.signed_by(public):
        return Check("signature", True, f"signed by {public.node_id}")
    keyids = ", ".join(s.keyid for s in parsed.envelope.signatures)
    return Check("signature", False, "no valid signature by the pinned node key", public.node_id, keyids)


class _DigestCheck:
    """Hashes shipped tensors on demand, each once, and rejects one that is not its declared digest."""

    def __init__(self, parsed: Bundle) -> None:
        self._parsed = parsed
        self._declared = {e.name: e.digest for e in parsed.trace}
        self._done: set[str] = set()

    def require(self, names: Sequence[str]) -> None:
        for name in names:
            if name in self._done:
                continue
            actual = tensor_digest(name, self._parsed.tensors[name])
            if actual != self._declared[name]:
                detail = f"tensor {name!r} does not match its digest"
                raise _Rejected(Check("trace", False, detail, self._declared[name], actual))
            self._done.add(name)


def _check_envelope_and_trace(
    parsed: Bundle, job: Job, public: PublicKey, checks: list[Check], digests: _DigestCheck
) -> tuple[bytes, ...]:
    """Steps 2-4 of ``verify``; appends passed checks, raises ``_Rejected`` at the first failure."""
    from verimesh.core import merkle

    # 2.
    signature = _signature_check(parsed, public)
    if not signature.ok:
        raise _Rejected(signature)
    checks.append(signature)
    # 3.
    try:
        statement = parsed.envelope.statement()
    except InvalidInputError as exc:
        raise _Rejected(Check("statement", False, exc.message)) from exc
    pred = statement["predicate"]
    if statement["predicateType"] != PREDICATE_TYPE:
        raise _Rejected(
            Check("statement", False, "wrong predicate type", PREDICATE_TYPE, str(statement["predicateType"]))
        )
    if pred.get("job_id") != job.job_id:
        raise _Rejected(
            Check(
                "job-binding", False, "the bundle is for another job (replayed?)", job.job_id, str(pred.get("job_id"))
            )
        )
    if pred.get("node_id") != public.node_id:
        raise _Rejected(
            Check("node-binding", False, "statement names another node", public.node_id, str(pred.get("node_id")))
        )
    for field_name, pinned in (("model_digest", job.model_digest), ("input_digest", job.input_digest)):
        if pred.get(field_name) != pinned:
            detail = f"signed {field_name} differs from the job's"
            raise _Rejected(
                Check(field_name.replace("_digest", "-binding"), False, detail, pinned, str(pred.get(field_name))),
                {"kind": "binding", "field": field_name, "tensor_names": [], "leaf_hashes": ()},
            )
    runtime = pred.get("runtime") if isinstance(pred.get("runtime"), dict) else {}
    commitment = pred.get("commitment") if isinstance(pred.get("commitment"), dict) else {}
    expected = {
        "mode": ("spot", pred.get("mode")),
        "step_range": ([0, len(job.steps)], pred.get("step_range")),
        "precision": (job.policy.precision, runtime.get("precision")),
        "optimization": (job.policy.optimization, runtime.get("optimization")),
        "commitment algorithm": (COMMITMENT_ALGORITHM, commitment.get("algorithm")),
        "commitment leaves": (len(job.trace_names), commitment.get("leaves")),
    }
    for what, (want, got) in expected.items():
        if want != got:
            raise _Rejected(Check("statement", False, f"{what} differs from the job's", str(want), str(got)))
    try:
        root = parse_digest(commitment.get("root"), what="commitment root")
    except InvalidInputError as exc:
        raise _Rejected(Check("statement", False, exc.message)) from exc
    checks.append(
        Check("statement", True, f"job {job.job_id[:19]}…, {len(job.steps)} steps, {runtime.get('provider')}")
    )
    # 4.
    if sha256_bytes(parsed.trace_bytes) != pred.get("proof_digest"):
        raise _Rejected(Check("trace", False, "trace.json is not the one the statement signs"))
    names = tuple(e.name for e in parsed.trace)
    if names != job.trace_names:
        raise _Rejected(
            Check(
                "trace",
                False,
                "trace tensors differ from the job's step boundaries",
                ", ".join(job.trace_names)[:200],
                ", ".join(names)[:200],
            )
        )
    # The root binds every declared digest; tensors are hashed where the verdict rests on them.
    leaf_hashes = [merkle.leaf_hash(parse_digest(e.digest)) for e in parsed.trace]
    computed_root = merkle.root_from_leaf_hashes(leaf_hashes)
    if computed_root != root:
        raise _Rejected(
            Check("commitment", False, "tensor digests do not give the signed root", root.hex(), computed_root.hex())
        )
    checks.append(Check("commitment", True, f"{len(leaf_hashes)} leaves under the signed root"))
    by_name = {e.name: e.digest for e in parsed.trace}
    digests.require([*(t.name for t in job.input_tensors), *job.output_names])
    for ref in job.input_tensors:
        if by_name[ref.name] != ref.digest:
            raise _Rejected(
                Check(
                    "input-binding",
                    False,
                    f"committed input {ref.name!r} is not the job's input",
                    ref.digest,
                    by_name[ref.name],
                ),
                {
                    "kind": "binding",
                    "field": "input-tensor",
                    "tensor_names": [ref.name],
                    "leaf_hashes": tuple(leaf_hashes),
                },
            )
    subjects = {s["name"]: "sha256:" + s["digest"]["sha256"] for s in statement["subject"]}
    claimed = {n: by_name[n] for n in job.output_names}
    if subjects != claimed:
        raise _Rejected(
            Check(
                "output-binding", False, "statement subjects are not the committed outputs", str(claimed), str(subjects)
            )
        )
    checks.append(Check("bindings", True, "input is the job's, outputs are the signed subjects"))
    return tuple(leaf_hashes)
