"""A job owner's side: plan a job, hand it to a mesh, and take back verified outputs (``verimesh submit``).

``submit`` plans the job here (``new_job``: the owner pins every digest), uploads the blobs the
coordinator lacks and posts the job with a deposit signed by the owner's key. ``collect`` takes
back a done job's receipt and outputs and checks both before writing them: the receipt's
signature against the verifier key the owner pins (the coordinator's operator key), and every
output's digest against the digest the receipt signs, and the ledger's record of the settlement:
each node's receipt, verdict and reward entry with its inclusion proof under a checkpoint signed
by the same key (``ledger check-proof`` re-checks the files offline).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verimesh.core.canonical import canonical_json, parse_canonical_json
from verimesh.core.digest import tensor_digest
from verimesh.core.tensors import npz_bytes, parse_npz
from verimesh.errors import IntegrityError, InvalidInputError, VerificationFailedError
from verimesh.jobs.job import Job, new_job
from verimesh.ledger.store import check_inclusion_document
from verimesh.mesh.client import Client, upload_job
from verimesh.signing.keys import PublicKey
from verimesh.subtasks.receipt import check_receipt, write_receipt


@dataclass(frozen=True)
class Submitted:
    job_id: str
    created: bool


@dataclass(frozen=True)
class Generation:
    """A generate job's decode (``job new --mode generate``): the prompt is the submission's input."""

    max_new_tokens: int
    sampling: str = "greedy"  # or "temperature=T[,top_p=P]"
    stop_tokens: tuple[int, ...] = ()
    tokenizer: Path | None = None  # pinned in the job by digest; the owner decodes the answer with it


def submit(
    client: Client, model: Path, input_path: Path, *, deposit: int = 10, deadline: float = 300.0,
    samples: int | None = 1, max_attempts: int = 3, segments: int | None = None, device: str = "any",
    replicas: int = 1, min_level: int = 0, shards: Path | None = None, transfer: str | None = None,
    mode: str = "spot", circuit: Path | None = None, generation: Generation | None = None,
) -> Submitted:  # fmt: skip
    """Plan and post a job (``segments``: cut into that many segments, each run by another node
    from its predecessors' verified outputs, each posted in the ledger with ``deposit``; ``device``:
    leased only to nodes that registered that device, or ``any``; ``replicas``: the whole job run
    by that many distinct nodes, the deposit paying each accepted one; ``min_level``: leased only
    to nodes at that audit level or above; ``shards``: a batch file, each row run as the whole
    job by another node, each row posted in the ledger with ``deposit``; ``transfer``: ``challenge``
    or ``full``, None for challenge where it applies, a whole job run once, else full; ``mode`` zk
    with ``circuit``: the node proves with ezkl, the coordinator checks the proof, no step re-run;
    the circuit travels with the job, each node and the coordinator hold the SRS it pins); ``mode``
    generate with ``generation``: ``input_path`` is the prompt, a node decodes, the coordinator
    checks the records with one prefill pass (``samples``: positions, None: every one), run
    whole and once with its full bundle)."""
    from verimesh.jobs.segments import plan_segments, views_of

    if (mode == "generate") != (generation is not None):
        raise InvalidInputError("a generate job needs its generation (max_new_tokens), and only a generate job")

    with tempfile.TemporaryDirectory(prefix="verimesh-owner-") as tmp:
        job_path = Path(tmp) / "job.json"
        given = circuit
        if circuit is not None:  # inside the job's folder, where the mesh's file layout keeps it
            shutil.copytree(circuit, Path(tmp) / "circuit")
            circuit = Path(tmp) / "circuit"
        try:
            if generation is not None:
                job = _generate_job(model, input_path, job_path, generation, samples)
            else:
                job = new_job(model, input_path, job_path, samples=1 if samples is None else samples, mode=mode,
                              circuit=circuit)  # fmt: skip
        except InvalidInputError as exc:  # name the owner's own folder, not the copy
            if circuit is not None and given is not None:
                exc.message = exc.message.replace(str(circuit), str(given))
            raise
        input_blob = job.resolve(job.input_path).read_bytes()
        files = upload_job(client, job_path, input_blob=input_blob)
        ranges = [list(r) for r in plan_segments(job, segments)] if segments else None
        post = [v.job_id for v in views_of(job, ranges)] if ranges else None
        rows = None
        if shards is not None:
            rows, post = _upload_shards(client, job, shards)
        whole = ranges is None and shards is None and replicas == 1 and mode == "spot"
        if transfer == "challenge" and not whole:
            raise InvalidInputError("transfer challenge is for whole spot jobs run once: segments, shards, "
                                    "replicas and zk proofs ship full bundles", code="bad-transfer")  # fmt: skip
        transfer = transfer or ("challenge" if whole else "full")
        answer = client.submit_job(job.canonical_bytes(), files=files, deposit=deposit, deadline=deadline,
                                   max_attempts=max_attempts, post=post, segments=ranges,
                                   device=device, replicas=replicas, min_level=min_level, shards=rows,
                                   transfer=transfer)  # fmt: skip
    return Submitted(str(answer["job_id"]), bool(answer.get("created")))


def _generate_job(model: Path, prompt: Path, out: Path, generation: Generation, samples: int | None) -> Job:
    from verimesh.jobs.generate_job import new_generate_job
    from verimesh.jobs.generation import parse_sampling

    return new_generate_job(model, prompt, out, max_new_tokens=generation.max_new_tokens,
                            sampling=parse_sampling(generation.sampling), stop_tokens=generation.stop_tokens,
                            tokenizer=generation.tokenizer, samples=samples)  # fmt: skip


def generated(outputs: Path, tokenizer: Path | None) -> dict[str, Any]:
    """A generate job's verified answer (``outputs.npz``): its token ids, and its text where the
    owner has the tokenizer."""
    from verimesh.jobs.generation import load_tokenizer

    tokens = parse_npz(outputs.read_bytes(), what=str(outputs)).get("tokens")
    if tokens is None:
        raise InvalidInputError(f"{outputs} holds no generated tokens")
    ids = [int(t) for t in tokens.reshape(-1)]
    found: dict[str, Any] = {"token_ids": ids}
    if tokenizer is not None:
        found["text"] = str(load_tokenizer(tokenizer).decode(ids, skip_special_tokens=False))
    return found


def _upload_shards(client: Client, job: Job, batch_file: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Each row of the batch as an input blob of its own: the submission's ``shards`` and the
    shard ids the ledger posts, in row order."""
    from verimesh.core.tensors import TensorRef, load_input_file
    from verimesh.jobs.segments import batch_rows, check_batchable, shard_view

    check_batchable(job)
    rows = batch_rows(job, load_input_file(batch_file, job.model_inputs))
    docs, post = [], []
    for index, row in enumerate(rows):
        refs = tuple(TensorRef.of(s.name, row[s.name]) for s in job.model_inputs)
        docs.append({"input": client.put_blob(npz_bytes(row)), "tensors": [r.to_json() for r in refs]})
        post.append(shard_view(job, len(rows), index, refs).job_id)
    return docs, post


