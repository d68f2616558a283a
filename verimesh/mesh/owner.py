"""A job owner's side: plan a job, hand it to a mesh, and take back verified outputs (``verimesh submit``).

``submit`` plans the job here (``new_job``: the owner pins every digest), uploads the blobs the
coordinator lacks and posts the job with a deposit signed by the owner's key. ``collect`` takes
back a done job's receipt and outputs and checks both before writing them: the receipt's
signature against the verifier key the owner pins (the coordinator's operator key), and every
output's digest against the digest the receipt signs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verimesh.core.canonical import parse_canonical_json
from verimesh.core.digest import tensor_digest
from verimesh.core.tensors import parse_npz
from verimesh.errors import IntegrityError, VerificationFailedError
from verimesh.jobs.job import new_job
from verimesh.mesh.client import Client, upload_job
from verimesh.signing.keys import PublicKey
from verimesh.subtasks.receipt import check_receipt, write_receipt


@dataclass(frozen=True)
class Submitted:
    job_id: str
    created: bool


def submit(
    client: Client, model: Path, input_path: Path, *, deposit: int = 10, deadline: float = 300.0,
    samples: int = 1, max_attempts: int = 3, segments: int | None = None, device: str = "any",
) -> Submitted:  # fmt: skip
    """Plan and post a job (``segments``: cut into that many segments, each run by another node
    from its predecessors' verified outputs, each posted in the ledger with ``deposit``; ``device``:
    leased only to nodes that registered that device, or ``any``)."""
    from verimesh.jobs.segments import plan_segments, views_of

    with tempfile.TemporaryDirectory(prefix="verimesh-owner-") as tmp:
        job_path = Path(tmp) / "job.json"
        job = new_job(model, input_path, job_path, samples=samples)
        input_blob = job.resolve(job.input_path).read_bytes()
        files = upload_job(client, job_path, input_blob=input_blob)
        ranges = [list(r) for r in plan_segments(job, segments)] if segments else None
        post = [v.job_id for v in views_of(job, ranges)] if ranges else None
        answer = client.submit_job(job.canonical_bytes(), files=files, deposit=deposit, deadline=deadline,
                                   max_attempts=max_attempts, post=post, segments=ranges,
                                   device=device)  # fmt: skip
    return Submitted(str(answer["job_id"]), bool(answer.get("created")))


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
    out.mkdir(parents=True, exist_ok=True)
    write_receipt(out / "receipt.json", receipt)
    partial = out / "outputs.npz.partial"
    partial.write_bytes(data)
    partial.replace(out / "outputs.npz")
    return {"receipt": str(out / "receipt.json"), "outputs": str(out / "outputs.npz"), "receipt_check": check.reason}
