"""The workflows a user runs: ``prove`` (node operator) and ``verify`` (job owner).

Both take their I/O as arguments and return values; neither prints nor exits. ``seal_trace`` is
public so that a worker with its own execution loop (or a red-team cheat) can commit to and sign
a trace with exactly the code honest workers use.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np

from verimesh.core.canonical import canonical_json
from verimesh.core.container import DEFAULT_LIMITS, Limits
from verimesh.core.digest import format_digest, parse_digest, sha256_bytes, tensor_digest
from verimesh.core.tensors import DTYPES, write_tensor_file
from verimesh.errors import IntegrityError, InvalidInputError, StepExecutionError
from verimesh.jobs.bundle import Bundle, BundleWriter, read_bundle, sealed_root, tensor_member, trace_document
from verimesh.jobs.job import Job, load_job
from verimesh.jobs.runtime import StepRunner
from verimesh.jobs.tolerance import same_bits
from verimesh.jobs.verdict import Check, Verdict
from verimesh.signing.envelope import Envelope, make_statement, sign_statement
from verimesh.signing.keys import PublicKey, SecretKey, load_public_key
from verimesh.spot.evidence import store_evidence, write_evidence
from verimesh.spot.sealed_evidence import write_sealed_evidence
from verimesh.spot.spotcheck import (
    COMMITMENT_ALGORITHM,
    COMMITMENT_ALGORITHMS,
    PREDICATE_TYPE,
    PREDICATE_TYPES,
    Progress,
    StepCheck,
    challenged_members,
    commit_entries,
    mandatory_steps,
    recheck_step,
    run_steps,
    sample_steps,
    seeded_rng,
    segment_claim,
    shard_claim,
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


@dataclass(frozen=True)
class Sealed:
    """What a bundle commits to: the envelope, the file size, the signed root, the output digests."""

    envelope: Envelope
    size: int
    root: str
    outputs: dict[str, str]


def _sign_and_finish(
    job: Job, writer: BundleWriter, trace: Mapping[str, np.ndarray], *, key: SecretKey, runner: StepRunner,
    links: Sequence[Mapping[str, object]] = (),
) -> Sealed:  # fmt: skip
    """Commit, sign and close the bundle. Version 1: a root over the declared tensor digests (and
    trace.json's digest). Version 2: a root over every member's BLAKE3 leaf, so the signature
    covers every byte; the subjects are the outputs' SHA-256 tensor digests."""
    entries = writer.entries()
    if tuple(e.name for e in entries) != job.trace_names:
        raise InvalidInputError("trace tensors were not written in the job's trace order")
    if job.version == 1:
        commitment = commit_entries(entries)
        root, leaves = commitment.root, len(commitment.leaf_hashes)
        predicate = spot_predicate(job, node_id=key.node_id, runner=runner, root=root, leaves=leaves,
                                   proof_digest=sha256_bytes(trace_document(entries)))  # fmt: skip
        by_name = {e.name: e.digest for e in entries}
        subjects = {n: by_name[n] for n in job.output_names}
    else:
        sealed = writer.seal()
        root = sealed_root(sealed)
        predicate = spot_predicate(job, node_id=key.node_id, runner=runner, root=root, leaves=len(sealed),
                                   links=links)  # fmt: skip
        subjects = {n: tensor_digest(n, trace[n]) for n in job.output_names}
    envelope = sign_statement(make_statement(subjects, PREDICATE_TYPES[job.version], predicate), key)
    return Sealed(envelope, writer.finish(envelope), format_digest(root), subjects)


def seal_trace(
    job: Job, trace: Mapping[str, np.ndarray], *, key: SecretKey, runner: StepRunner, out: Path,
    links: Sequence[Mapping[str, object]] = (),
) -> Sealed:  # fmt: skip
    """Commit to a full trace, sign the statement and write the bundle (the job's format)."""
    _check_trace_dtypes(job, trace)
    writer = BundleWriter(out, version=job.version)
    try:
        for name in job.trace_names:
            writer.add_tensor(name, trace[name])
        return _sign_and_finish(job, writer, trace, key=key, runner=runner, links=links)
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
        zk_timeout: float = 3600.0, self_check: bool = True,
    ) -> None:  # fmt: skip
        self.key = key
        self.self_check = self_check  # generate mode: re-check the answer with the verifier's pass before signing
        self.device = device
        self.threads = threads
        self.srs = srs
        self.zk_timeout = zk_timeout
        self._zk: Any = None
        self._runners: dict[tuple[str, str], StepRunner] = {}
        self._digests: dict[tuple[str, int, int], str] = {}
        self._layouts: set[tuple[str, bytes]] = set()  # (model digest, layout) pairs checked against the graph

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
        self, job: Job | Path, *, out: Path, model: Path | None = None, progress: Progress | None = None,
        inputs_from: Sequence[Path] = (),
    ) -> ProveResult:  # fmt: skip
        """Run a spot-mode job (or a segment of one) and write its bundle.

        ``inputs_from``: a segment's predecessors' bundles, whose committed outputs are the
        segment's linked inputs (``linked_inputs``).

        1. Check the model, the step files and the input against the job's digests (refuse otherwise).
        2. Run the steps in order with onnxruntime, keeping every boundary tensor.
        3. Commit to the bundle (an RFC 9162 root over every member's BLAKE3 leaf; version 1 jobs:
           over the tensor digests), sign the statement, write the bundle.
        """
        started = time.perf_counter()
        job = _as_job(job)
        if job.mode in ("zk", "generate") and inputs_from:
            raise InvalidInputError("--inputs-from goes with segments of a spot-mode job")
        if job.mode == "zk":
            return self._prove_zk(job, out=out, model=model, progress=progress, started=started)
        if job.mode == "generate":
            return self._prove_generate(job, out=out, model=model, started=started)
        # 1. (step files are checked when their session is first created, in run_steps; a segment
        # runs step files pinned by digest and needs no copy of the whole model)
        if job.segment is None:
            job.check_model_file(model, digest_of=self._file_digest)
        elif model is not None:
            raise InvalidInputError("--model goes with whole jobs: a segment runs only its step files")
        inputs = job.read_input()
        linked, links = linked_inputs(job, inputs_from)
        inputs.update(linked)
        runner = self.runner(job)
        # 2. and 3. overlap: each step's outputs are digested and written while the next step runs.
        writer = BundleWriter(out, version=job.version)
        try:
            trace = run_steps(job, None, inputs, runner, progress=progress, on_tensor=writer.add_tensor)
            _check_trace_dtypes(job, trace)
            sealed = _sign_and_finish(job, writer, trace, key=self.key, runner=runner, links=links)
        except BaseException:
            writer.abort()
            raise
        elapsed = time.perf_counter() - started
        return ProveResult(
            out, job.job_id, self.key.node_id, sealed.root, sealed.outputs, runner.provider, sealed.size, elapsed
        )

    def _prove_zk(
        self, job: Job, *, out: Path, model: Path | None, progress: Progress | None, started: float
    ) -> ProveResult:
        if job.segment is not None:  # segment_view refuses zk jobs; never reached
            raise InvalidInputError("zk jobs have no segments")
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

    def _prove_generate(self, job: Job, *, out: Path, model: Path | None, started: float) -> ProveResult:
        """A generate job: prefill the prompt, decode with the KV cache, and commit one record per
        generated position (its token, top-k logits and sketch; jobs/generation.py), sealed and
        signed like any version 2 bundle."""
        from verimesh.jobs.generation import generate, record, sketch_matrix
        from verimesh.jobs.modelsafety import check_model_bytes

        spec = job.generate
        assert spec is not None
        job.check_model_file(model, digest_of=self._file_digest)
        digest = job.steps[0].digest

        def load() -> bytes:
            if model is None:
                return job.read_step_model(0)
            data = model.read_bytes()
            if sha256_bytes(data) != digest:
                raise IntegrityError(f"model file {model} changed while it was read")
            check_model_bytes(data, what=f"model {model}")
            return data

        runner = self.runner(job)
        checked = (digest, canonical_json(spec.layout.to_json()))
        if checked not in self._layouts:  # parsing a large model costs more than a short answer
            check_generate_layout(job, load())
            self._layouts.add(checked)
        prompt = job.read_input()["input_ids"]
        matrix = sketch_matrix(job.nonce, spec.layout.vocab, spec.sketch)
        rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

        def run(feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
            return runner.run(digest, load, feeds, names)

        tokens = generate(run, spec, prompt, job.nonce, lambda _t, logits: rows.append(record(logits, spec.top_k,
                                                                                             matrix)))  # fmt: skip
        trace = {"input_ids": prompt, "tokens": np.array([tokens], dtype=np.int64),
                 "topk_values": np.stack([r[0] for r in rows]), "topk_indices": np.stack([r[1] for r in rows]),
                 "sketch": np.stack([r[2] for r in rows])}  # fmt: skip
        if self.self_check:
            _self_check_generate(job, trace, load)
        sealed = seal_trace(job, trace, key=self.key, runner=runner, out=out)
        elapsed = time.perf_counter() - started
        return ProveResult(out, job.job_id, self.key.node_id, sealed.root, sealed.outputs, runner.provider,
                           sealed.size, elapsed)  # fmt: skip

    def close(self) -> None:
        """Stop the zk worker process, if one was started."""
        if self._zk is not None:
            self._zk.close()
            self._zk = None


def linked_inputs(
    job: Job, bundles: Sequence[Path], *, limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, np.ndarray], list[dict[str, object]]]:
    """A segment's inputs from earlier segments: from each predecessor's bundle, the tensors this
    segment takes, each checked against that bundle's seal and its signed output digest, and
    the links the segment's statement signs (the predecessor's statement digest and each
    tensor's digest). The predecessor's signature is the verifier's to check (it pins the keys);
    a bundle whose bytes are not the ones its node sealed, or that is not a segment this one
    builds on, is refused here."""
    from verimesh.jobs.segments import segment_id

    if job.segment is None:
        if bundles:
            raise InvalidInputError("--inputs-from goes with segments (`verimesh job split`), not whole jobs")
        return {}, []
    wanted = job.segment.links()
    if not wanted and bundles:
        raise InvalidInputError(f"segment {job.segment.index} takes no inputs from other segments: drop --inputs-from")
    ids = {segment_id(job.segment.parent_job_id, job.segment.ranges, j): j for j in wanted}
    found: dict[int, tuple[str, dict[str, np.ndarray]]] = {}
    for path in bundles:
        parsed = read_bundle(path, limits=limits, version=2)
        statement = parsed.envelope.statement()
        pred = statement["predicate"]
        commitment = pred.get("commitment") if isinstance(pred.get("commitment"), dict) else {}
        if parsed.problems or sealed_root(parsed.leaves) != parse_digest(commitment.get("root"), what="root"):
            raise IntegrityError(f"{path}: its bytes are not a trace its node sealed")
        j = ids.get(str(pred.get("job_id")))
        if j is None:
            raise InvalidInputError(
                f"{path} is not a bundle of a segment this one takes inputs from (segments {sorted(wanted)})"
            )
        if j in found:
            raise InvalidInputError(f"two bundles for segment {j} given to --inputs-from")
        subjects = {s["name"]: "sha256:" + s["digest"]["sha256"] for s in statement["subject"]}
        taken: dict[str, np.ndarray] = {}
        for name in wanted[j]:
            array = parsed.tensors.get(name)
            if array is None or subjects.get(name) != tensor_digest(name, array):
                raise IntegrityError(f"{path}: segment {j}'s signed outputs do not include {name!r}")
            taken[name] = np.array(array)
        found[j] = (parsed.envelope.statement_digest(), taken)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise InvalidInputError(
            f"segment {job.segment.index} takes inputs from segment(s) {missing}",
            hint="pass their bundles with --inputs-from",
        )
    tensors = {n: a for _, taken in found.values() for n, a in taken.items()}
    links: list[dict[str, object]] = [
        {"segment": j, "statement": found[j][0], "tensors": {n: tensor_digest(n, a) for n, a in found[j][1].items()}}
        for j in sorted(found)
    ]
    return tensors, links


