"""What verimesh executes: self-contained, deterministic ONNX models of a bounded size.

A job owner chooses the models a worker runs, so a model is hostile input (docs/design.md §7):

- **External data.** onnxruntime resolves a tensor stored as external data relative to the
  process's working directory, so a model could read any file the worker can (its key beside
  it) and have the bytes committed into the bundle. Any tensor anywhere (initializers, sparse
  initializers, attribute tensors, subgraphs, functions, training graphs) stored outside the
  file is refused.
- **Operators.** Only an allow-list runs: the deterministic operators of the standard ONNX
  domain, and onnxruntime contrib operators (``com.microsoft``) added one by one with a test.
  Random operators (RandomNormal/Uniform(Like), Bernoulli, Multinomial) and Dropout in training
  mode are refused: a job built on one lets its owner get an honest node's re-run "disproved".
  Calls to functions the model defines itself are allowed; their bodies are checked.
- **Size.** Models above ``max_bytes`` (default 2 GiB) are refused before they are parsed.

The check parses only the fields it needs with protobuf's own parser (a schema subset with
the field numbers of onnx.proto), so the verify path does not import onnx. Refusals name the
node or tensor: ``error[unsafe-model]``, exit 3.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from verimesh.errors import InvalidInputError, UnsafeModelError

DEFAULT_MAX_MODEL_BYTES = 2 * 1024**3
MAX_MODEL_BYTES_ENV = "VERIMESH_MAX_MODEL_BYTES"

# Every operator of the standard domain (onnx 1.23 schemas), less the random ones and the
# decoders of untrusted bytes (ImageDecoder; RegexFullMatch can be made to backtrack for ever).
STANDARD_OPERATORS = frozenset(
    """
    Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BitCast BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Cast CastLike
    CausalConvWithState Ceil Celu CenterCropPad Clip Col2Im Compress Concat ConcatFromSequence Constant
    ConstantOfShape Conv ConvInteger ConvTranspose Cos Cosh CumProd CumSum DFT DeformConv DepthToSpace
    DequantizeLinear Det Div Dropout DynamicQuantizeLinear Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
    GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity
    If InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual LinearAttention
    Log LogSoftmax Loop LpNormalization LpPool MatMul MatMulInteger Max MaxPool MaxRoiPool MaxUnpool Mean
    MeanVarianceNormalization MelWeightMatrix Min Mish Mod Mul Neg NegativeLogLikelihoodLoss NonMaxSuppression
    NonZero Not OneHot Optional OptionalGetElement OptionalHasElement Or PRelu Pad Pow QLinearConv QLinearMatMul
    QuantizeLinear RMSNormalization RNN Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RoiAlign RotaryEmbedding Round STFT Scan Scatter ScatterElements ScatterND Selu SequenceAt SequenceConstruct
    SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap Shape Shrink Sigmoid Sign Sin Sinh
    Size Slice Softmax SoftmaxCrossEntropyLoss Softplus Softsign SpaceToDepth Split SplitToSequence Sqrt Squeeze
    StringConcat StringNormalizer StringSplit Sub Sum SwiGLU Swish Tan Tanh TensorScatter TfIdfVectorizer
    ThresholdedRelu Tile TopK Transpose Trilu Unique Unsqueeze Upsample Where Xor
    """.split()
)
NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"}
)
# onnxruntime contrib operators, each deterministic on the CPU provider and covered by a test
# (tests/unit/test_modelsafety.py runs it at every optimization level and thread count).
CONTRIB_OPERATORS: frozenset[tuple[str, str]] = frozenset(
    {
        ("com.microsoft", "FastGelu"),
        ("com.microsoft", "FusedMatMul"),
        ("com.microsoft", "Gelu"),
        ("com.microsoft", "QuickGelu"),
        ("com.microsoft", "SkipLayerNormalization"),
        ("com.microsoft", "SkipSimplifiedLayerNormalization"),
        # onnxruntime registers this contrib op in the standard domain
        ("", "SimplifiedLayerNormalization"),
    }
)
_STANDARD_DOMAINS = ("", "ai.onnx")
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def max_model_bytes() -> int:
    """The size bound: ``$VERIMESH_MAX_MODEL_BYTES`` when set, else 2 GiB."""
    raw = os.environ.get(MAX_MODEL_BYTES_ENV)
    if raw is None:
        return DEFAULT_MAX_MODEL_BYTES
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidInputError(f"{MAX_MODEL_BYTES_ENV} must be a number of bytes, got {raw!r}") from exc
    if value <= 0:
        raise InvalidInputError(f"{MAX_MODEL_BYTES_ENV} must be positive")
    return value


@dataclass(frozen=True)
class ModelSummary:
    """What the check saw: the operators by (domain, op_type), node and tensor counts."""

    operators: frozenset[tuple[str, str]]
    nodes: int
    tensors: int


# -- a subset of onnx.proto, read from the protobuf wire format ------------------------------------
#
# protobuf's own Python package costs about 40 ms to import, a fifth of the verify path's start-up
# budget, so the few fields the check needs are read here from the wire format (field numbers as in
# onnx.proto; every other field is skipped by its length). The reading follows protobuf's rules
# where they matter for safety: a message field that occurs twice is merged (its repeated fields
# concatenate), and nesting deeper than protobuf's own limit of 100 is refused. A differential
# test (tests/unit/test_modelsafety.py) compares it with protobuf on random mutations of models.

_MAX_DEPTH = 100
# message -> field number -> (field name, kind, message type, repeated)
_FIELDS: dict[str, dict[int, tuple[str, str, str, bool]]] = {
    "Model": {7: ("graph", "msg", "Graph", False), 20: ("training_info", "msg", "Training", True),
              25: ("functions", "msg", "Function", True)},
    "Training": {1: ("initialization", "msg", "Graph", False), 2: ("algorithm", "msg", "Graph", False)},
    "Graph": {1: ("node", "msg", "Node", True), 5: ("initializer", "msg", "Tensor", True),
              15: ("sparse_initializer", "msg", "Sparse", True)},
    "Node": {1: ("input", "str", "", True), 2: ("output", "str", "", True), 3: ("name", "str", "", False),
             4: ("op_type", "str", "", False), 5: ("attribute", "msg", "Attribute", True),
             7: ("domain", "str", "", False)},
    "Attribute": {1: ("name", "str", "", False), 5: ("t", "msg", "Tensor", False), 6: ("g", "msg", "Graph", False),
                  10: ("tensors", "msg", "Tensor", True), 11: ("graphs", "msg", "Graph", True),
                  22: ("sparse_tensor", "msg", "Sparse", False), 23: ("sparse_tensors", "msg", "Sparse", True)},
    "Tensor": {8: ("name", "str", "", False), 13: ("external_data", "msg", "Entry", True),
               14: ("data_location", "int", "", False)},
    "Entry": {1: ("key", "str", "", False), 2: ("value", "str", "", False)},
    "Sparse": {1: ("values", "msg", "Tensor", False), 2: ("indices", "msg", "Tensor", False)},
    "Function": {1: ("name", "str", "", False), 7: ("node", "msg", "Node", True), 10: ("domain", "str", "", False)},
}  # fmt: skip


class _Message:
    """A decoded message of the subset: its fields as attributes, with protobuf's defaults."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._present: set[str] = set()
        for name, field_kind, _, repeated in _FIELDS[kind].values():
            setattr(self, name, [] if repeated else (0 if field_kind == "int" else "" if field_kind == "str" else None))

    def HasField(self, name: str) -> bool:
        return name in self._present


