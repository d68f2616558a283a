"""verimesh: verify untrusted ONNX model execution.

The public API mirrors the CLI; heavy modules load on first use so that ``import verimesh``
stays fast::

    import verimesh
    job = verimesh.new_job(Path("model.onnx"), Path("x.npy"), Path("job.json"))
    key = verimesh.generate_key()
    verimesh.prove(job, key=key, out=Path("result.vmb"))
    verdict = verimesh.verify(Path("result.vmb"), job=job, node_key=key.public)
    if not verdict: print(verdict.reason)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "prove": "verimesh.workflows",
    "verify": "verimesh.workflows",
    "verified_outputs": "verimesh.workflows",
    "seal_trace": "verimesh.workflows",
    "ProveResult": "verimesh.workflows",
    "Worker": "verimesh.workflows",
    "new_job": "verimesh.jobs.job",
    "new_generate_job": "verimesh.jobs.generate_job",
    "load_job": "verimesh.jobs.job",
    "Job": "verimesh.jobs.job",
    "generate_key": "verimesh.signing.keys",
    "load_secret_key": "verimesh.signing.keys",
    "load_public_key": "verimesh.signing.keys",
    "write_key_pair": "verimesh.signing.keys",
    "PublicKey": "verimesh.signing.keys",
    "SecretKey": "verimesh.signing.keys",
    "plan_and_build": "verimesh.jobs.plan",
    "check_evidence": "verimesh.spot.evidence",
    "read_bundle": "verimesh.jobs.bundle",
    "StepRunner": "verimesh.jobs.runtime",
    "Verdict": "verimesh.jobs.verdict",
    "Check": "verimesh.jobs.verdict",
    "VerimeshError": "verimesh.errors",
    "VerificationFailedError": "verimesh.errors",
    "InvalidInputError": "verimesh.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'verimesh' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
