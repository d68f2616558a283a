"""Step costs: an estimate of the floating-point work of each ONNX node (docs/design.md §4).

The planner balances steps by these estimates and the verifier samples steps in proportion to
them, so a step whose cost is under-estimated is checked less often than its share of the work
deserves (a lazy worker would skip it at little risk).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx


def numel(vi: onnx.ValueInfoProto | None) -> int | None:
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    n = 1
    for d in vi.type.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        n *= d.dim_value
    return n


def node_flops(node: onnx.NodeProto, shapes: Mapping[str, onnx.ValueInfoProto]) -> int:
    out = numel(shapes.get(node.output[0])) if node.output else None
    out = out or 1
    if node.op_type in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv") and len(node.input) > 1:
        w = shapes.get(node.input[1])
        if w is not None and w.type.tensor_type.HasField("shape"):
            dims = [d.dim_value for d in w.type.tensor_type.shape.dim]
            if node.op_type == "ConvTranspose":  # W is [C_in, C_out/group, k...]
                return 2 * (numel(shapes.get(node.input[0])) or 1) * int(np.prod(dims[1:] or [1]))
            return 2 * out * int(np.prod(dims[1:] or [1]))
    if node.op_type in ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul") and node.input:
        a = shapes.get(node.input[0])
        if a is not None and a.type.tensor_type.HasField("shape") and a.type.tensor_type.shape.dim:
            dims = a.type.tensor_type.shape.dim
            transposed = node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute)
            k = dims[0] if transposed else dims[-1]
            if k.HasField("dim_value"):
                return 2 * out * int(k.dim_value)
    return out