class _Malformed(ValueError):
    pass


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _decode(kind: str, data: memoryview, depth: int, into: _Message | None = None) -> _Message:
    if depth > _MAX_DEPTH:
        raise _Malformed(f"nested deeper than {_MAX_DEPTH}")
    message = into or _Message(kind)
    fields = _FIELDS[kind]
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if not 0 < number < 1 << 29 or key >> 32:  # protobuf's own bounds on a field key
            raise _Malformed(f"field number {number} out of range")
        if wire == 0:
            value, pos = _varint(data, pos)
            payload = None
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            value, payload = 0, None
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise _Malformed("length runs past the end")
            value, payload = 0, data[pos : pos + length]
            pos += length
        else:
            raise _Malformed(f"wire type {wire} (groups are not used by ONNX)")
        if pos > len(data):
            raise _Malformed("truncated field")
        spec = fields.get(number)
        if spec is None:
            continue
        name, field_kind, sub, repeated = spec
        if (field_kind == "int") != (wire == 0) or (field_kind != "int" and wire != 2):
            raise _Malformed(f"field {kind}.{name} has wire type {wire}")
        if field_kind == "int":
            item: Any = value
        elif field_kind == "str":
            assert payload is not None
            item = bytes(payload).decode("utf-8", "replace")
        else:
            assert payload is not None
            existing = None if repeated else getattr(message, name)
            item = _decode(sub, payload, depth + 1, existing)  # a message field seen twice is merged
        if repeated:
            getattr(message, name).append(item)
        else:
            setattr(message, name, item)
            message._present.add(name)
    return message


