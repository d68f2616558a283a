"""Tolerance profiles and the multi-metric comparison of a recomputed tensor with a committed one.

Metrics (docs/design.md §4): relative Frobenius error, the fraction of elements outside
``atol + rtol * |ref|``, exact agreement of the argmax over the last axis (skipped where the
reference's top-two margin is below ``argmax_margin``), exact equality for integer and bool
tensors, and NaN/Inf where the reference is finite is always a mismatch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verimesh.core.canonical import parse_canonical_json
from verimesh.core.digest import parse_digest
from verimesh.core.files import read_user_file
from verimesh.errors import InvalidInputError

PROFILE_TYPE = "verimesh/tolerance-profile"


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


def compare_tensors(
    name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance, *, discrete: bool = False, zero_sign: bool = False
) -> Comparison:
    """Compare a committed tensor (``got``) with the verifier's recomputation (``ref``).

    ``discrete``: the tensor is a model output whose argmax over the last axis is a decision
    (class logits); intermediate feature maps have no such meaning and skip that metric.
    Special values are compared exactly, never within a tolerance: NaN where NaN, +inf where
    +inf, -inf where -inf (a later Reciprocal, Log or argmax turns a flipped infinity into another
    result). ``zero_sign``: the tensor feeds an operator that tells -0.0 from +0.0 (a divisor),
    so the sign of every zero must agree too."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return Comparison(
            False, f"{name}: shape/dtype {got.dtype}{list(got.shape)} != recomputed {ref.dtype}{list(ref.shape)}", {}
        )
    if same_bits(got, ref):  # bit for bit the same (an honest run on the same platform)
        return Comparison(True, "", _identical(got, discrete))
    if got.dtype.kind in "biu":
        mismatched = int(np.count_nonzero(got != ref))
        detail = f"{name}: {mismatched} of {got.size} elements differ" if mismatched else ""
        return Comparison(mismatched == 0, detail, {"mismatched": mismatched})
    # float32 stays float32 (no float64 copies of large feature maps); norms accumulate in BLAS.
    g, r = (
        (got, ref)
        if got.dtype.kind == "f" and got.dtype.itemsize >= 4
        else (got.astype(np.float32), ref.astype(np.float32))
    )
    finite_g, finite_r = np.isfinite(g), np.isfinite(r)
    if not (finite_g.all() and finite_r.all()):
        special = int(
            np.count_nonzero(
                (np.isnan(g) != np.isnan(r)) | (np.isposinf(g) != np.isposinf(r)) | (np.isneginf(g) != np.isneginf(r))
            )
        )
        if special:
            return Comparison(
                False,
                f"{name}: {special} elements differ in NaN/infinity (special values must match exactly)",
                {"special_values": special},
            )
        g, r = np.where(finite_r, g, 0), np.where(finite_r, r, 0)  # same special values: compare the rest
    if zero_sign:
        flipped = int(np.count_nonzero((g == 0) & (r == 0) & (np.signbit(g) != np.signbit(r))))
        if flipped:
            return Comparison(
                False,
                f"{name}: {flipped} zeros with the wrong sign (the tensor feeds a divisor)",
                {"zero_signs": flipped},
            )
    diff = np.abs(g - r)
    rel_fro = _norm(diff) / max(_norm(r), 1e-30) if diff.any() else 0.0
    outside = int(np.count_nonzero(diff > np.abs(r) * r.dtype.type(tol.rtol) + r.dtype.type(tol.atol)))
    frac = outside / max(got.size, 1)
    metrics: dict[str, Any] = {
        "rel_frobenius": rel_fro,
        "outside_fraction": frac,
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
    }
    problems = []
    if not rel_fro <= tol.max_rel_frobenius:  # NaN (overflowed norms) counts as a failure too
        problems.append(f"relative Frobenius error {rel_fro:.3g} > {tol.max_rel_frobenius:.3g}")
    if frac > tol.max_outside_fraction:
        problems.append(f"{outside}/{got.size} elements outside atol+rtol|ref|")
    if discrete and got.ndim >= 1 and got.shape[-1] > 1:
        flips = _argmax_flips(g, r, tol.argmax_margin)
        metrics["argmax_flips"] = flips
        if flips:
            problems.append(f"argmax differs in {flips} rows")
    return Comparison(not problems, f"{name}: " + "; ".join(problems) if problems else "", metrics)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (NaN payloads and the signs of zeros included), without copies."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.flags.c_contiguous and b.flags.c_contiguous:
        return bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))
    return a.tobytes() == b.tobytes()


def _identical(got: np.ndarray, discrete: bool) -> dict[str, Any]:
    if got.dtype.kind in "biu":
        return {"mismatched": 0}
    metrics: dict[str, Any] = {"rel_frobenius": 0.0, "outside_fraction": 0.0, "max_abs_diff": 0.0}
    if discrete and got.ndim >= 1 and got.shape[-1] > 1:
        metrics["argmax_flips"] = 0
    return metrics


def _norm(x: np.ndarray) -> float:
    """L2 norm in the array's precision, redone in float64 if float32 overflowed."""
    with np.errstate(over="ignore"):
        n = float(np.linalg.norm(x.reshape(-1)))
    return n if np.isfinite(n) else float(np.linalg.norm(x.reshape(-1).astype(np.float64)))


def _argmax_flips(got: np.ndarray, ref: np.ndarray, margin: float) -> int:
    g2, r2 = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
    top2 = np.sort(r2, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > margin * np.maximum(np.abs(top2[:, 1]), 1.0)
    return int(np.count_nonzero(decisive & (g2.argmax(-1) != r2.argmax(-1))))


@dataclass(frozen=True)
class ToleranceProfile:
    """What a job pins from a ``verimesh calibrate`` profile: for which model and precision
    class it was measured, and each step's digest and tolerance (docs/format.md §3)."""

    model_digest: str
    precision: str
    steps: dict[int, tuple[str, Tolerance]]
    windows: dict[int, Tolerance]  # step index -> tolerance of the window ending at that step


def load_tolerance_profile(path: Path) -> ToleranceProfile:
    """Read a profile file written by ``verimesh calibrate`` (canonical JSON)."""
    doc = parse_canonical_json(read_user_file(path, what="tolerance profile", max_bytes=8 << 20), what=str(path))
    if not isinstance(doc, dict) or doc.get("type") != PROFILE_TYPE or doc.get("version") != 1:
        raise InvalidInputError(f"{path} is not a verimesh tolerance profile")
    try:
        steps, windows = {}, {}
        for entry in doc["steps"]:
            parse_digest(entry["digest"], what="profile step digest")
            steps[int(entry["index"])] = (str(entry["digest"]), Tolerance.from_json(entry["tolerance"]))
            if "window_tolerance" in entry:
                windows[int(entry["index"])] = Tolerance.from_json(entry["window_tolerance"])
        return ToleranceProfile(str(doc["model_digest"]), str(doc["precision"]), steps, windows)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{path} is malformed ({exc})") from exc
