"""Step costs: an estimate of the work of each ONNX node (docs/design.md §4).

The planner balances steps by these estimates and the verifier samples steps in proportion to
them, so a step whose cost is under-estimated is checked less often than its share of the work
deserves (a lazy worker would skip it at little risk).

A node's cost is in FLOP-equivalents: its arithmetic (a multiply-add is 2 FLOPs) plus
``MEMORY`` per tensor element it reads or writes. The arithmetic: contractions (Conv, MatMul,
Gemm, Einsum, the recurrent and attention ops) by their multiply-adds, windows (pooling, Resize,
LRN) by output elements × taps, normalisations and softmax by a small constant × input
elements, elementwise ops by output elements (transcendental ones weighted), data movement by
nothing but its traffic. Pure views (Reshape, Squeeze, ...) touch no element and cost 1.

Why the memory term: timed alone on an idle 2-core CPU (onnxruntime, the worker's session
options), large MatMuls run at 340 to 380 FLOPs a nanosecond and a 3×3 Conv at 190, but Add,
Relu, LayerNorm or MaxPool do 7 to 15 of their FLOPs a nanosecond (a Transpose moves 9 elements
one), 20 to 50 times less; an LSTM or GRU at batch 1 does 80 to 100, since it re-reads its
recurrent weights at every time step for a matrix-vector product. Counting each element read or
written as 16 FLOPs puts every operator timed (contractions, recurrences, softmax, elementwise,
data movement) between 145 and 490 cost units a nanosecond; GPUs, whose arithmetic outpaces
their memory further still, are not under-costed by it either.

``shapes`` maps tensor names to inferred value infos (plan.py infers them with concrete model
input dims). Where a shape is unknown, a node falls back to the element count of whichever of
its tensors is known, and never to less than 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import onnx

Dims = tuple[int | None, ...]

MEMORY = 16  # FLOP-equivalents per tensor element read or written (see the module docstring)
# FLOP-equivalents per element of an exp, tanh, sigmoid or erf, beyond its traffic: measured,
# exp about 20, tanh, sigmoid and erf 40 to 50. Graphs chain them (GELU: Div, Erf, Add, Mul, Mul)
# where onnxruntime fuses one kernel but the traffic is counted for each, so a lower value is taken.
TRANSCENDENTAL = 16
_SLOW = 4  # a square root or reciprocal

_ELEMENTWISE: dict[str, int] = {
    **dict.fromkeys(
        """Exp Log Tanh Sigmoid Erf Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh Pow Softplus
        Softsign Elu Selu Celu Mish Gelu FastGelu BiasGelu QuickGelu Swish SiLU ThresholdedRelu""".split(),
        TRANSCENDENTAL,
    ),
    **dict.fromkeys("Sqrt Reciprocal Mod HardSigmoid HardSwish".split(), _SLOW),
    **dict.fromkeys("LeakyRelu PRelu Clip QuantizeLinear DequantizeLinear".split(), 2),
    # Everything else elementwise (Add, Mul, Div, Relu, comparisons, logic, Where, ...) is 1.
}
_VARIADIC = frozenset({"Sum", "Mean", "Max", "Min"})  # n inputs: n - 1 operations per element
# Pure views: onnxruntime aliases the input buffer (or only reads a shape), no element is touched.
_VIEWS = frozenset(
    """Reshape Squeeze Unsqueeze Flatten Identity Shape Size Dropout Constant Optional
    OptionalGetElement OptionalHasElement""".split()
)
# Reads only the elements it outputs (and its indices), not the whole input.
_GATHERS = frozenset({"Gather", "GatherElements", "GatherND", "Slice"})
# Per-element constants × input elements; these also read their input twice (statistics, then
# the normalisation), which their traffic counts.
_NORMS: dict[str, int] = {
    "BatchNormalization": 2,  # inference: one scale and one shift per element
    "LayerNormalization": 5,  # mean, variance, normalise, scale, shift
    "InstanceNormalization": 5,
    "GroupNormalization": 5,
    "MeanVarianceNormalization": 5,
    "RMSNormalization": 4,
    "SimplifiedLayerNormalization": 4,
    "SkipSimplifiedLayerNormalization": 5,
    "SkipLayerNormalization": 6,  # the skip (and bias) add, then a layer norm
    "LpNormalization": 3,
}
_SOFTMAX: dict[str, int] = {
    "Softmax": 4 + TRANSCENDENTAL,  # max, subtract, exp, sum, divide
    "LogSoftmax": 4 + TRANSCENDENTAL,
    "Hardmax": 2,
}
_REDUCE: dict[str, int] = {
    "ReduceSum": 1, "ReduceMean": 1, "ReduceMax": 1, "ReduceMin": 1, "ReduceProd": 1, "ReduceLogSum": 1,
    "ReduceL1": 2, "ReduceL2": 2, "ReduceSumSquare": 2, "ReduceLogSumExp": 2 + TRANSCENDENTAL,
    "ArgMax": 1, "ArgMin": 1, "CumSum": 1, "CumProd": 1,
}  # fmt: skip
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
# Arithmetic only in their traffic (copies, index arithmetic).
_MOVES = frozenset(
    """Scatter ScatterElements ScatterND Transpose Concat Split SplitToSequence Pad Tile Expand Cast
    CastLike ConstantOfShape Range DepthToSpace SpaceToDepth OneHot Compress ReverseSequence Trilu
    NonZero Unique EyeLike Gather GatherElements GatherND Slice""".split()
)
_RECURRENT_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
# Elementwise work per hidden unit and time step besides the gate activations: the cell update
# and output of an LSTM (c = f·c + i·g, h = o·tanh(c)), the reset and blend of a GRU.
_RECURRENT_EXTRA = {"RNN": 0, "GRU": 5, "LSTM": 4 + TRANSCENDENTAL}


@dataclass(frozen=True)
class Work:
    """A node's arithmetic and the tensor elements it reads or writes."""

    flops: int
    moved: int

    @property
    def cost(self) -> int:
        return max(1, self.flops + MEMORY * self.moved)


