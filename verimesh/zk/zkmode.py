"""Zero-knowledge mode of ``prove`` and ``verify`` (docs/design.md §5).

The bundle carries the claimed outputs (float64, exactly the dequantized output instances),
one ezkl proof per step, and the signed statement (predicate type ``zk/v1``) that pins the job,
the circuit and each proof's digest. The verifier takes settings, verifying keys and the SRS
from the job owner's circuit only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from verimesh.core.canonical import parse_json
from verimesh.core.digest import sha256_bytes, tensor_digest
from verimesh.errors import InvalidInputError
from verimesh.jobs.bundle import SEAL_ALGORITHM, Bundle, BundleWriter, sealed_root
from verimesh.jobs.circuit import Circuit
from verimesh.jobs.job import Job
from verimesh.jobs.verdict import Check
from verimesh.signing.envelope import make_statement, sign_statement
from verimesh.signing.keys import PublicKey, SecretKey

# By job (and bundle) version: version 2 also signs a root over every sealed member of the bundle.
PREDICATE_TYPES = {1: "https://verimesh.dev/zk/v1", 2: "https://verimesh.dev/zk/v2"}
PREDICATE_TYPE = PREDICATE_TYPES[1]
MAX_PROOF_BYTES = 64 * 1024 * 1024


def claimed_outputs(circuit: Circuit, felts: list[str]) -> dict[str, np.ndarray]:
    """The last step's output field elements, dequantized with the circuit's scales (float64)."""
    from verimesh.zk import ezkl_backend as zk

    last = circuit.steps[-1]
    out, offset = {}, 0
    for name, shape, scale in zip(last.outputs, last.output_shapes, last.output_scales, strict=True):
        count = math.prod(shape)
        if offset + count > len(felts):
            raise InvalidInputError("proof has fewer output instances than the circuit declares")
        out[name] = zk.dequantize(felts[offset : offset + count], scale, shape)
        offset += count
    return out


def zk_predicate(
    job: Job, circuit: Circuit, node_id: str, proofs: tuple[bytes, ...], leaves: tuple[bytes, ...] = ()
) -> dict[str, Any]:
    """The signed claim; version 2 adds the seal (the root over every member's leaf)."""
    predicate = _zk_claim(job, circuit, node_id, proofs)
    if job.version == 2:
        from verimesh.core.digest import format_digest

        root = format_digest(sealed_root(leaves))
        predicate["commitment"] = {"algorithm": SEAL_ALGORITHM, "root": root, "leaves": len(leaves)}
    return predicate


def _zk_claim(job: Job, circuit: Circuit, node_id: str, proofs: tuple[bytes, ...]) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "mode": "zk",
        "node_id": node_id,
        "model_digest": job.model_digest,
        "input_digest": job.input_digest,
        "circuit_digest": circuit.digest,
        "step_range": [0, len(circuit.steps)],
        "proofs": [sha256_bytes(p) for p in proofs],
        "ezkl": circuit.ezkl_version,
    }


def prove_zk(
    job: Job,
    *,
    key: SecretKey,
    prover: Any,
    out: Path,
    srs: Path | None = None,
    model: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    digest_of: Callable[[Path], str] | None = None,
) -> tuple[int, str, dict[str, str]]:
    """Prove every step of the job's circuit and write the bundle; returns (size, proofs digest, outputs)."""
    # 1. The model, the input and the circuit must be the ones the job pins.
    job.check_model_file(model, digest_of=digest_of)
    inputs = job.read_input()
    circuit = job.load_circuit()
    srs_path = circuit.resolve_srs(srs)
    # 2. Witness and proof per step, in the worker process.
    proofs, felts = prover.prove(circuit, inputs, srs_path, progress=progress)
    # 3. Claimed outputs from the proof's own outputs, statement, signature, bundle.
    outputs = claimed_outputs(circuit, felts)
    writer = BundleWriter(out, version=job.version)
    try:
        for name in job.output_names:
            writer.add_tensor(name, outputs[name])
        writer.entries()
        leaves = writer.seal(tuple(proofs)) if job.version == 2 else ()
        predicate = zk_predicate(job, circuit, key.node_id, tuple(proofs), leaves)
        subjects = {name: tensor_digest(name, outputs[name]) for name in job.output_names}
        statement = make_statement(subjects, PREDICATE_TYPES[job.version], predicate)
        size = writer.finish(sign_statement(statement, key), () if job.version == 2 else tuple(proofs))
    except BaseException:
        writer.abort()
        raise
    proofs_digest = sha256_bytes("".join(predicate["proofs"]).encode())
    return size, proofs_digest, subjects


