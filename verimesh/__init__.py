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

__version__ = "0.1.0"

_EXPORTS = {
    "prove": "verimesh.workflows",
    "verify": "verimesh.workflows",
    "seal_trace": "verimesh.workflows",
    "ProveResult": "verimesh.workflows",
    "Worker": "verimesh.workflows",
    "new_job": "verimesh.job",
    "load_job": "verimesh.job",
    "Job": "verimesh.job",
    "generate_key": "verimesh.keys",
    "load_secret_key": "verimesh.keys",
    "load_public_key": "verimesh.keys",
    "write_key_pair": "verimesh.keys",
    "PublicKey": "verimesh.keys",
    "SecretKey": "verimesh.keys",
    "plan_and_build": "verimesh.plan",
    "check_evidence": "verimesh.evidence",
    "read_bundle": "verimesh.bundle",
    "StepRunner": "verimesh.runtime",
    "Verdict": "verimesh.verdict",
    "Check": "verimesh.verdict",
    "VerimeshError": "verimesh.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'verimesh' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