def numel(vi: onnx.ValueInfoProto | None) -> int | None:
    d = dims(vi)
    if d is None or any(x is None for x in d):
        return None
    return math.prod(x for x in d if x is not None)


def dims(vi: onnx.ValueInfoProto | None) -> Dims | None:
    """The dims of a value info (None for a symbolic one), or None when the rank is unknown."""
    if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)


def _known(d: Dims | None) -> tuple[int, ...] | None:
    if d is None or any(x is None for x in d):
        return None
    return tuple(x for x in d if x is not None)


class _Node:
    """A node with its shapes and attributes at hand."""

    def __init__(self, node: onnx.NodeProto, shapes: Mapping[str, onnx.ValueInfoProto]) -> None:
        self.node = node
        self.shapes = shapes
        self.attrs = {a.name: a for a in node.attribute}
        self.extra_moved = 0  # traffic beyond the inputs and outputs, added by a rule

    def _dims(self, names: Sequence[str], i: int) -> Dims | None:
        if i >= len(names) or not names[i]:
            return None
        return dims(self.shapes.get(names[i]))

    def inp(self, i: int) -> Dims | None:
        return self._dims(self.node.input, i)

    def out(self, i: int = 0) -> Dims | None:
        return self._dims(self.node.output, i)

    def n_in(self, i: int) -> int | None:
        k = _known(self.inp(i))
        return math.prod(k) if k is not None else None

    def n_out(self, i: int = 0) -> int | None:
        k = _known(self.out(i))
        return math.prod(k) if k is not None else None

    def has_input(self, i: int) -> bool:
        return i < len(self.node.input) and bool(self.node.input[i])

    def attr_int(self, name: str, default: int) -> int:
        a = self.attrs.get(name)
        return int(a.i) if a is not None else default

    def attr_ints(self, name: str) -> tuple[int, ...] | None:
        a = self.attrs.get(name)
        return tuple(int(v) for v in a.ints) if a is not None else None

    def attr_str(self, name: str, default: str) -> str:
        a = self.attrs.get(name)
        return a.s.decode() if a is not None else default

    def elements(self) -> int:
        """The fallback: output elements, else the largest known input, else 1."""
        out = self.n_out(0)
        if out is not None:
            return out
        sizes = [n for i in range(len(self.node.input)) if (n := self.n_in(i)) is not None]
        return max(sizes, default=1)

    def in_elements(self, i: int = 0) -> int:
        n = self.n_in(i)
        return n if n is not None else self.elements()