def prove(
    job: Job | Path,
    *,
    key: SecretKey,
    out: Path,
    device: str = "auto",
    model: Path | None = None,
    progress: Progress | None = None,
    srs: Path | None = None,
    inputs_from: Sequence[Path] = (),
) -> ProveResult:
    """One-shot ``Worker(key, device=device).prove(job, out=out)``; see ``Worker.prove``."""
    worker = Worker(key, device=device, srs=srs)
    try:
        return worker.prove(job, out=out, model=model, progress=progress, inputs_from=inputs_from)
    finally:
        worker.close()


EvidenceWriter: TypeAlias = Callable[[Path], object]


class _Rejected(Exception):
    """Internal: stops verification at the first failed check (never escapes ``verify``).

    ``evidence`` writes the evidence file when the node's own signature proves the fault; it is
    None when nothing does (another key's signature, a replay, bytes that are not the ones the
    node sealed): such a reject is the node's no more than anyone's."""

    def __init__(self, check: Check, evidence: EvidenceWriter | None = None) -> None:
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
    outputs_out: Path | None = None,
) -> Verdict:
    """Verify a bundle; see ``verified_outputs`` for the steps. ``outputs_out``: on an accept,
    also write the verified output values there (.npz or .json); not for a segment, whose
    outputs are verified only with the chain (its links name statements only the chain checks)."""
    if outputs_out is not None and isinstance(job, Path):
        job = load_job(job)
    if outputs_out is not None and isinstance(job, Job) and job.segment is not None:
        raise InvalidInputError(
            "a segment's outputs are verified only as part of its chain",
            hint="verify every segment's bundle together: verify s0.vmb s1.vmb ... --job JOB --node-keys ...",
        )
    verdict, outputs = verified_outputs(
        bundle, job=job, node_key=node_key, samples=samples, seed=seed, evidence_out=evidence_out, runner=runner,
        limits=limits, check_all_digests=check_all_digests, srs=srs,
    )  # fmt: skip
    if outputs_out is not None and verdict:
        write_tensor_file(outputs_out, outputs)
    return verdict