def _check_seal(parsed: Bundle, pred: dict[str, Any], checks: list[Check], fail: Callable[..., ZkReject]) -> None:
    """Version 2: every member is the one the node sealed, and the sealed members are readable."""
    from verimesh.core.digest import format_digest

    commitment = pred.get("commitment") if isinstance(pred.get("commitment"), dict) else {}
    want = {"algorithm": SEAL_ALGORITHM, "root": format_digest(sealed_root(parsed.leaves)),
            "leaves": len(parsed.members)}  # fmt: skip
    if commitment != want:
        raise fail("seal", "the bundle's bytes are not the ones the node sealed", want, commitment)
    if parsed.problems:
        member, problem = parsed.problems[0]
        raise fail("trace", f"sealed {member}: {problem}")
    checks.append(Check("seal", True, f"every byte of {len(parsed.members)} members under the signed root"))


def write_zk_bundle(
    job: Job, circuit: Circuit, *, key: SecretKey, outputs: dict[str, np.ndarray], proofs: tuple[bytes, ...],
    out: Path,
) -> int:  # fmt: skip
    """Write and sign a zk bundle of the job's format from outputs and proofs given whole (a worker
    with its own proving loop, the tamper set); ``prove_zk`` streams the same members."""
    from verimesh.core.digest import member_leaf
    from verimesh.core.tensors import TensorRef
    from verimesh.jobs.bundle import bundle_members, write_bundle

    entries = tuple(TensorRef.of(n, outputs[n]) for n in job.output_names)
    members = bundle_members(entries, outputs, proofs, version=job.version)
    leaves = tuple(member_leaf(name, data) for name, data in members) if job.version == 2 else ()
    predicate = zk_predicate(job, circuit, key.node_id, proofs, leaves)
    statement = make_statement({e.name: e.digest for e in entries}, PREDICATE_TYPES[job.version], predicate)
    return write_bundle(out, sign_statement(statement, key), entries, outputs, proofs, version=job.version)


class ZkReject(Exception):
    def __init__(self, check: Check) -> None:
        super().__init__(check.name)
        self.check = check


