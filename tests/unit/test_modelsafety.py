"""Model safety (verimesh/jobs/modelsafety.py): verimesh executes only self-contained, deterministic
models on its allow-list, of a bounded size, and refuses the rest naming the node or tensor."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from verimesh.errors import InvalidInputError, UnsafeModelError
from verimesh.jobs.modelsafety import CONTRIB_OPERATORS, STANDARD_OPERATORS, check_model_bytes
from verimesh.jobs.runtime import StepRunner

ROOT = Path(__file__).resolve().parents[2]


def model(
    nodes: list[onnx.NodeProto],
    *,
    inits: tuple[onnx.TensorProto, ...] = (),
    opsets: dict[str, int] | None = None,
    inputs: tuple[str, ...] = ("x",),
    functions: tuple[onnx.FunctionProto, ...] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in inputs],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        initializer=list(inits),
    )
    imports = [helper.make_opsetid(d, v) for d, v in {"": 17, **(opsets or {})}.items()]
    return helper.make_model(graph, opset_imports=imports, functions=list(functions))


def external(name: str, location: str = "node.key") -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.zeros((2, 4), np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "32")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def refused(m: onnx.ModelProto, *fragments: str) -> str:
    with pytest.raises(UnsafeModelError) as info:
        check_model_bytes(m.SerializeToString(), what="model")
    message = info.value.one_line()
    assert info.value.exit_code == 3 and "unsafe-model" in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_the_fixtures_pass() -> None:
    for name in ("mlp", "rescnn", "transformer"):
        summary = check_model_bytes((ROOT / "fixtures" / f"{name}.onnx").read_bytes(), what=name)
        assert summary.nodes > 0 and ("", "Gemm") in summary.operators


def test_external_initializer_is_refused_naming_the_tensor() -> None:
    m = model([helper.make_node("Add", ["x", "W"], ["y"])], inits=(external("W"),))
    refused(m, "tensor 'W'", "external data", "node.key")


def test_external_data_in_an_attribute_tensor_is_refused() -> None:
    const = helper.make_node("Constant", [], ["c"], value=external("stolen"))
    refused(model([const, helper.make_node("Add", ["x", "c"], ["y"])]), "tensor 'stolen'")


def test_external_data_inside_a_subgraph_is_refused() -> None:
    branch = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["b"])], "then", [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])], initializer=[external("W")],
    )  # fmt: skip
    out = helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 4])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [out])
    cond = numpy_helper.from_array(np.array(True), "cond")
    m = model([helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)], inits=(cond,))
    refused(m, "tensor 'W'", "If")


def test_external_data_in_a_function_body_is_refused() -> None:
    body = [helper.make_node("Constant", [], ["c"], value=external("F")), helper.make_node("Add", ["a", "c"], ["b"])]
    fn = helper.make_function("my.fns", "AddSecret", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    m = model([helper.make_node("AddSecret", ["x"], ["y"], domain="my.fns")], opsets={"my.fns": 1}, functions=(fn,))
    refused(m, "tensor 'F'")


def test_sparse_initializers_are_walked() -> None:
    m = model([helper.make_node("Add", ["x", "S"], ["y"])])
    sparse = m.graph.sparse_initializer.add()
    sparse.values.CopyFrom(external("S"))
    sparse.indices.CopyFrom(numpy_helper.from_array(np.array([0], np.int64), "idx"))
    sparse.dims.extend([2, 4])
    refused(m, "tensor 'S'")


@pytest.mark.parametrize(
    "node",
    [
        helper.make_node("RandomNormalLike", ["x"], ["y"], name="noise"),
        helper.make_node("RandomUniformLike", ["x"], ["y"], name="noise"),
        helper.make_node("RandomNormal", [], ["y"], name="noise", shape=[2, 4]),
        helper.make_node("RandomUniform", [], ["y"], name="noise", shape=[2, 4]),
        helper.make_node("Bernoulli", ["x"], ["y"], name="noise"),
        helper.make_node("Multinomial", ["x"], ["y"], name="noise"),
    ],
    ids=lambda n: n.op_type,
)
def test_random_operators_are_refused(node: onnx.NodeProto) -> None:
    refused(model([node]), "node 'noise'", node.op_type, "non-deterministic")


def test_dropout_in_training_mode_is_refused_and_in_eval_mode_allowed() -> None:
    ratio = numpy_helper.from_array(np.array(0.5, np.float32), "ratio")
    mode = helper.make_tensor_value_info("training", TensorProto.BOOL, [])
    m = model([helper.make_node("Dropout", ["x", "ratio", "training"], ["y"], name="drop")], inits=(ratio,))
    m.graph.input.append(mode)
    refused(m, "Dropout", "training_mode")
    check_model_bytes(model([helper.make_node("Dropout", ["x"], ["y"])]).SerializeToString(), what="eval")


def test_a_random_op_hidden_in_a_local_function_is_refused() -> None:
    body = [helper.make_node("RandomNormalLike", ["a"], ["b"], name="inner")]
    fn = helper.make_function("my.fns", "Noisy", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    m = model([helper.make_node("Noisy", ["x"], ["y"], domain="my.fns")], opsets={"my.fns": 1}, functions=(fn,))
    refused(m, "node 'inner'", "function my.fns:Noisy")


def test_a_local_function_of_allowed_ops_is_allowed() -> None:
    body = [helper.make_node("Relu", ["a"], ["b"])]
    fn = helper.make_function("my.fns", "MyRelu", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    m = model([helper.make_node("MyRelu", ["x"], ["y"], domain="my.fns")], opsets={"my.fns": 1}, functions=(fn,))
    assert ("my.fns", "MyRelu") in check_model_bytes(m.SerializeToString(), what="m").operators


def test_custom_domains_and_unlisted_contrib_ops_are_refused() -> None:
    custom = model([helper.make_node("ReadFile", ["x"], ["y"], domain="evil.ops", name="rf")], opsets={"evil.ops": 1})
    refused(custom, "node 'rf'", "evil.ops:ReadFile", "allow-list")
    contrib = model([helper.make_node("Rfft", ["x"], ["y"], domain="com.microsoft")], opsets={"com.microsoft": 1})
    refused(contrib, "com.microsoft:Rfft")
    refused(model([helper.make_node("ImageDecoder", ["x"], ["y"])]), "ImageDecoder")


def test_the_size_bound_is_applied_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERIMESH_MAX_MODEL_BYTES", "100")
    data = (ROOT / "fixtures" / "mlp.onnx").read_bytes()
    with pytest.raises(UnsafeModelError, match="over the 100-byte model limit"):
        check_model_bytes(data, what="mlp")
    monkeypatch.setenv("VERIMESH_MAX_MODEL_BYTES", "lots")
    with pytest.raises(InvalidInputError, match="VERIMESH_MAX_MODEL_BYTES"):
        check_model_bytes(data, what="mlp")


def test_garbage_and_deep_nesting_are_invalid_input_not_a_crash() -> None:
    with pytest.raises(InvalidInputError):
        check_model_bytes(b"\xff" * 64, what="garbage")

    # 300 nested If subgraphs, written as raw protobuf (onnx's own helpers refuse to build it):
    # beyond protobuf's recursion limit, refused as malformed.
    def field(number: int, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload

    graph = field(1, field(4, b"Identity"))  # Graph.node = Node{op_type}
    for _ in range(300):
        attribute = field(1, b"then_branch") + field(6, graph)  # Attribute{name, g}
        graph = field(1, field(4, b"If") + field(5, attribute))  # Graph.node = Node{op_type, attribute}
    with pytest.raises(InvalidInputError):
        check_model_bytes(field(7, graph), what="deep")  # Model.graph


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_the_standard_allow_list_is_the_deterministic_part_of_the_standard_domain() -> None:
    standard = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx")}
    refused_on_purpose = {
        "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial",
        "ImageDecoder", "RegexFullMatch",
    }  # fmt: skip
    assert standard - STANDARD_OPERATORS == refused_on_purpose
    assert STANDARD_OPERATORS <= standard


def _contrib_case(op: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    gamma = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "gamma")
    beta = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "beta")
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    ms = "com.microsoft"
    nodes = {
        "FastGelu": helper.make_node("FastGelu", ["x"], ["y"], domain=ms),
        "Gelu": helper.make_node("Gelu", ["x"], ["y"], domain=ms),
        "QuickGelu": helper.make_node("QuickGelu", ["x"], ["y"], domain=ms, alpha=1.702),
        "FusedMatMul": helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain=ms, alpha=0.5),
        "SkipLayerNormalization": helper.make_node(
            "SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"], domain=ms, epsilon=1e-5
        ),
        "SkipSimplifiedLayerNormalization": helper.make_node(
            "SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["y"], domain=ms, epsilon=1e-5
        ),
        "SimplifiedLayerNormalization": helper.make_node(
            "SimplifiedLayerNormalization", ["x", "gamma"], ["y"], axis=-1, epsilon=1e-5
        ),
    }
    node = nodes[op]
    feeds = {"x": x}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])]
    if "skip" in node.input:
        feeds["skip"] = rng.standard_normal((2, 3, 8)).astype(np.float32)
        inputs.append(helper.make_tensor_value_info("skip", TensorProto.FLOAT, [2, 3, 8]))
    used = {"gamma": gamma, "beta": beta, "w": w}
    graph = helper.make_graph(
        [node], "contrib", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[t for name, t in used.items() if name in node.input],
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)])
    return m, feeds


@pytest.mark.parametrize("op", sorted(op for _, op in CONTRIB_OPERATORS))
def test_each_allowed_contrib_op_passes_and_is_deterministic(op: str) -> None:
    """Added deliberately: it runs on onnxruntime's CPU provider and gives bit-identical outputs at
    every optimization level and thread count (an honest re-run reproduces it)."""
    m, feeds = _contrib_case(op)
    data = m.SerializeToString()
    assert (m.graph.node[0].domain or "", op) in check_model_bytes(data, what=op).operators
    results = []
    for level, threads in itertools.product(("disable", "basic", "extended", "all"), (1, 2)):
        runner = StepRunner(device="cpu", optimization=level, threads=threads)
        results.append(runner.run(f"{op}-{level}-{threads}", data, feeds, ["y"])["y"])
    assert all(np.array_equal(results[0], r) for r in results[1:])
    assert np.isfinite(results[0]).all()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_the_wire_reader_agrees_with_protobuf(data: st.DataObject) -> None:
    """Differential: on mutations of real models (and of models with external data), whatever
    protobuf's parser (through onnx; onnxruntime parses with protobuf too) reads as a model, the
    wire reader sees the same operators and external-data tensors in, or refuses. Bytes protobuf
    refuses no runtime will load, so the reader may read them any way."""
    import onnx

    seeds = [(ROOT / "fixtures" / f"{n}.onnx").read_bytes() for n in ("mlp", "transformer")]
    seeds.append(model([helper.make_node("Add", ["x", "W"], ["y"])], inits=(external("W"),)).SerializeToString())
    blob = bytearray(data.draw(st.sampled_from(seeds)))
    for _ in range(data.draw(st.integers(0, 3))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(blob) - 1))
        if action == "flip":
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del blob[at : at + data.draw(st.integers(1, 16))]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    raw = bytes(blob)
    try:
        reference = onnx.load_model_from_string(raw)
    except Exception:  # noqa: BLE001 - any protobuf parse failure: the wire reader must refuse too
        reference = None
    try:
        ours = check_model_bytes(raw, what="m")
    except UnsafeModelError:
        ours = "unsafe"
    except InvalidInputError:
        ours = None
    if reference is None:
        return
    if ours is None:
        return  # protobuf is laxer on a few encodings (wire-type mixups); refusing is the safe side
    ops = {(n.domain if n.domain not in ("", "ai.onnx") else "", n.op_type) for n in _all_nodes(reference.graph)}
    external_data = any(t.data_location == TensorProto.EXTERNAL or t.external_data for t in _all_tensors(reference))
    if ours == "unsafe":
        return
    assert not external_data
    assert ops <= ours.operators


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                out.extend(_all_nodes(g))
    return out


def _all_tensors(m: onnx.ModelProto) -> list[onnx.TensorProto]:
    out = list(m.graph.initializer)
    for node in _all_nodes(m.graph):
        for attr in node.attribute:
            out.extend(([attr.t] if attr.HasField("t") else []) + list(attr.tensors))
    return out