def verified_outputs(
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
) -> tuple[Verdict, dict[str, np.ndarray]]:
    """Verify a bundle against the job and the node key the job owner expects; the verdict, and
    the output values when it is an accept (empty otherwise, and for a segment of a split job:
    nothing unverified is handed out; ``subtasks.chain`` verifies segments together).

    ``node_key``: the public key (or key file) the job owner expects; ``settlement`` takes it
    from the ledger.
    ``samples``: extra steps checked beside the last (``None``: the job's policy; ``"all"``: every
    step). ``seed``: makes the sample reproducible (it is recorded in the verdict either way).
    ``check_all_digests`` (version 1 jobs): hash every shipped tensor, not only those the verdict
    rests on; version 2 bundles always hash every byte (the seal).
    ``evidence_out``: also write the evidence here; it always goes to the evidence store
    (``$VERIMESH_EVIDENCE_DIR``), named by its digest, whatever the bundle is called.

    1. Parse the bundle within limits from a private copy of its bytes (a malformed container is
       an ``error`` verdict).
    2. Check the envelope signature against the pinned node key.
    3. Check the statement's bindings: job id (else a replay), node id, model and input digests,
       step range, precision, commitment parameters.
    4. Check the seal (version 2): the root over every member's leaf is the signed root; a bundle
       whose bytes are not the ones signed is rejected and blamed on no one. Version 1: the
       declared tensor digests give the signed root.
    5. Check the trace: the sealed members are the job's trace, the committed input is the job's
       input, the outputs are the signed subjects.
    6. Sample steps with verifier-side randomness: the last one, plus ``samples`` more by cost.
    7. For each sampled step, re-run it from its committed inputs and compare under the job's
       tolerance; with the job's window of 2, also run the step after it from the verifier's own
       outputs and compare with what the node committed (docs/format.md §7).
    8. Return the verdict; on a reject the node's signature proves, write evidence.
    """
    job = _as_job(job)
    public = node_key if isinstance(node_key, PublicKey) else load_public_key(node_key)
    # 1.
    try:
        parsed = read_bundle(bundle, limits=limits, version=job.version)
    except InvalidInputError as exc:
        state = _Verification(job, public, seed if seed is not None else 0)
        state.checks.append(Check("bundle-format", False, exc.message))
        return state.verdict("error"), {}
    verdict, outputs = verify_parsed(parsed, job=job, public=public, samples=samples, seed=seed,
                                     evidence_out=evidence_out, runner=runner, check_all_digests=check_all_digests,
                                     srs=srs)  # fmt: skip
    # A segment's links name statements only its chain checks: alone, its outputs are not verified.
    return verdict, {} if job.segment is not None else outputs