def _parse(data: bytes, what: str) -> Any:
    try:
        model = _decode("Model", memoryview(data), 0)
    except (_Malformed, RecursionError) as exc:
        raise InvalidInputError(f"{what} is not an ONNX model ({exc})") from exc
    if getattr(model, "graph", None) is None:
        setattr(model, "graph", _Message("Graph"))  # noqa: B010 - fields are set by name
    return model


def _sparse_parts(sparse: Any) -> Iterator[Any]:
    yield from (part for part in (sparse.values, sparse.indices) if part is not None)


def _node_items(node: Any, where: str) -> Iterator[tuple[str, Any, str]]:
    """The node, the tensors in its attributes, and everything inside its subgraphs."""
    yield "node", node, where
    for attr in node.attribute:
        if attr.HasField("t"):
            yield "tensor", attr.t, where
        for tensor in attr.tensors:
            yield "tensor", tensor, where
        for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
            for tensor in _sparse_parts(sparse):
                yield "tensor", tensor, where
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            yield from _graph_items(graph, f"{where} > {node.op_type} {_node_name(node)}.{attr.name}")


def _graph_items(graph: Any, where: str) -> Iterator[tuple[str, Any, str]]:
    for tensor in graph.initializer:
        yield "tensor", tensor, where
    for sparse in graph.sparse_initializer:
        for tensor in _sparse_parts(sparse):
            yield "tensor", tensor, where
    for node in graph.node:
        yield from _node_items(node, where)


def _model_items(model: Any) -> Iterator[tuple[str, Any, str]]:
    """Every node and tensor of the model: main graph, training graphs, function bodies."""
    yield from _graph_items(model.graph, "graph")
    for info in model.training_info:
        for graph, where in ((info.initialization, "training initialization"), (info.algorithm, "training algorithm")):
            if graph is not None:
                yield from _graph_items(graph, where)
    for function in model.functions:
        for node in function.node:
            yield from _node_items(node, f"function {function.domain}:{function.name}")


def _node_name(node: Any) -> str:
    return repr(node.name) if node.name else (f"producing {node.output[0]!r}" if node.output else "(unnamed)")


def _check_operator(node: Any, key: tuple[str, str], label: str) -> None:
    domain, op = key
    if domain == "" and op in NONDETERMINISTIC:
        raise UnsafeModelError(
            f"{label} is {op}, a non-deterministic operator: an honest re-run could not reproduce it",
            hint="export the model in inference mode, without random operators",
        )
    if domain == "" and op == "Dropout" and len(node.input) > 2 and node.input[2]:
        raise UnsafeModelError(
            f"{label} is Dropout with a training_mode input: in training mode it is random",
            hint="export the model in eval mode (Dropout becomes the identity)",
        )
    if key in CONTRIB_OPERATORS or (domain == "" and op in STANDARD_OPERATORS):
        return
    shown = f"{node.domain}:{op}" if node.domain else op
    raise UnsafeModelError(
        f"{label} uses operator {shown}, which is not on verimesh's allow-list",
        hint="verimesh runs the deterministic standard ONNX operators and a few named onnxruntime contrib ops",
    )


def check_model_bytes(data: bytes | memoryview, *, what: str, max_bytes: int | None = None) -> ModelSummary:
    """Refuse (UnsafeModelError, exit 3) what verimesh will not execute; see the module docstring."""
    limit = max_model_bytes() if max_bytes is None else max_bytes
    if len(data) > limit:
        raise UnsafeModelError(
            f"{what} is {len(data)} bytes, over the {limit}-byte model limit",
            hint=f"raise the limit with {MAX_MODEL_BYTES_ENV} if this model is expected",
        )
    model = _parse(bytes(data), what)
    local_functions = {(f.domain, f.name) for f in model.functions}
    operators: set[tuple[str, str]] = set()
    nodes = tensors = 0
    for kind, item, where in _model_items(model):
        if kind == "tensor":
            tensors += 1
            if item.data_location == _EXTERNAL or len(item.external_data):
                location = next((e.value for e in item.external_data if e.key == "location"), "?")
                raise UnsafeModelError(
                    f"{what}: tensor {item.name!r} ({where}) is stored as external data ({location!r}); "
                    "verimesh runs only self-contained models",
                    hint="save the weights inside the model file (onnx.save with save_as_external_data=False)",
                )
            continue
        nodes += 1
        domain = "" if item.domain in _STANDARD_DOMAINS else item.domain
        key = (domain, item.op_type)
        operators.add(key)
        if (item.domain, item.op_type) in local_functions:
            continue  # a call to a function the model defines: its body is walked too
        _check_operator(item, key, f"{what}: node {_node_name(item)} ({where})")
    return ModelSummary(frozenset(operators), nodes, tensors)
