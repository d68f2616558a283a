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
from functools import cache
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


# -- a subset of onnx.proto (same field numbers), parsed by protobuf's own parser -----------------


def _schema() -> Any:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    opt, rep = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    M, S, I64, I32 = f.TYPE_MESSAGE, f.TYPE_STRING, f.TYPE_INT64, f.TYPE_INT32
    messages: dict[str, list[tuple[str, int, int, int, str | None]]] = {
        "Model": [
            ("ir_version", 1, I64, opt, None),
            ("opset_import", 8, M, rep, "OpsetId"),
            ("graph", 7, M, opt, "Graph"),
            ("training_info", 20, M, rep, "Training"),
            ("functions", 25, M, rep, "Function"),
        ],
        "OpsetId": [
            ("domain", 1, S, opt, None),
            ("version", 2, I64, opt, None),
        ],
        "Training": [
            ("initialization", 1, M, opt, "Graph"),
            ("algorithm", 2, M, opt, "Graph"),
        ],
        "Graph": [
            ("node", 1, M, rep, "Node"),
            ("name", 2, S, opt, None),
            ("initializer", 5, M, rep, "Tensor"),
            ("sparse_initializer", 15, M, rep, "Sparse"),
        ],
        "Node": [
            ("input", 1, S, rep, None),
            ("output", 2, S, rep, None),
            ("name", 3, S, opt, None),
            ("op_type", 4, S, opt, None),
            ("attribute", 5, M, rep, "Attribute"),
            ("domain", 7, S, opt, None),
        ],
        "Attribute": [
            ("name", 1, S, opt, None),
            ("t", 5, M, opt, "Tensor"),
            ("g", 6, M, opt, "Graph"),
            ("tensors", 10, M, rep, "Tensor"),
            ("graphs", 11, M, rep, "Graph"),
            ("sparse_tensor", 22, M, opt, "Sparse"),
            ("sparse_tensors", 23, M, rep, "Sparse"),
        ],
        "Tensor": [
            ("name", 8, S, opt, None),
            ("external_data", 13, M, rep, "Entry"),
            ("data_location", 14, I32, opt, None),
        ],
        "Entry": [
            ("key", 1, S, opt, None),
            ("value", 2, S, opt, None),
        ],
        "Sparse": [
            ("values", 1, M, opt, "Tensor"),
            ("indices", 2, M, opt, "Tensor"),
        ],
        "Function": [
            ("name", 1, S, opt, None),
            ("node", 7, M, rep, "Node"),
            ("domain", 10, S, opt, None),
        ],
    }
    package = "verimesh.onnxsubset"
    proto = descriptor_pb2.FileDescriptorProto(name="verimesh/onnxsubset.proto", package=package, syntax="proto2")
    for name, fields in messages.items():
        message = proto.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".{package}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.Model"))


_model_class = cache(_schema)


def _parse(data: bytes, what: str) -> Any:
    from google.protobuf.message import DecodeError

    model = _model_class()()
    try:
        model.ParseFromString(data)
    except DecodeError as exc:  # malformed, or nested beyond protobuf's recursion limit
        raise InvalidInputError(f"{what} is not an ONNX model ({exc})") from exc
    return model


def _sparse_parts(sparse: Any) -> Iterator[Any]:
    yield sparse.values
    yield sparse.indices


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
        yield from _graph_items(info.initialization, "training initialization")
        yield from _graph_items(info.algorithm, "training algorithm")
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