def verify_parsed(
    parsed: Bundle,
    *,
    job: Job,
    public: PublicKey,
    samples: Samples = None,
    seed: int | None = None,
    evidence_out: Path | None = None,
    runner: StepRunner | None = None,
    check_all_digests: bool = False,
    srs: Path | None = None,
    steps: Sequence[int] | None = None,
) -> tuple[Verdict, dict[str, np.ndarray]]:
    """Steps 2-8 of ``verified_outputs`` on a bundle already read. ``steps``: re-check exactly
    these steps (and the mandatory ones) instead of drawing ``samples`` (a chain verifier draws
    over the whole job, then hands each segment its share)."""
    # 53 bits: seeds travel in JSON, whose safe integers stop at 2^53 (RFC 8785, I-JSON).
    seed = seed if seed is not None else int.from_bytes(os.urandom(8), "big") >> 11
    state = _Verification(job, public, seed)
    detail = f"format {parsed.version}: {len(parsed.members) or len(parsed.trace)} members, {len(parsed.proofs)} proofs"
    if parsed.opened is not None and job.mode != "spot":
        raise InvalidInputError(f"an opened bundle is a spot-check answer; this is a {job.mode} job")
    state.checks.append(Check("bundle-format", True, detail))
    if job.mode == "zk":
        verdict = _verify_zk(parsed, state, srs=srs, evidence_out=evidence_out)
        return verdict, _outputs(parsed, job) if verdict else {}
    try:
        # 2.-5.
        if job.version == 1:
            digests = _DigestCheck(parsed)
            leaf_hashes = _check_envelope_and_trace(parsed, job, public, state.checks, digests)
            if check_all_digests:
                digests.require(job.trace_names)
                state.checks.append(Check("all-digests", True, f"every one of {len(job.trace_names)} tensors hashed"))
            state.outputs.update({n: t.digest for n in job.output_names for t in parsed.trace if t.name == n})
        else:
            _check_sealed(parsed, job, public, state)
        if job.mode == "generate":
            _verify_generate(parsed, job, public, state, samples, seed, runner)
            return state.verdict("accept"), _outputs(parsed, job)
        # 6.
        if steps is not None:
            if not all(isinstance(i, int) and 0 <= i < len(job.steps) for i in steps):
                raise InvalidInputError("steps to re-check must be step indices of the job")
            state.sampled = tuple(sorted(set(steps) | set(mandatory_steps(job))))
            detail = f"chain seed {seed}: steps {list(state.sampled)} of {len(job.steps)}"
        else:
            k = len(job.steps) if samples == "all" else job.policy.samples if samples is None else samples
            if not isinstance(k, int) or k < 0:
                raise InvalidInputError("samples must be a non-negative integer or 'all'")
            state.sampled = sample_steps(job, k, seeded_rng(seed))
            detail = f"seed {seed}: steps {list(state.sampled)} of {len(job.steps)}"
        if job.policy.window >= 2:
            beside = sorted({i + 1 for i in state.sampled if i + 1 < len(job.steps)} - set(state.sampled))
            if beside:
                detail += f", and for the window check steps {beside} after them"
        state.checks.append(Check("sampling", True, detail))
        if parsed.opened is not None:
            _require_opened(parsed, job, state.sampled)
        # 7.
        runner = runner or shared_runner(job.policy.precision, job.policy.optimization)
        if job.version == 1:
            digests.require([n for i in state.sampled for n in (*job.steps[i].inputs, *job.steps[i].outputs)])
        _recheck_sampled(parsed, job, public, runner, state, leaf_hashes if job.version == 1 else ())
    except _Rejected as rejected:
        state.checks.append(rejected.check)
        return state.verdict("reject", _write_evidence(rejected, state, evidence_out)), {}
    # 8.
    return state.verdict("accept"), _outputs(parsed, job)


def _require_opened(parsed: Bundle, job: Job, sampled: Sequence[int]) -> None:
    """An opened bundle must carry what the re-check of the sampled steps reads: otherwise it
    cannot be verified with this sample (the error of a verifier that drew another sample than
    the one the node was challenged with; nothing about the node follows from it)."""
    have = {name for name, _ in parsed.members}
    lacking = [m for m in challenged_members(job, sampled) if m not in have]
    if lacking:
        raise InvalidInputError(
            f"the opened bundle does not carry {lacking[0]} that the re-check of steps {list(sampled)} reads",
            code="not-opened",
            hint="an opened bundle verifies only with the seed and samples it was challenged with",
        )