def node_flops(node: onnx.NodeProto, shapes: Mapping[str, onnx.ValueInfoProto]) -> int:
    """Estimated cost of one node in FLOP-equivalents (at least 1): ``node_work(...).cost``."""
    return node_work(node, shapes).cost


def node_work(node: onnx.NodeProto, shapes: Mapping[str, onnx.ValueInfoProto]) -> Work:
    n = _Node(node, shapes)
    if node.op_type in _VIEWS:
        return Work(0, 0)
    rule = _RULES.get(node.op_type)
    flops = rule(n) if rule is not None else None
    if flops is None:
        n.extra_moved = 0  # a rule that gave up may have counted some
        flops = _generic(n)
    return Work(max(0, int(flops)), _moved(n))


def _moved(n: _Node) -> int:
    """Elements read and written: every known input (weights included, read once) and output."""
    op = n.node.op_type
    outs = sum(k for i in range(len(n.node.output)) if (k := n.n_out(i)) is not None) or n.elements()
    if op in _GATHERS:
        return 2 * outs + ((n.n_in(1) or 0) if op != "Slice" else 0)
    ins = sum(k for i in range(len(n.node.input)) if (k := n.n_in(i)) is not None)
    if op in _NORMS or op in _SOFTMAX:
        ins += n.n_in(0) or 0
    return ins + outs + n.extra_moved


def _generic(n: _Node) -> int:
    op = n.node.op_type
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.node.attribute):
        return _control_flow(n)
    if op in _MOVES:
        return 0
    if op in _NORMS:
        return _NORMS[op] * n.in_elements(0)
    if op in _SOFTMAX:
        return _SOFTMAX[op] * n.in_elements(0)
    if op in _REDUCE:
        return _REDUCE[op] * n.in_elements(0)
    if op in _GLOBAL_POOLS:
        return n.in_elements(0)
    if op in _VARIADIC:
        return max(1, len([i for i in n.node.input if i]) - 1) * n.elements()
    return _ELEMENTWISE.get(op, 1) * n.elements()


# -- contractions -----------------------------------------------------------------------------


def _conv(weight: int, bias: int | None) -> Callable[[_Node], int | None]:
    """Conv-like: W is [M, C/group, k...]; each output element is a dot product of C/group·k."""

    def cost(n: _Node) -> int | None:
        w = _known(n.inp(weight))
        if w is None or len(w) < 2:
            return None
        out = n.n_out(0) or _conv_out(n, w)
        if out is None:
            return None
        flops = 2 * out * math.prod(w[1:])
        return flops + (out if bias is not None and n.has_input(bias) else 0)

    return cost


