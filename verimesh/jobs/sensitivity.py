"""Where a step boundary would let a worker launder (docs/format.md §7, docs/design.md §4).

A verifier re-runs each sampled step from the worker's committed inputs and accepts every
boundary within the tolerance. A boundary value that sits within the tolerance of a later
operator's decision point (a comparison's other side, a rounding edge, a top-two tie, a
divisor's zero) lets a worker pick which side it falls on and so pick the result, while every
step still re-checks. The planner runs the model once on the job's own input, finds such values
and never cuts between their producer and that operator: they stay inside one step, whose
re-check compares the decision itself.

Also here: which boundary tensors feed an operator that tells -0.0 from +0.0 (a divisor), whose
zeros the verifier must compare with their sign.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from verimesh.jobs.tolerance import Tolerance

# A value is near a decision point when within HEADROOM x the tolerance band of it: the worker
# can move it by one band, honest variation moves it a little more.
HEADROOM = 4.0

# op -> (float inputs whose value decides, the kind of decision point)
DECISIONS: dict[str, tuple[tuple[int, ...], str]] = {
    "Greater": ((0, 1), "difference"),
    "Less": ((0, 1), "difference"),
    "GreaterOrEqual": ((0, 1), "difference"),
    "LessOrEqual": ((0, 1), "difference"),
    "Equal": ((0, 1), "difference"),
    "Sign": ((0,), "zero"),
    "NonZero": ((0,), "zero"),
    "Floor": ((0,), "integer"),
    "Ceil": ((0,), "integer"),
    "Round": ((0,), "half-integer"),
    "Cast": ((0,), "integer"),
    "ArgMax": ((0,), "top2"),
    "ArgMin": ((0,), "bottom2"),
    "Hardmax": ((0,), "top2"),
    "TopK": ((0,), "topk"),
    "Div": ((1,), "zero"),
    "Reciprocal": ((0,), "zero"),
    "Log": ((0,), "zero"),
    "Sqrt": ((0,), "zero"),
    "Pow": ((0,), "zero"),
    # Decision points these operators hide in parameters: never cut before them.
    "Mod": ((0, 1), "always"),
    "QuantizeLinear": ((0,), "always"),
    "DynamicQuantizeLinear": ((0,), "always"),
    "NonMaxSuppression": ((0, 1), "always"),
    "Unique": ((0,), "always"),
}
# Operators whose result changes with the sign of a zero input: 1/(+0) = +inf, 1/(-0) = -inf.
SIGN_OF_ZERO: dict[str, tuple[int, ...]] = {"Div": (1,), "Reciprocal": (0,), "Pow": (0,)}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


@dataclass(frozen=True)
class Decision:
    """A node that decides on float values: its compute index, op, and the inputs that decide."""

    index: int
    op: str
    kind: str
    inputs: tuple[str, ...]
    node: onnx.NodeProto


def decisions(compute: Sequence[onnx.NodeProto], types: Mapping[str, onnx.ValueInfoProto]) -> list[Decision]:
    """The nodes whose decisions rest on float inputs (integer inputs are compared exactly)."""
    out = []
    for i, node in enumerate(compute):
        if node.domain not in ("", "ai.onnx") or node.op_type not in DECISIONS:
            continue
        positions, kind = DECISIONS[node.op_type]
        if node.op_type == "Cast" and not _casts_to_discrete(node):
            continue
        names = tuple(node.input[p] for p in positions if p < len(node.input) and node.input[p])
        floats = tuple(n for n in names if n in types and types[n].type.tensor_type.elem_type in _FLOAT_TYPES)
        if floats:
            out.append(Decision(i, node.op_type, kind, names, node))
    return out


def _casts_to_discrete(node: onnx.NodeProto) -> bool:
    to = next((a.i for a in node.attribute if a.name == "to"), 0)
    return to not in _FLOAT_TYPES and to != onnx.TensorProto.BFLOAT16


def _band(x: np.ndarray, tol: Tolerance) -> np.ndarray:
    """How far the worker may move each element and still pass the tolerance (times HEADROOM)."""
    x = np.asarray(x, dtype=np.float64)
    band = tol.atol + tol.rtol * np.abs(x)
    if tol.max_outside_fraction > 0:  # a few elements may sit anywhere within the Frobenius bound
        band = np.maximum(band, tol.max_rel_frobenius * float(np.linalg.norm(x.reshape(-1))))
    return np.asarray(HEADROOM * band)


def near_decision(decision: Decision, values: Mapping[str, np.ndarray], movable: set[str], tol: Tolerance) -> bool:
    """Could within-tolerance moves of the ``movable`` inputs flip this node's decision?

    ``values``: the inputs as the job's own input gives them; an input missing from it (no type
    to fetch it by) counts as near."""
    if decision.kind == "always":
        return True
    if any(n not in values for n in decision.inputs if n in movable):
        return True

    def band(name: str) -> np.ndarray:
        return _band(values[name], tol) if name in movable else np.zeros(np.shape(values[name]))

    first = decision.inputs[0]
    if decision.kind == "difference":
        if len(decision.inputs) < 2 or decision.inputs[1] not in values:
            return True
        a, b = (np.asarray(values[n], dtype=np.float64) for n in decision.inputs[:2])
        with np.errstate(invalid="ignore"):
            return bool(np.any(np.abs(a - b) <= band(decision.inputs[0]) + band(decision.inputs[1])))
    if first not in movable:
        return False
    x = np.asarray(values[first], dtype=np.float64)
    slack = band(first)
    if decision.kind == "zero":
        return bool(np.any(np.abs(x) <= slack))
    if decision.kind == "integer":
        return bool(np.any(np.abs(x - np.round(x)) <= slack))
    if decision.kind == "half-integer":
        return bool(np.any(np.abs(x - np.floor(x) - 0.5) <= slack))
    axis = next((a.i for a in decision.node.attribute if a.name == "axis"), -1)
    if decision.kind in ("top2", "bottom2", "topk"):
        if x.ndim == 0 or x.shape[axis] < 2:
            return False
        k = 1
        if decision.kind == "topk":
            k = int(np.asarray(values.get(decision.node.input[1], [1])).reshape(-1)[0])
            if k >= x.shape[axis]:
                return False
        ordered = np.sort(-x if decision.kind != "bottom2" else x, axis=axis)
        ordered = np.moveaxis(ordered, axis, -1)
        gap = np.abs(ordered[..., k] - ordered[..., k - 1])
        return bool(np.any(gap <= 2 * np.moveaxis(slack, axis, -1).max(axis=-1)))
    return True


def sign_sensitive(consumers: Mapping[str, Sequence[onnx.NodeProto]], names: Sequence[str]) -> tuple[str, ...]:
    """Of ``names``, those some consumer reads where the sign of a zero changes its result."""
    out = []
    for name in names:
        for node in consumers.get(name, ()):
            positions = SIGN_OF_ZERO.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
            if any(p < len(node.input) and node.input[p] == name for p in positions):
                out.append(name)
                break
    return tuple(sorted(set(out)))