def check_zk(parsed: Bundle, job: Job, public: PublicKey, checks: list[Check], *, srs: Path | None = None) -> None:
    """Steps 3-6 of ``verify`` in zk mode; appends passed checks, raises ``ZkReject`` at the first failure.

    3. Statement: predicate type, job, node, model, input, circuit digest, step range, and the
       digest of every proof member.
    4. Outputs: the bundle's tensors are the model outputs and the signed subjects.
    5. Each proof verifies against the circuit's own settings, vk and SRS.
    6. Instances: each step's output hash is the next step's input hash; the first step's input
       instances are the job's quantized input; the last step's output instances, dequantized with
       the trusted scales, are exactly the claimed outputs. ``pretty_public_inputs`` is never read.
    """
    from verimesh.zk import ezkl_backend as zk

    circuit = job.load_circuit()
    srs_path = circuit.resolve_srs(srs)
    statement = parsed.envelope.statement()
    pred = statement["predicate"]

    def fail(name: str, detail: str, expected: object = None, got: object = None) -> ZkReject:
        exp = None if expected is None else str(expected)
        return ZkReject(Check(name, False, detail, exp, None if got is None else str(got)))

    # 3.
    if statement["predicateType"] != PREDICATE_TYPES[job.version]:
        raise fail("statement", "wrong predicate type", PREDICATE_TYPES[job.version], statement["predicateType"])
    if pred.get("job_id") != job.job_id:
        raise fail("job-binding", "the bundle is for another job (replayed?)", job.job_id, pred.get("job_id"))
    expected = {
        "node_id": public.node_id, "mode": "zk", "model_digest": job.model_digest, "input_digest": job.input_digest,
        "circuit_digest": circuit.digest, "step_range": [0, len(circuit.steps)],
    }  # fmt: skip
    for field, want in expected.items():
        if pred.get(field) != want:
            raise fail("statement", f"{field} differs from the job's", want, pred.get(field))
    digests = [sha256_bytes(p) for p in parsed.proofs]
    if len(parsed.proofs) != len(circuit.steps) or pred.get("proofs") != digests:
        raise fail("statement", "proof members are not the ones the statement signs", pred.get("proofs"), digests)
    checks.append(Check("statement", True, f"job {job.job_id[:19]}…, circuit {circuit.digest[:19]}…"))
    if job.version == 2:
        _check_seal(parsed, pred, checks, fail)
    # 4.
    names = tuple(e.name for e in parsed.trace)
    if names != job.output_names:
        raise fail("output-binding", "bundle tensors are not the model outputs", job.output_names, names)
    subjects = {s["name"]: "sha256:" + s["digest"]["sha256"] for s in statement["subject"]}
    for entry in parsed.trace:
        actual = tensor_digest(entry.name, parsed.tensors[entry.name])
        declared = actual if parsed.version == 2 else entry.digest  # format 2: the seal binds the bytes
        if actual != declared or subjects.get(entry.name) != actual:
            raise fail(
                "output-binding", f"output {entry.name!r} does not match its digest and subject", entry.digest, actual
            )
    if set(subjects) != set(names):
        raise fail("output-binding", "statement subjects are not the outputs", sorted(names), sorted(subjects))
    # 5.
    parsed_proofs = []
    for step, blob in zip(circuit.steps, parsed.proofs, strict=True):
        if len(blob) > MAX_PROOF_BYTES:
            raise fail(f"proof-step-{step.index}", "proof is over the size limit")
        try:
            # Bounded in depth before parsing: a proof is the worker's, untrusted bytes.
            doc = parse_json(blob, what=f"proof of step {step.index}", max_bytes=MAX_PROOF_BYTES)
            if not isinstance(doc, dict):
                raise InvalidInputError("a proof is a JSON object")
            flat = zk.instances(doc)
        except (ValueError, InvalidInputError) as exc:
            raise fail(f"proof-step-{step.index}", f"proof is not an ezkl proof: {exc}") from exc
        ok, reason = zk.verify_proof(blob, circuit.path(step.settings), circuit.path(step.vk), srs_path)
        if not ok:
            raise fail(f"proof-step-{step.index}", reason)
        n_in, n_out = zk.instance_layout(step)
        if len(flat) != n_in + n_out:
            raise fail(f"proof-step-{step.index}", "instance count differs from the circuit", n_in + n_out, len(flat))
        parsed_proofs.append((flat[:n_in], flat[n_in:]))
        checks.append(Check(f"proof-step-{step.index}", True, f"verified (logrows {step.logrows})"))
    # 6.
    for i in range(len(parsed_proofs) - 1):
        out_hash, in_hash = parsed_proofs[i][1], parsed_proofs[i + 1][0]
        if out_hash != in_hash:
            raise fail(
                f"chain-{i}-{i + 1}", "a step's output hash is not the next step's input hash", out_hash, in_hash
            )
    if len(parsed_proofs) > 1:
        checks.append(Check("chain", True, f"{len(parsed_proofs)} proofs linked by Poseidon hashes"))
    first = circuit.steps[0]
    job_input = job.read_input()
    want_in: list[str] = []
    for name, scale in zip(first.inputs, first.input_scales, strict=True):
        want_in += zk.quantize(job_input[name], scale)
    if first.input_visibility == "hashed":
        want_in = [zk.poseidon(want_in)]
    if parsed_proofs[0][0] != [f.lower() for f in want_in]:
        raise fail("input-binding", "the proven input is not the job's quantized input")
    last = circuit.steps[-1]
    decoded = claimed_outputs(circuit, parsed_proofs[-1][1])
    for name in job.output_names:
        claimed = parsed.tensors[name]
        if (
            claimed.dtype != np.float64
            or claimed.shape != decoded[name].shape
            or not np.array_equal(claimed, decoded[name])
        ):
            diff = (
                float(np.max(np.abs(np.asarray(claimed, dtype=np.float64) - decoded[name])))
                if claimed.shape == decoded[name].shape
                else None
            )
            raise fail(
                "output-binding", f"claimed {name!r} is not the proven output", "proven instances", f"max diff {diff}"
            )
    checks.append(
        Check("bindings", True, f"input is the job's, outputs are the proven instances (scale {last.output_scales})")
    )