def collect(client: Client, job_id: str, out: Path, *, verifier_key: PublicKey) -> dict[str, Any]:
    """Write ``out/receipt.json`` and ``out/outputs.npz`` of a done job, after checking them."""
    raw = client.receipt(job_id)
    receipt = parse_canonical_json(raw.rstrip(b"\n"), what="receipt from the coordinator")
    check = check_receipt(receipt, [verifier_key])
    if not check.ok:
        raise VerificationFailedError(f"the coordinator's receipt does not hold: {check.reason}", code="bad-receipt")
    if receipt["receipt"]["job_id"] != job_id:
        raise VerificationFailedError("the coordinator's receipt is for another job", code="bad-receipt")
    data = client.outputs(job_id)
    values = parse_npz(data, what="outputs from the coordinator")
    signed = receipt["receipt"]["outputs"]
    if set(values) != set(signed) or any(tensor_digest(n, a) != signed[n] for n, a in values.items()):
        raise IntegrityError("the outputs the coordinator sent are not the ones its receipt signs")
    proofs = _ledger_proofs(client, job_id, receipt["receipt"], out, verifier_key)
    out.mkdir(parents=True, exist_ok=True)
    write_receipt(out / "receipt.json", receipt)
    partial = out / "outputs.npz.partial"
    partial.write_bytes(data)
    partial.replace(out / "outputs.npz")
    return {"receipt": str(out / "receipt.json"), "outputs": str(out / "outputs.npz"), "receipt_check": check.reason,
            "ledger_proofs": proofs}  # fmt: skip