def check_generate_layout(job: Job, model_bytes: bytes) -> None:
    """The job's layout is the one its model's graph has (a job document may pair a past input
    with another layer's present output, and the decode would then be wrong by the job's hand)."""
    import onnx

    from verimesh.jobs.generation import discover_layout

    assert job.generate is not None
    found = discover_layout(onnx.load_model_from_string(model_bytes))
    pinned = job.generate.layout
    if {**found.__dict__, "vocab": 0} != {**pinned.__dict__, "vocab": 0}:
        raise InvalidInputError("the job's generate layout is not its model's graph (inputs, outputs, their pairing)",
                                code="model-inconsistent")  # fmt: skip


def _self_check_generate(job: Job, trace: Mapping[str, np.ndarray], load: Callable[[], bytes]) -> None:
    """An honest node signs no answer the verifier's prefill pass would reject: a job's model
    can compute its decode steps otherwise than one pass over the whole sequence (the owner
    writes the model), and the evidence of such a reject would slash the node. Costs one prefill
    pass over the answer (what a verifier pays)."""
    from verimesh.spot.generate import check_positions, recomputed_logits

    runner = shared_runner(job.policy.precision, job.policy.optimization)
    logits = recomputed_logits(job, runner, load, trace)
    found = check_positions(job, logits, trace, range(int(trace["tokens"].shape[1])))
    if not found.ok:
        raise InvalidInputError(
            f"the model's one-pass recomputation disagrees with its own decode ({found.reason}): a verifier would "
            "reject this honest answer, so it is not signed",
            code="model-inconsistent",
            hint="the job's model computes a decode step otherwise than a prefill pass: refuse the job",
        )


def _verify_generate(parsed: Bundle, job: Job, public: PublicKey, state: _Verification, samples: Samples,
                     seed: int, runner: StepRunner | None) -> None:  # fmt: skip
    """Steps 6-7 of a generate job: the records' shape and length, then ``samples`` generated
    positions (and the last) against one prefill pass over prompt + tokens."""
    from verimesh.spot.generate import check_positions, recomputed_logits, structure

    tensors = parsed.tensors
    shaped = structure(job, tensors)
    if not shaped.ok:
        check = Check(f"generate-{shaped.field}", False, shaped.reason)
        members = ["trace.json", *(tensor_member(job.trace_names.index(n)) for n in job.trace_names[1:])]
        raise _Rejected(check, _sealed_evidence(parsed, job, public, "generate", str(shaped.field), shaped.reason,
                                                members))  # fmt: skip
    state.checks.append(Check("generate-shape", True, shaped.reason))
    count = int(tensors["tokens"].shape[1])
    k = count if samples == "all" else job.policy.samples if samples is None else samples
    if not isinstance(k, int) or k < 0:
        raise InvalidInputError("samples must be a non-negative integer or 'all'")
    rng = seeded_rng(seed)
    others = list(range(count - 1))
    positions = sorted({*rng.sample(others, min(k, len(others))), count - 1})
    state.sampled = (0,)  # the job's one step: the model, re-run once over the whole answer
    state.checks.append(Check("sampling", True, f"seed {seed}: {len(positions)} of {count} generated positions"))
    runner = runner or shared_runner(job.policy.precision, job.policy.optimization)
    try:
        logits = recomputed_logits(job, runner, lambda: job.read_step_model(0), tensors)
    except StepExecutionError as exc:
        raise InvalidInputError(f"the model does not run over the committed answer: {exc.message}") from exc
    found = check_positions(job, logits, tensors, positions)
    check = Check("generate-records", found.ok, found.reason)
    if not found.ok:
        members = ["trace.json", *(tensor_member(i) for i in range(len(job.trace_names)))]
        raise _Rejected(check, lambda path: write_sealed_evidence(
            path, kind="generate-mismatch", job=job, bundle=parsed, public=public, reason=found.reason,
            members=members, step=found.position, step_models=[(0, job.read_step_model(0))]))  # fmt: skip
    state.checks.append(check)


