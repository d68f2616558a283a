"""Tolerance profiles and the multi-metric comparison of a recomputed tensor with a committed one.

Metrics (DESIGN §3): relative Frobenius error, the fraction of elements outside
``atol + rtol * |ref|``, exact agreement of the argmax over the last axis (skipped where the
reference's top-two margin is below ``argmax_margin``), exact equality for integer and bool
tensors, and NaN/Inf where the reference is finite is always a mismatch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from verimesh.errors import InvalidInputError


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    max_outside_fraction: float
    max_rel_frobenius: float
    argmax_margin: float

    def to_json(self) -> dict[str, str]:
        # Floats travel as strings so that documents stay RFC 8785-canonical across languages.
        return {k: repr(float(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, doc: object) -> Tolerance:
        if not isinstance(doc, dict) or set(doc) != set(cls.__dataclass_fields__):
            raise InvalidInputError(f"tolerance must have exactly {sorted(cls.__dataclass_fields__)}")
        try:
            values = {k: float(v) for k, v in doc.items() if isinstance(v, str)}
        except ValueError as exc:
            raise InvalidInputError("tolerance values must be decimal strings") from exc
        if len(values) != len(doc) or not all(np.isfinite(v) and v >= 0 for v in values.values()):
            raise InvalidInputError("tolerance values must be finite, non-negative decimal strings")
        return cls(**values)


# Defaults per precision class; `verimesh calibrate` (later) writes per-model profiles.
# fp32-strict: CPU-vs-CPU and CPU-vs-CUDA(TF32 off) fp32 stay well inside these, while fp16
# weights (~1e-3 relative) and TF32 (~1e-3) land outside the Frobenius bound.
DEFAULT_TOLERANCES = {
    "fp32-strict": Tolerance(
        rtol=1e-3, atol=1e-4, max_outside_fraction=0.0, max_rel_frobenius=1e-4, argmax_margin=1e-3
    ),
    "tf32": Tolerance(rtol=2e-2, atol=2e-3, max_outside_fraction=1e-3, max_rel_frobenius=5e-3, argmax_margin=2e-2),
}


@dataclass(frozen=True)
class Comparison:
    ok: bool
    reason: str
    metrics: dict[str, Any]


def compare_tensors(name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> Comparison:
    """Compare a committed tensor (``got``) with the verifier's recomputation (``ref``)."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return Comparison(
            False, f"{name}: shape/dtype {got.dtype}{list(got.shape)} != recomputed {ref.dtype}{list(ref.shape)}", {}
        )
    if got.dtype.kind in "biu":
        diff = int(np.count_nonzero(got != ref))
        return Comparison(
            diff == 0, f"{name}: {diff} of {got.size} elements differ" if diff else "", {"mismatched": diff}
        )
    g = got.astype(np.float64, copy=False)
    r = ref.astype(np.float64, copy=False)
    ref_finite = np.isfinite(r)
    bad_nonfinite = int(np.count_nonzero(~np.isfinite(g) & ref_finite))
    if bad_nonfinite or not np.array_equal(np.isfinite(g), ref_finite):
        return Comparison(
            False,
            f"{name}: {bad_nonfinite} NaN/Inf values where the recomputation is finite",
            {"nonfinite": bad_nonfinite},
        )
    gf, rf = np.where(ref_finite, g, 0.0), np.where(ref_finite, r, 0.0)
    diff = np.abs(gf - rf)
    ref_norm = float(np.linalg.norm(rf))
    rel_fro = float(np.linalg.norm(diff)) / max(ref_norm, 1e-30) if diff.any() else 0.0
    outside = int(np.count_nonzero(diff > tol.atol + tol.rtol * np.abs(rf)))
    frac = outside / max(got.size, 1)
    metrics: dict[str, Any] = {
        "rel_frobenius": rel_fro,
        "outside_fraction": frac,
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
    }
    problems = []
    if rel_fro > tol.max_rel_frobenius:
        problems.append(f"relative Frobenius error {rel_fro:.3g} > {tol.max_rel_frobenius:.3g}")
    if frac > tol.max_outside_fraction:
        problems.append(f"{outside}/{got.size} elements outside atol+rtol|ref|")
    if got.ndim >= 1 and got.shape[-1] > 1:
        flips = _argmax_flips(gf, rf, tol.argmax_margin)
        metrics["argmax_flips"] = flips
        if flips:
            problems.append(f"argmax differs in {flips} rows")
    return Comparison(not problems, f"{name}: " + "; ".join(problems) if problems else "", metrics)


def _argmax_flips(got: np.ndarray, ref: np.ndarray, margin: float) -> int:
    g2, r2 = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
    top2 = np.sort(r2, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > margin * np.maximum(np.abs(top2[:, 1]), 1.0)
    return int(np.count_nonzero(decisive & (g2.argmax(-1) != r2.argmax(-1))))