def _replicas_settled(sub: dict[str, Any], seen: list[tuple[Path, dict[str, Any]]], job_id: str) -> None:
    """A replicated sub-task: every replica the receipt says was accepted has its accepting
    verdict and reward in the ledger, and every one it says was rejected has its slash there (a
    receipt naming replicas that never ran, or verdicts the ledger never recorded, is refused)."""
    for replica in sub.get("replicas", []):
        node = replica["node_id"]
        if replica["verdict"] == "accept":
            verdicts = {e.get("seq") for _, e in seen if e.get("kind") == "verdict" and e.get("status") == "accept"
                        and e.get("node_id") == node and e.get("job_id") == job_id}  # fmt: skip
            proven = any(e.get("kind") == "reward" and e.get("verdict") in verdicts for _, e in seen)
        elif replica["verdict"] == "reject":
            proven = any(e.get("kind") == "slash" and e.get("node_id") == node and e.get("job_id") == job_id
                         for _, e in seen)  # fmt: skip
        else:
            continue  # unsettled: its node could no longer answer for it, and the ledger holds nothing of it
        if not proven:
            raise VerificationFailedError(f"the ledger proofs do not show replica {replica['replica']}'s settlement "
                                          f"({replica['verdict']}) by {node}", code="bad-proofs")  # fmt: skip


def _ledger_proofs(client: Client, job_id: str, body: dict[str, Any], out: Path, key: PublicKey) -> list[str]:
    """Fetch the job's ledger proofs, check each under ``key``, and keep them in ``out/ledger/``
    as ``KIND-I.json``: every sub-task's node must have an accepting verdict and its reward there."""
    docs = client.proofs(job_id)
    if len(docs) > 10_000:
        raise VerificationFailedError("the coordinator sent too many ledger proofs", code="bad-proofs")
    staged = Path(tempfile.mkdtemp(prefix="verimesh-proofs-"))
    try:
        counts: dict[str, int] = {}
        seen: list[tuple[Path, dict[str, Any]]] = []
        for doc in docs:
            probe = staged / "probe.json"
            probe.write_bytes(canonical_json(doc))
            ok, event, reason = check_inclusion_document(probe, key)
            if not ok or event is None:
                raise VerificationFailedError(f"a ledger proof does not hold: {reason}", code="bad-proofs")
            kind = str(event.get("kind"))
            name = staged / f"{kind}-{counts.get(kind, 0)}.json"
            counts[kind] = counts.get(kind, 0) + 1
            probe.replace(name)
            seen.append((name, event))
        for sub in body["subtasks"]:
            verdicts = {e.get("seq") for _, e in seen if e.get("kind") == "verdict" and e.get("status") == "accept"
                        and e.get("node_id") == sub["node_id"] and e.get("step_range") == sub["step_range"]
                        and (body["kind"] != "whole" or e.get("job_id") == job_id)}  # fmt: skip
            if not any(e.get("kind") == "reward" and e.get("verdict") in verdicts for _, e in seen):
                raise VerificationFailedError(f"the ledger proofs hold no accepting verdict and reward of sub-task "
                                              f"{sub['index']}'s node {sub['node_id']}", code="bad-proofs")  # fmt: skip
            _replicas_settled(sub, seen, job_id)
        folder = out / "ledger"
        folder.mkdir(parents=True, exist_ok=True)
        for path, _ in seen:
            shutil.move(str(path), folder / path.name)
        return [str(folder / path.name) for path, _ in seen]
    finally:
        shutil.rmtree(staged, ignore_errors=True)