def _conv_out(n: _Node, w: tuple[int, ...]) -> int | None:
    """Output elements of an NCHW convolution from its attributes, for the contrib ops (FusedConv)
    that ONNX shape inference does not know."""
    x = _known(n.inp(0))
    if x is None or len(x) != len(w) or n.node.op_type.startswith("Nhwc"):
        return None
    spatial = len(x) - 2
    kernel = n.attr_ints("kernel_shape") or w[2:]
    strides = n.attr_ints("strides") or (1,) * spatial
    dilations = n.attr_ints("dilations") or (1,) * spatial
    pads = n.attr_ints("pads") or (0,) * (2 * spatial)
    same = n.attr_str("auto_pad", "NOTSET").startswith("SAME")
    size = x[0] * w[0]
    for i in range(spatial):
        if same:
            size *= -(-x[2 + i] // strides[i])
        else:
            span = x[2 + i] + pads[i] + pads[i + spatial] - dilations[i] * (kernel[i] - 1) - 1
            size *= max(0, span // strides[i] + 1)
    return size


def _deform_conv(n: _Node) -> int | None:
    base = _conv(1, 3)(n)
    # Each tap is a bilinear sample of 4 input values (a multiply-add each) before the product.
    return None if base is None else 5 * base // 2


def _conv_transpose(n: _Node) -> int | None:
    """W is [C, M/group, k...]: every input element is scattered into M/group·k outputs."""
    w = _known(n.inp(1))
    x = n.n_in(0)
    if w is None or len(w) < 2 or x is None:
        return None
    flops = 2 * x * math.prod(w[1:])
    return flops + (n.elements() if n.has_input(2) else 0)


def _matmul(a_index: int, b_index: int) -> Callable[[_Node], int | None]:
    """[..., M, K] × [..., K, N]: 2·K per output element (Gemm and FusedMatMul honour transA/B)."""

    def cost(n: _Node) -> int | None:
        out = n.n_out(0) or _matmul_out(n, a_index, b_index)
        if out is None:
            return None
        k = _contracted(n, a_index, b_index)
        if k is None:
            return None
        flops = 2 * out * k
        if n.node.op_type in ("Gemm", "FusedGemm") and n.has_input(2):
            flops += out  # + beta·C
        return flops

    return cost


def _contracted(n: _Node, a_index: int, b_index: int) -> int | None:
    trans_a = n.attr_int("transA", 0)
    trans_b = n.attr_int("transB", 0)
    a = n.inp(a_index)
    if a:
        k = a[-2] if trans_a and len(a) >= 2 else a[-1]
        if k is not None:
            return k
    b = n.inp(b_index)
    if b:
        k = b[0] if len(b) == 1 else (b[-1] if trans_b else b[-2])
        if k is not None:
            return k
    return None


def _matmul_out(n: _Node, a_index: int, b_index: int) -> int | None:
    """Output elements from the operands (broadcast batch dims), for contrib ops without inferred shapes."""
    a, b = _known(n.inp(a_index)), _known(n.inp(b_index))
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return None
    m = a[-1] if n.attr_int("transA", 0) else a[-2]
    cols = b[-2] if n.attr_int("transB", 0) else b[-1]
    batch_a, batch_b = a[:-2], b[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a = (1,) * (width - len(batch_a)) + batch_a
    batch_b = (1,) * (width - len(batch_b)) + batch_b
    return math.prod(max(p, q) for p, q in zip(batch_a, batch_b, strict=True)) * m * cols


def _matmul_nbits(n: _Node) -> int | None:
    """com.microsoft MatMulNBits: A [..., K] × a packed [K, N] weight (both in attributes)."""
    a = _known(n.inp(0))
    k, cols = n.attr_int("K", 0), n.attr_int("N", 0)
    out = n.n_out(0) or (math.prod(a[:-1]) * cols if a else None)
    return 2 * out * k if out and k > 0 else None


def _einsum(n: _Node) -> int | None:
    """Contracted pairwise left to right, as onnxruntime does: 2 × the product of every distinct
    index size of each pair (one operand alone: the elements read)."""
    a = n.attrs.get("equation")
    if a is None:
        return None
    parsed = _einsum_labels(a.s.decode(), [n.inp(i) for i in range(len(n.node.input))])
    if parsed is None:
        return None
    terms, output, sizes = parsed
    if len(terms) == 1:
        return math.prod(sizes[x] for x in set(terms[0]))
    flops = 0
    current = set(terms[0])
    for i in range(1, len(terms)):
        union = current | set(terms[i])
        flops += 2 * math.prod(sizes[x] for x in union)
        later = set(output).union(*[set(t) for t in terms[i + 1 :]])
        current = union & later
    return flops


def _einsum_labels(
    equation: str, operand_dims: Sequence[Dims | None]
) -> tuple[list[list[str]], list[str], dict[str, int]] | None:
    """Each operand's index labels (ellipsis dims as '.0', '.1', ... aligned right), the output's,
    and every label's size (broadcast: the largest); None when a shape is unknown."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    raw = lhs.split(",")
    if len(raw) != len(operand_dims):
        return None
    known = [_known(d) for d in operand_dims]
    ranks: list[int] = []
    for term, d in zip(raw, known, strict=True):
        if d is None:
            return None
        letters = len(term.replace("...", ""))
        ranks.append(len(d) - letters if "..." in term else 0)
        if ranks[-1] < 0 or ("..." not in term and letters != len(d)):
            return None
    ell = max(ranks, default=0)

    def expand(term: str, rank: int) -> list[str]:
        head, dots, tail = term.partition("...")
        middle = [f".{ell - rank + j}" for j in range(rank)] if dots else []
        return [*head, *middle, *tail]

    terms = [expand(t, r) for t, r in zip(raw, ranks, strict=True)]
    sizes: dict[str, int] = {}
    for labels, d in zip(terms, known, strict=True):
        assert d is not None
        for label, size in zip(labels, d, strict=True):
            sizes[label] = max(sizes.get(label, 1), size)
    if arrow:
        output = expand(rhs, ell)
    else:  # implicit output: the ellipsis, then letters used once, alphabetically
        counts: dict[str, int] = {}
        for labels in terms:
            for label in labels:
                counts[label] = counts.get(label, 0) + 1
        output = [f".{j}" for j in range(ell)] + sorted(x for x, c in counts.items() if c == 1 and x[0] != ".")
    if any(x not in sizes for x in output):
        return None
    return terms, output, sizes


def _recurrent(n: _Node) -> int | None:
    """RNN, GRU, LSTM: per time step, batch row and direction, the gate matmuls on the input
    (2·G·H·I) and on the hidden state (2·G·H·H), the biases, the gate activations and the
    cell update."""
    op = n.node.op_type
    gates = _RECURRENT_GATES[op]
    w, r = n.inp(1), n.inp(2)
    hidden = n.attr_int("hidden_size", 0) or (r[-1] if r and r[-1] else None)
    if not hidden and w and len(w) == 3 and w[1]:
        hidden = w[1] // gates
    layout = n.attr_int("layout", 0)
    x = n.inp(0)
    y = n.out(0)
    seq = batch = features = None
    if x and len(x) == 3:
        seq, batch = (x[0], x[1]) if layout == 0 else (x[1], x[0])
        features = x[2]
    if (seq is None or batch is None) and y and len(y) == 4:
        # Y is [seq, dirs, batch, H] (layout 1: [batch, seq, dirs, H])
        seq, batch = (seq or y[0], batch or y[2]) if layout == 0 else (seq or y[1], batch or y[0])
    if features is None and w and len(w) == 3:
        features = w[2]
    if not hidden or not features:
        return None
    direction = n.attr_str("direction", "forward")
    dirs = w[0] if w and w[0] else (2 if direction == "bidirectional" else 1)
    gh = gates * hidden
    per_step = 2 * gh * (features + hidden) + 2 * gh  # both matmuls, both biases
    per_step += gh * TRANSCENDENTAL + _RECURRENT_EXTRA[op] * hidden
    if op == "LSTM" and n.has_input(7):
        per_step += 6 * hidden  # peepholes: a multiply-add on three gates
    # R is read again at every time step: the batch rows share it, the time steps cannot.
    n.extra_moved += (seq or 1) * dirs * gh * hidden
    return per_step * (seq or 1) * (batch or 1) * dirs


# -- attention --------------------------------------------------------------------------------


def _attention_core(n: _Node, q_elements: int, out_elements: int, rows: int, kv_len: int) -> int:
    """QKᵀ (2·q_head_size·L per score row) + softmax over the scores + the scores × V. The CPU
    kernels materialise the scores: QKᵀ writes them, softmax reads and writes them, × V reads."""
    n.extra_moved += 4 * rows * kv_len
    return 2 * q_elements * kv_len + _SOFTMAX["Softmax"] * rows * kv_len + 2 * out_elements * kv_len


def _ms_attention(n: _Node) -> int | None:
    """com.microsoft Attention: input [B, S, in] × weights [in, Dq + Dk + Dv], then attention over
    the past and the new keys."""
    x, w = _known(n.inp(0)), _known(n.inp(1))
    heads = n.attr_int("num_heads", 0)
    if x is None or w is None or len(x) != 3 or len(w) != 2 or heads <= 0:
        return None
    b, s, _ = x
    hidden = n.attr_ints("qkv_hidden_sizes") or (w[1] // 3,) * 3
    past = _known(n.inp(4))  # [2, B, heads, P, head_size]
    kv_len = s + (past[3] if past is not None and len(past) == 5 else 0)
    projection = 2 * b * s * w[0] * w[1] + b * s * w[1]
    return projection + _attention_core(n, b * s * hidden[0], b * s * hidden[2], b * heads * s, kv_len)


def _ms_mha(n: _Node) -> int | None:
    """com.microsoft MultiHeadAttention: query [B, S, D] (or packed QKV [B, S, N, 3, H]); key
    [B, L, D] or [B, N, L, H]; attention over past + new keys."""
    q = _known(n.inp(0))
    heads = n.attr_int("num_heads", 0)
    if q is None or heads <= 0:
        return None
    k, v = _known(n.inp(1)), _known(n.inp(2))
    out = n.n_out(0)
    if out is None:  # contrib ops have no ONNX shape inference: the output is [B, S, N·Hv]
        if len(q) == 5:
            out = q[0] * q[1] * q[2] * q[4]
        elif v is not None and len(v) == 3:
            out = q[0] * q[1] * v[2]
        elif v is not None and len(v) == 4:
            out = q[0] * q[1] * v[1] * v[3]
        elif k is not None and len(k) == 5:
            out = q[0] * q[1] * k[2] * k[4]
        else:
            out = math.prod(q)
    if len(q) == 5:  # packed QKV
        b, s = q[0], q[1]
        q_elements, kv_len = b * s * q[2] * q[4], s
    elif len(q) == 3:
        b, s = q[0], q[1]
        q_elements = math.prod(q)
        if k is not None and len(k) == 3:
            kv_len = k[1]
        elif k is not None and len(k) == 4:
            kv_len = k[2]
        elif k is not None and len(k) == 5:  # packed KV [B, L, N, 2, H]
            kv_len = k[1]
        else:
            kv_len = s
        past = _known(n.inp(6))  # past_key [B, N, P, H]
        if past is not None and len(past) == 4 and k is not None and len(k) == 3:
            kv_len += past[2]
    else:
        return None
    bias = (_known(n.inp(3)) or (0,))[0] * b * s if n.has_input(3) else 0
    return bias + _attention_core(n, q_elements, out, b * heads * s, kv_len)


def _gqa(n: _Node) -> int | None:
    """com.microsoft GroupQueryAttention: query [B, S, D] (packed with K and V when key is
    absent); the total length comes from present_key [B, kv_heads, T, H] when known."""
    q = _known(n.inp(0))
    heads, kv_heads = n.attr_int("num_heads", 0), n.attr_int("kv_num_heads", 0)
    if q is None or len(q) != 3 or heads <= 0:
        return None
    b, s, width = q
    out = n.n_out(0)
    if out is None:  # no ONNX shape inference for contrib ops: the output is [B, S, N·H]
        k = _known(n.inp(1))
        if k is not None and len(k) == 3 and kv_heads > 0:
            head_size = k[2] // kv_heads
        else:  # packed: the query's width is (N + 2·kv_N)·H
            head_size = width // (heads + 2 * max(kv_heads, 0))
        out = b * s * heads * head_size
    present = _known(n.out(1))
    past = _known(n.inp(3))
    if present is not None and len(present) == 4:
        kv_len = present[2]
    else:
        kv_len = s + (past[2] if past is not None and len(past) == 4 else 0)
    # The query part of a packed input is as wide as the output.
    return _attention_core(n, out, out, b * heads * s, kv_len)


def _onnx_attention(n: _Node) -> int | None:
    """ONNX Attention (opset 23): Q [B, qN, S, H] or [B, S, qN·H], K and V likewise over L keys,
    plus past_key [B, kvN, P, H]."""
    q, k = _known(n.inp(0)), _known(n.inp(1))
    out = n.n_out(0)
    if q is None or k is None or out is None or len(q) not in (3, 4) or len(q) != len(k):
        return None
    if len(q) == 4:
        rows, kv_len = q[0] * q[1] * q[2], k[2]
    else:
        heads = n.attr_int("q_num_heads", 0)
        if heads <= 0:
            return None
        rows, kv_len = q[0] * heads * q[1], k[1]
    past = _known(n.inp(4))
    if past is not None and len(past) == 4:
        kv_len += past[2]
    return _attention_core(n, math.prod(q), out, rows, kv_len)


# -- windows ----------------------------------------------------------------------------------


def _pool(n: _Node) -> int | None:
    kernel = n.attr_ints("kernel_shape")
    out = n.n_out(0)
    if not kernel or out is None:
        return None
    return out * math.prod(kernel)


def _resize(n: _Node) -> int | None:
    """Output elements × taps: 1 (nearest), 2 (linear) or 4 (cubic) per resized axis."""
    out = n.n_out(0)
    if out is None:
        return None
    mode = n.attr_str("mode", "nearest")
    per_axis = {"nearest": 1, "linear": 2, "bilinear": 2, "cubic": 4}.get(mode, 2)
    x, y = n.inp(0), n.out(0)
    if x is not None and y is not None and len(x) == len(y):
        resized = sum(1 for a, b in zip(x, y, strict=True) if a is None or b is None or a != b)
    else:
        resized = 2  # the two spatial axes of an image
    return out * math.prod([per_axis] * resized)


def _roi_align(n: _Node) -> int | None:
    out = n.n_out(0)
    if out is None:
        return None
    ratio = n.attr_int("sampling_ratio", 0) or 2  # 0: adaptive, about 2 per bin side in practice
    return out * ratio * ratio * 4 * 2  # 4 bilinear taps, a multiply-add each


def _lrn(n: _Node) -> int | None:
    size = n.attr_int("size", 1)
    # A sum of `size` squares, then (bias + α/size·sum)^β and a division per element.
    return n.in_elements(0) * (2 * size + TRANSCENDENTAL + 2)


def _topk(n: _Node) -> int | None:
    """A partial sort: input elements × log2(k), with k read from the output along the axis."""
    x, y = n.inp(0), n.out(0)
    total = n.in_elements(0)
    axis = n.attr_int("axis", -1)
    k = None
    if x is not None and y is not None and len(y) == len(x) and -len(y) <= axis < len(y):
        k = y[axis]
    return total * max(1, math.ceil(math.log2((k or 2) + 1)))


def _control_flow(n: _Node) -> int:
    """If, Loop, Scan: the nodes of the body (If: the larger branch). A Loop's trip count is not
    known before it runs, so one iteration is counted; a Scan's sequence length where known."""
    bodies: list[int] = []
    for a in n.node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            inner: dict[str, onnx.ValueInfoProto] = dict(n.shapes)
            for vi in [*g.input, *g.value_info, *g.output]:
                inner.setdefault(vi.name, vi)
            bodies.append(sum(node_flops(m, inner) for m in g.node))
    body = max(bodies, default=1) if n.node.op_type == "If" else sum(bodies)
    if n.node.op_type == "Scan":
        x = n.inp(len(n.node.input) - max(1, n.attr_int("num_scan_inputs", 1)))  # the first scan input
        axes = n.attr_ints("scan_input_axes") or (0,)
        if x is not None and x and -len(x) <= axes[0] < len(x) and x[axes[0]]:
            body *= x[axes[0]] or 1
    return max(body, n.elements())


_RULES: dict[str, Callable[[_Node], int | None]] = {
    "Conv": _conv(1, 2),
    "FusedConv": _conv(1, 2),
    "NhwcFusedConv": _conv(1, 2),
    "ConvInteger": _conv(1, None),
    "QLinearConv": _conv(3, 8),  # x, x_scale, x_zero_point, w, ...
    "DeformConv": _deform_conv,
    "ConvTranspose": _conv_transpose,
    "MatMul": _matmul(0, 1),
    "Gemm": _matmul(0, 1),
    "FusedMatMul": _matmul(0, 1),
    "FusedGemm": _matmul(0, 1),
    "MatMulInteger": _matmul(0, 1),
    "MatMulIntegerToFloat": _matmul(0, 1),
    "DynamicQuantizeMatMul": _matmul(0, 1),
    "QLinearMatMul": _matmul(0, 3),  # a, a_scale, a_zero_point, b, ...
    "QGemm": _matmul(0, 3),
    "MatMulNBits": _matmul_nbits,
    "Einsum": _einsum,
    "RNN": _recurrent,
    "GRU": _recurrent,
    "LSTM": _recurrent,
    "Attention": lambda n: _ms_attention(n) if n.node.domain == "com.microsoft" else _onnx_attention(n),
    "MultiHeadAttention": _ms_mha,
    "GroupQueryAttention": _gqa,
    **dict.fromkeys(_POOLS, _pool),
    "Resize": _resize,
    "Upsample": _resize,
    "RoiAlign": _roi_align,
    "LRN": _lrn,
    "TopK": _topk,
}