def committed_outputs(bundle: Path, job: Job, limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """The output values a bundle commits to, read without verifying: for a caller that holds a
    verdict on these very bytes (``settlement.Prefetched``); never for a segment."""
    if job.segment is not None:
        raise InvalidInputError("a segment's outputs are verified only as part of its chain")
    return _outputs(read_bundle(bundle, limits=limits, version=job.version), job)


def _outputs(parsed: Bundle, job: Job) -> dict[str, np.ndarray]:
    """The output values, copied out of the bundle's buffer."""
    return {name: np.array(parsed.tensors[name]) for name in job.output_names}


@cache
def shared_runner(precision: str, optimization: str) -> StepRunner:
    """The CPU runner ``verify`` uses when given none, one per configuration for the process, so
    that verifying job after job reuses warm sessions (the runner keeps a bounded number)."""
    return StepRunner(device="cpu", precision=precision, optimization=optimization)


class _Verification:
    """What one verification has found so far."""

    def __init__(self, job: Job, public: PublicKey, seed: int) -> None:
        self.job, self.public, self.seed = job, public, seed
        self.checks: list[Check] = []
        self.sampled: tuple[int, ...] = ()
        self.outputs: dict[str, str] = {}

    def verdict(self, status: Literal["accept", "reject", "error"], evidence: str | None = None) -> Verdict:
        job, public = self.job, self.public
        return Verdict(status, tuple(self.checks), job.job_id, public.node_id, self.seed, self.sampled, evidence,
                       self.outputs)  # fmt: skip


def _write_evidence(rejected: _Rejected, state: _Verification, evidence_out: Path | None) -> str | None:
    if rejected.evidence is None:
        return None
    path, problem = store_evidence(rejected.evidence, out=evidence_out)
    if problem:
        state.checks.append(Check("evidence", True, problem))
    return str(path)


def _verify_zk(parsed: Bundle, state: _Verification, *, srs: Path | None, evidence_out: Path | None) -> Verdict:
    from verimesh.zk.zkmode import ZkReject, check_zk

    signature = _signature_check(parsed, state.public)
    state.checks.append(signature)
    if not signature.ok:
        return state.verdict("reject")
    try:
        check_zk(parsed, state.job, state.public, state.checks, srs=srs)
    except ZkReject as rejected:
        state.checks.append(rejected.check)
        return state.verdict("reject")
    state.outputs.update({e.name: tensor_digest(e.name, parsed.tensors[e.name]) for e in parsed.trace})
    return state.verdict("accept")


def _recheck_sampled(
    parsed: Bundle, job: Job, public: PublicKey, runner: StepRunner, state: _Verification, leaf_hashes: Sequence[bytes]
) -> None:
    """Step 7: each sampled step from its committed inputs, then (window 2) the step after it from
    the verifier's own outputs. Where those outputs are bit for bit the committed ones, the
    window is the plain re-check of the next step, and runs once. A step file is read and
    digest-checked only if the runner has no session for it yet."""
    sensitive = frozenset(job.policy.sign_sensitive)
    results: dict[int, StepCheck] = {}

    def plain(index: int) -> StepCheck:
        if index not in results:
            load = lambda i=index: job.read_step_model(i)  # noqa: E731
            result = recheck_step(job, index, load, parsed.tensors, runner, job.policy.tolerance_for(index),
                                  sign_sensitive=sensitive)  # fmt: skip
            check = Check(f"recheck-step-{index}", result.ok, result.reason or "outputs within tolerance",
                          metrics=_metrics(job, index, result))  # fmt: skip
            if not result.ok:
                raise _Rejected(check, _rerun_evidence(parsed, job, public, "step-mismatch", index, check, leaf_hashes))
            state.checks.append(check)
            results[index] = result
        return results[index]

    for index in state.sampled:
        own = plain(index)
        following = index + 1
        if job.policy.window < 2 or following >= len(job.steps):
            continue
        if all(same_bits(own.recomputed[n], parsed.tensors[n]) for n in job.steps[index].outputs):
            plain(following)
            continue
        load_next = lambda i=following: job.read_step_model(i)  # noqa: E731
        tolerance = job.policy.window_tolerance_for(following)
        window = recheck_step(job, following, load_next, parsed.tensors, runner, tolerance, feeds=own.recomputed,
                              sign_sensitive=sensitive)  # fmt: skip
        detail = window.reason or f"step {following} from the verifier's own step {index} outputs: within tolerance"
        check = Check(f"window-{index}-{following}", window.ok, detail, metrics=_metrics(job, following, window))
        if not window.ok:
            raise _Rejected(check, _rerun_evidence(parsed, job, public, "window-mismatch", index, check, leaf_hashes))
        state.checks.append(check)


def _metrics(job: Job, index: int, result: StepCheck) -> dict[str, Any]:
    return {n: c.metrics for n, c in zip(job.steps[index].outputs, result.comparisons, strict=False)}


def _rerun_evidence(
    parsed: Bundle, job: Job, public: PublicKey, kind: str, index: int, check: Check, leaf_hashes: Sequence[bytes]
) -> EvidenceWriter:
    """The evidence of a failed re-run: the steps' models and the committed tensors they need."""
    chain = [index] if kind == "step-mismatch" else [index, index + 1]
    first, target = job.steps[chain[0]], job.steps[chain[-1]]
    if kind == "step-mismatch":
        names = [*first.inputs, *first.outputs]
    else:
        names = [*first.inputs, *(n for n in target.inputs if n not in first.outputs), *target.outputs]
    names = list(dict.fromkeys(names))
    if job.version == 1:
        return lambda path: write_evidence(
            path, kind="step-mismatch", job=job, envelope=parsed.envelope, public=public, reason=check.detail,
            tensors=parsed.tensors, tensor_names=names, leaf_hashes=leaf_hashes, step=index,
            step_model=job.read_step_model(index),
        )  # fmt: skip
    members = ["trace.json", *(tensor_member(job.trace_names.index(n)) for n in names)]
    models = [(i, job.read_step_model(i)) for i in chain]
    return lambda path: write_sealed_evidence(
        path, kind=kind, job=job, bundle=parsed, public=public, reason=check.detail, members=members, step=index,
        step_models=models,
    )  # fmt: skip


def _sealed_evidence(
    parsed: Bundle, job: Job, public: PublicKey, kind: str, field: str, reason: str, members: Sequence[str]
) -> EvidenceWriter:
    return lambda path: write_sealed_evidence(
        path, kind=kind, job=job, bundle=parsed, public=public, reason=reason, members=members, field=field
    )


def _check_sealed(parsed: Bundle, job: Job, public: PublicKey, state: _Verification) -> None:
    """Steps 2-5 for a version 2 job; appends passed checks, raises ``_Rejected`` at the first failure."""
    checks = state.checks
    # 2. and 3.
    statement, pred, runtime, commitment = _checked_statement(
        parsed, job, public, checks, predicate_type=PREDICATE_TYPES[2], algorithm=COMMITMENT_ALGORITHMS[2],
        leaves=parsed.leaf_count, step_range=job.step_range,
        binding_evidence=lambda field, detail: _sealed_evidence(parsed, job, public, "binding", field, detail, []),
    )  # fmt: skip
    links = _segment_links(pred, job)
    expected_shard = shard_claim(job) if job.shard is not None else None
    if canonical_json(pred.get("shard")) != canonical_json(expected_shard) or (job.shard is None and "shard" in pred):
        raise _Rejected(Check("shard", False, "the statement's shard claim is not this job's", str(job.shard)[:200],
                              str(pred.get("shard"))[:200]))  # fmt: skip
    root = _signed_root(commitment, job, runtime, checks)
    # 4.
    if parsed.opened is not None:
        _check_opened(parsed, job, root, checks)
    else:
        sealed = sealed_root(parsed.leaves)
        if sealed != root:
            detail = "the bundle's bytes are not the ones the node sealed (changed after signing?)"
            raise _Rejected(Check("seal", False, detail, root.hex(), sealed.hex()))
        checks.append(Check("seal", True, f"every byte of {len(parsed.members)} members under the signed root"))
    # 5.
    for member, problem in parsed.problems:
        field = "trace" if member == "trace.json" else "tensor"
        reason = f"sealed {member}: {problem}"
        members = ["trace.json", *([member] if member != "trace.json" else [])]
        raise _Rejected(
            Check("trace", False, reason), _sealed_evidence(parsed, job, public, "malformed", field, reason, members)
        )
    names = tuple(e.name for e in parsed.trace)
    if names != job.trace_names or parsed.proofs:
        reason = "the sealed trace is not the job's step boundaries"
        check = Check("trace", False, reason, ", ".join(job.trace_names)[:200], ", ".join(names)[:200])
        field = "trace" if names != job.trace_names else "members"
        raise _Rejected(check, _sealed_evidence(parsed, job, public, "malformed", field, reason, ["trace.json"]))
    for ref in job.input_tensors:
        if ref.name not in parsed.tensors:  # an opened bundle: unopened, it is as unchecked as an unsampled step
            continue
        got = tensor_digest(ref.name, parsed.tensors[ref.name])
        if got != ref.digest:
            reason = f"committed input {ref.name!r} is not the job's input"
            members = ["trace.json", tensor_member(job.trace_names.index(ref.name))]
            check = Check("input-binding", False, reason, ref.digest, got)
            raise _Rejected(check, _sealed_evidence(parsed, job, public, "binding", "input-tensor", reason, members))
    for name, digest in links.items():
        if name not in parsed.tensors:
            continue
        got = tensor_digest(name, parsed.tensors[name])
        if got != digest:
            reason = f"committed input {name!r} is not the tensor the statement's link names"
            members = ["trace.json", tensor_member(job.trace_names.index(name))]
            check = Check("link-binding", False, reason, digest, got)
            raise _Rejected(check, _sealed_evidence(parsed, job, public, "binding", "link-tensor", reason, members))
    subjects = {s["name"]: "sha256:" + s["digest"]["sha256"] for s in statement["subject"]}
    claimed = {n: tensor_digest(n, parsed.tensors[n]) for n in job.output_names}
    if subjects != claimed:
        reason = "statement subjects are not the committed outputs"
        members = ["trace.json", *(tensor_member(job.trace_names.index(n)) for n in job.output_names)]
        check = Check("output-binding", False, reason, str(claimed), str(subjects))
        raise _Rejected(check, _sealed_evidence(parsed, job, public, "binding", "output-subject", reason, members))
    state.outputs.update(claimed)
    detail = "input is the job's, outputs are the signed subjects"
    if job.linked_names:
        detail = ("pinned inputs are the job's, linked inputs the tensors the links name (links checked only "
                  "when the chain is verified), outputs are the signed subjects")  # fmt: skip
    checks.append(Check("bindings", True, detail))


def _check_opened(parsed: Bundle, job: Job, root: bytes, checks: list[Check]) -> None:
    """Step 4 for an opened bundle: each member it carries sits at its position under the signed
    root, and it carries the outputs (what the statement's subjects name). A member that is not
    under the root is bytes the node did not seal: rejected, blamed on no one."""
    from verimesh.core import merkle

    for (name, _), leaf, (index, proof) in zip(parsed.members, parsed.leaves, parsed.opened or (), strict=True):
        if not merkle.verify_inclusion(merkle.leaf_hash(leaf), index, parsed.size, proof, root):
            detail = f"opened member {name!r} is not the one sealed at position {index} under the signed root"
            raise _Rejected(Check("seal", False, detail))
    missing = [n for n in job.output_names if n not in parsed.tensors and not parsed.problems]
    if missing:
        raise _Rejected(Check("seal", False, f"the opened bundle does not carry the output {missing[0]!r}"))
    checks.append(Check("seal", True, f"{len(parsed.members)} opened members of {parsed.size} under the signed root"))


def _segment_links(pred: Mapping[str, Any], job: Job) -> dict[str, str]:
    """A segment's signed claim against the segment the verifier expects (the split, the index,
    one link per segment it takes inputs from, naming exactly those tensors); the digest each
    link names per tensor. A whole job's statement must not claim to be a segment."""
    claim = pred.get("segment")
    if job.segment is None:
        if "segment" in pred:
            raise _Rejected(Check("statement", False, "a segment's statement, for a whole job"))
        return {}
    links = claim.get("links") if isinstance(claim, dict) else None
    if not isinstance(claim, dict) or not isinstance(links, list) or len(links) > len(job.segment.ranges):
        raise _Rejected(Check("segment", False, "the statement does not claim a segment of a split job"))
    wanted = job.segment.links()
    try:
        by_segment = {int(link["segment"]): link for link in links}
        ok = (
            [link["segment"] for link in links] == sorted(wanted)
            and all(type(link["segment"]) is int for link in links)
            and all(set(link) == {"segment", "statement", "tensors"} for link in links)
            and all(isinstance(link["tensors"], dict) for link in links)
            and all(sorted(by_segment[j]["tensors"]) == sorted(names) for j, names in wanted.items())
        )
        if ok:
            for link in links:
                parse_digest(link["statement"], what="linked statement digest")
                for digest in link["tensors"].values():
                    parse_digest(digest, what="linked tensor digest")
    except (TypeError, ValueError, KeyError, InvalidInputError):
        ok = False
    if not ok:
        detail = f"the statement's links are not segment {job.segment.index}'s inputs from segments {sorted(wanted)}"
        raise _Rejected(Check("segment", False, detail))
    mine = segment_claim(job, links)
    if canonical_json(claim) != canonical_json(mine):  # JSON-exact: true is not 1
        raise _Rejected(Check("segment", False, "the statement claims another split or segment", str(mine)[:200],
                              str(claim)[:200]))  # fmt: skip
    return {n: str(d) for link in links for n, d in link["tensors"].items()}


def _checked_statement(
    parsed: Bundle, job: Job, public: PublicKey, checks: list[Check], *, predicate_type: str, algorithm: str,
    leaves: int, step_range: list[int], binding_evidence: Callable[[str, str], EvidenceWriter],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Steps 2 and 3 of either format: the node's signature, then the statement against the job
    (predicate type, job, node, model and input digests, mode, step range, runtime, commitment
    parameters). Returns (statement, predicate, runtime, commitment); raises ``_Rejected``."""
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
    if statement["predicateType"] != predicate_type:
        raise _Rejected(
            Check("statement", False, "wrong predicate type", predicate_type, str(statement["predicateType"]))
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
            check = Check(field_name.replace("_digest", "-binding"), False, detail, pinned, str(pred.get(field_name)))
            raise _Rejected(check, binding_evidence(field_name, detail))
    runtime = pred.get("runtime") if isinstance(pred.get("runtime"), dict) else {}
    commitment = pred.get("commitment") if isinstance(pred.get("commitment"), dict) else {}
    expected = {
        "mode": ("generate" if job.mode == "generate" else "spot", pred.get("mode")),
        "step_range": (step_range, pred.get("step_range")),
        "precision": (job.policy.precision, runtime.get("precision")),
        "optimization": (job.policy.optimization, runtime.get("optimization")),
        "commitment algorithm": (algorithm, commitment.get("algorithm")),
        "commitment leaves": (leaves, commitment.get("leaves")),
    }
    for what, (want, got) in expected.items():
        if want != got:
            raise _Rejected(Check("statement", False, f"{what} differs from the job's", str(want), str(got)))
    return statement, pred, runtime, commitment


def _signed_root(commitment: dict[str, Any], job: Job, runtime: dict[str, Any], checks: list[Check]) -> bytes:
    """The commitment root the node signed; the statement check passes with it."""
    try:
        root = parse_digest(commitment.get("root"), what="commitment root")
    except InvalidInputError as exc:
        raise _Rejected(Check("statement", False, exc.message)) from exc
    checks.append(
        Check("statement", True, f"job {job.job_id[:19]}…, {len(job.steps)} steps, {runtime.get('provider')}")
    )
    return root


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

    # 2. and 3.
    statement, pred, runtime, commitment = _checked_statement(
        parsed, job, public, checks, predicate_type=PREDICATE_TYPE, algorithm=COMMITMENT_ALGORITHM,
        leaves=len(job.trace_names), step_range=[0, len(job.steps)],
        binding_evidence=lambda field, detail: _v1_binding_evidence(parsed, job, public, field, detail, [], ()),
    )  # fmt: skip
    root = _signed_root(commitment, job, runtime, checks)
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
            reason = f"committed input {ref.name!r} is not the job's input"
            raise _Rejected(
                Check("input-binding", False, reason, ref.digest, by_name[ref.name]),
                _v1_binding_evidence(parsed, job, public, "input-tensor", reason, [ref.name], leaf_hashes),
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


def _v1_binding_evidence(
    parsed: Bundle, job: Job, public: PublicKey, field: str, reason: str, names: list[str], leaf_hashes: Sequence[bytes]
) -> EvidenceWriter:
    return lambda path: write_evidence(
        path, kind="binding", job=job, envelope=parsed.envelope, public=public, reason=reason,
        tensors=parsed.tensors, tensor_names=names, leaf_hashes=leaf_hashes, binding_field=field,
    )  # fmt: skip
