"""The cost formulas of verimesh/jobs/costs.py on small models, shape-inferred as the planner does.

A node's cost is its FLOPs plus MEMORY per tensor element it reads or writes; the tests check
both parts (``node_work``) against numbers written out from the formulas, so a change to a
formula shows here as a changed number, not as a vaguely larger or smaller cost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from verimesh.jobs.costs import MEMORY, TRANSCENDENTAL, Work, node_flops, node_work
from verimesh.jobs.plan import _light_copy, _value_infos, plan_model

FLOAT = TensorProto.FLOAT
SOFTMAX = 4 + TRANSCENDENTAL  # per score: max, subtract, exp, sum, divide


def model_of(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, Sequence[int | str]],
    outputs: Sequence[str],
    *,
    inits: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
    types: Mapping[str, int] | None = None,
    ms: bool = False,
) -> onnx.ModelProto:
    types = types or {}
    graph = helper.make_graph(
        list(nodes),
        "costs",
        [helper.make_tensor_value_info(n, types.get(n, FLOAT), list(d)) for n, d in inputs.items()],
        [helper.make_tensor_value_info(n, types.get(n, FLOAT), None) for n in outputs],
        initializer=list(inits),
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def works(model: onnx.ModelProto) -> list[Work]:
    """Each node's work with the planner's shapes (model inputs concrete, symbolic dims 1)."""
    shapes = _value_infos(_light_copy(model, {}))
    return [node_work(node, shapes) for node in model.graph.node]


def flops(model: onnx.ModelProto) -> list[int]:
    return [w.flops for w in works(model)]


def one(
    node: onnx.NodeProto,
    inputs: Mapping[str, Sequence[int | str]],
    *,
    inits: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
    types: Mapping[str, int] | None = None,
    ms: bool = False,
) -> Work:
    model = model_of([node], inputs, list(node.output[:1]), inits=inits, opset=opset, types=types, ms=ms)
    return works(model)[0]


def weight(name: str, shape: Sequence[int], dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.zeros(shape, dtype), name)


def test_cost_is_flops_plus_memory_traffic() -> None:
    # Add over [2, 8, 16]: one FLOP per output, two inputs read and one output written.
    model = model_of([helper.make_node("Add", ["x", "y"], ["z"])], {"x": [2, 8, 16], "y": [2, 8, 16]}, ["z"])
    shapes = _value_infos(_light_copy(model, {}))
    assert works(model) == [Work(256, 3 * 256)]
    assert node_flops(model.graph.node[0], shapes) == 256 + MEMORY * 768 == Work(256, 768).cost
    assert Work(0, 0).cost == 1  # never 0: the planner and the sampler need every cost ≥ 1


# -- convolutions ------------------------------------------------------------------------------


def test_conv_with_bias() -> None:
    # out [1, 4, 8, 8] = 256 elements, each a dot product of 3·3·3; + the bias add. Traffic: the
    # input (192), the weights (108) and bias (4), read once, and the output (256).
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])
    m = model_of([node], {"x": [1, 3, 8, 8]}, ["y"], inits=[weight("w", [4, 3, 3, 3]), weight("b", [4])])
    assert works(m) == [Work(2 * 256 * 27 + 256, 192 + 108 + 4 + 256)]


def test_grouped_strided_conv() -> None:
    # 4 channels in 2 groups (W [8, 2, 3, 3]), stride 2: out [1, 8, 3, 3] = 72, 2·3·3 per output.
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=2, strides=[2, 2], pads=[1, 1, 1, 1])
    m = model_of([node], {"x": [1, 4, 6, 6]}, ["y"], inits=[weight("w", [8, 2, 3, 3])])
    assert flops(m) == [2 * 72 * 18]


def test_conv_transpose_with_groups_and_strides() -> None:
    # W [C_in 4, M/group 3, 3, 3], group 2: 6 output channels, out [1, 6, 11, 11]. Every input
    # element (100) meets M/group·k·k = 27 weights; the bias adds one per output (726).
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], group=2, strides=[2, 2])
    m = model_of([node], {"x": [1, 4, 5, 5]}, ["y"], inits=[weight("w", [4, 3, 3, 3]), weight("b", [6])])
    shapes = _value_infos(_light_copy(m, {}))
    assert [d.dim_value for d in shapes["y"].type.tensor_type.shape.dim] == [1, 6, 11, 11]
    assert works(m) == [Work(2 * 100 * 27 + 6 * 121, 100 + 108 + 6 + 726)]


def test_qlinear_conv_reads_the_weight_at_input_3() -> None:
    u8 = TensorProto.UINT8
    scalars = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in [
        ("xs", 0.1, np.float32), ("xz", 0, np.uint8), ("ws", 0.1, np.float32), ("wz", 0, np.uint8),
        ("ys", 0.1, np.float32), ("yz", 0, np.uint8)]]  # fmt: skip
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], pads=[1, 1, 1, 1])
    m = model_of([node], {"x": [1, 3, 8, 8]}, ["y"], inits=[*scalars, weight("w", [4, 3, 3, 3], np.uint8)],
                 types={"x": int(u8), "y": int(u8)})  # fmt: skip
    assert flops(m) == [2 * 256 * 27]


def test_fused_conv_without_inferred_shapes() -> None:
    # com.microsoft FusedConv has no ONNX shape inference: the output comes from the attributes.
    node = helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft", strides=[2, 2], pads=[1, 1, 1, 1],
                            kernel_shape=[3, 3], activation="Relu")  # fmt: skip
    m = model_of([node], {"x": [1, 3, 8, 8]}, ["y"], inits=[weight("w", [4, 3, 3, 3])], ms=True)
    assert flops(m) == [2 * (4 * 4 * 4) * 27]


# -- matrix products ---------------------------------------------------------------------------


def test_matmul_and_gemm() -> None:
    mm = helper.make_node("MatMul", ["a", "b"], ["y"])
    assert one(mm, {"a": [2, 3, 4], "b": [4, 5]}) == Work(2 * (2 * 3 * 5) * 4, 24 + 20 + 30)
    # transA: A is [K 4, M 3]; + beta·C, one add per output.
    gemm = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=1)
    assert one(gemm, {"a": [4, 3], "b": [4, 5], "c": [5]}).flops == 2 * 15 * 4 + 15
    fused = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain="com.microsoft", transB=1)
    assert one(fused, {"a": [2, 3, 4], "b": [5, 4]}, ms=True).flops == 2 * (2 * 3 * 5) * 4


def test_einsum_contractions() -> None:
    def einsum(eq: str, inputs: Mapping[str, Sequence[int]]) -> int:
        return one(helper.make_node("Einsum", list(inputs), ["y"], equation=eq), inputs).flops

    # Two operands: 2 × the product of every distinct index size.
    assert einsum("bij,bjk->bik", {"a": [2, 3, 4], "b": [2, 4, 5]}) == 2 * 2 * 3 * 4 * 5
    assert einsum("bhqd, bhkd -> bhqk", {"q": [2, 4, 8, 16], "k": [2, 4, 12, 16]}) == 2 * 2 * 4 * 8 * 12 * 16
    assert einsum("...ij,...jk->...ik", {"a": [2, 3, 4], "b": [4, 5]}) == 2 * 2 * 3 * 4 * 5
    assert einsum("ij,jk", {"a": [3, 4], "b": [4, 5]}) == 2 * 3 * 4 * 5  # implicit output
    # Three operands, pairwise left to right: (ij,jk) over i,j,k, then (ik,kl) over i,k,l.
    assert einsum("ij,jk,kl->il", {"a": [2, 3], "b": [3, 4], "c": [4, 5]}) == 2 * 2 * 3 * 4 + 2 * 2 * 4 * 5
    # One operand (transpose, reduction): the elements read.
    assert einsum("ij->ji", {"a": [3, 4]}) == 12
    assert einsum("bij->b", {"a": [2, 3, 4]}) == 24


# -- recurrent ---------------------------------------------------------------------------------


def step_flops(hidden: int, features: int, gates: int, extra: int) -> int:
    """Per time step, batch row and direction: gate matmuls on x and h, biases, activations, the rest."""
    gh = gates * hidden
    return 2 * gh * (features + hidden) + 2 * gh + gh * TRANSCENDENTAL + extra * hidden


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_lstm_and_gru(direction: str) -> None:
    dirs = 2 if direction == "bidirectional" else 1
    seq, batch, features, hidden = 10, 2, 16, 32
    x = {"x": [seq, batch, features]}
    lstm = helper.make_node("LSTM", ["x", "w", "r", "b"], ["y"], hidden_size=hidden, direction=direction)
    w, r = weight("w", [dirs, 4 * hidden, features]), weight("r", [dirs, 4 * hidden, hidden])
    m = model_of([lstm], x, ["y"], inits=[w, r, weight("b", [dirs, 8 * hidden])])
    # Per step: 4 gate matmuls on x (2·128·16) and on h (2·128·32), the biases (2·128), the gate
    # activations (128·16) and the cell update (c = f·c + i·g, h = o·tanh(c): (4 + 16)·32).
    per_step = 2 * 128 * 16 + 2 * 128 * 32 + 2 * 128 + 128 * 16 + 20 * 32
    assert per_step == step_flops(hidden, features, 4, 4 + TRANSCENDENTAL) == 15232
    # Traffic: X, W, R, B and Y once, and R again at every time step (shared by the batch rows).
    io = 320 + dirs * (2048 + 4096 + 256) + seq * dirs * batch * hidden
    assert works(m) == [Work(per_step * seq * batch * dirs, io + seq * dirs * 4096)]
    gru = helper.make_node("GRU", ["x", "w", "r"], ["y"], hidden_size=hidden, direction=direction, layout=0)
    m = model_of([gru], x, ["y"], inits=[weight("w", [dirs, 3 * hidden, features]),
                 weight("r", [dirs, 3 * hidden, hidden])])  # fmt: skip
    assert flops(m) == [step_flops(hidden, features, 3, 5) * seq * batch * dirs]


def test_rnn_batch_first_layout() -> None:
    # layout 1: X is [batch, seq, features].
    rnn = helper.make_node("RNN", ["x", "w", "r"], ["y"], hidden_size=8, layout=1)
    m = model_of([rnn], {"x": [3, 5, 4]}, ["y"], inits=[weight("w", [1, 8, 4]), weight("r", [1, 8, 8])], opset=14)
    assert flops(m) == [(2 * 8 * (4 + 8) + 2 * 8 + 8 * TRANSCENDENTAL) * 5 * 3]


def recurrent_model() -> onnx.ModelProto:
    """An LSTM and a GRU over 50 steps between a small projection and a small head: the shape
    of a speech model, where the recurrent nodes hold nearly all the work."""
    seq, feat, hidden = 50, 20, 64
    nodes = [
        helper.make_node("MatMul", ["x", "proj"], ["p"]),
        helper.make_node("Relu", ["p"], ["pr"]),
        helper.make_node("LSTM", ["pr", "lw", "lr", "lb"], ["ly"], hidden_size=hidden),
        helper.make_node("Squeeze", ["ly", "axis1"], ["ls"]),
        helper.make_node("GRU", ["ls", "gw", "gr"], ["gy"], hidden_size=hidden),
        helper.make_node("Squeeze", ["gy", "axis1"], ["gs"]),
        helper.make_node("MatMul", ["gs", "head"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    inits = [
        weight("proj", [feat, hidden]), weight("lw", [1, 4 * hidden, hidden]), weight("lr", [1, 4 * hidden, hidden]),
        weight("lb", [1, 8 * hidden]), weight("gw", [1, 3 * hidden, hidden]), weight("gr", [1, 3 * hidden, hidden]),
        weight("head", [hidden, 10]), numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]  # fmt: skip
    return model_of(nodes, {"x": [seq, 1, feat]}, ["probs"], inits=inits)


def test_recurrent_nodes_dominate_the_plan() -> None:
    model = recurrent_model()
    per_node = [w.cost for w in works(model)]
    lstm_flops = 50 * step_flops(64, 64, 4, 4 + TRANSCENDENTAL)
    gru_flops = 50 * step_flops(64, 64, 3, 5)
    assert flops(model) == [2 * 50 * 64 * 20, 50 * 64, lstm_flops, 0, gru_flops, 0, 2 * 50 * 10 * 64, SOFTMAX * 500]
    assert per_node[3] == per_node[5] == 1  # Squeeze: a view
    lstm, gru = per_node[2], per_node[4]
    assert (lstm + gru) / sum(per_node) > 0.95
    # The audit finding: costed by its output elements (3,200), the LSTM was sampled like a
    # Reshape. With two steps the cut falls between the LSTM and the GRU (either side of the
    # Squeeze), so each step is sampled by its recurrent node's share.
    plan = plan_model(model, steps=2)
    cut = plan.steps[1].first_node
    assert cut in (3, 4)
    assert [s.cost for s in plan.steps] == [sum(per_node[:cut]), sum(per_node[cut:])]
    assert plan.steps[0].cost / plan.total_cost > lstm / sum(per_node) > 0.5


# -- attention ---------------------------------------------------------------------------------

# B 2, 4 heads of 16, 8 queries over 12 keys: QKᵀ 2·(2·8·64)·12, softmax over 2·4·8 rows of 12
# scores, scores × V 2·(2·8·64)·12. The scores are written, read and written, and read again.
ATTENTION_CORE = 2 * 1024 * 12 + SOFTMAX * 64 * 12 + 2 * 1024 * 12
SCORES_MOVED = 4 * 64 * 12


def test_onnx_attention_4d_and_3d() -> None:
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"])
    work = one(node, {"q": [2, 4, 8, 16], "k": [2, 4, 12, 16], "v": [2, 4, 12, 16]}, opset=23)
    assert work == Work(ATTENTION_CORE, 1024 + 1536 + 1536 + 1024 + SCORES_MOVED)
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=4, kv_num_heads=4)
    assert one(node, {"q": [2, 8, 64], "k": [2, 12, 64], "v": [2, 12, 64]}, opset=23).flops == ATTENTION_CORE


def test_microsoft_multi_head_and_group_query_attention() -> None:
    mha = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=4)
    assert one(mha, {"q": [2, 8, 64], "k": [2, 12, 64], "v": [2, 12, 64]}, ms=True).flops == ATTENTION_CORE
    # 4 query heads over 2 key/value heads of 16, 8 new tokens after 4 cached ones: 12 keys.
    gqa = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total"], ["y"],
                           domain="com.microsoft", num_heads=4, kv_num_heads=2)  # fmt: skip
    inputs = {"q": [2, 8, 64], "k": [2, 8, 32], "v": [2, 8, 32], "pk": [2, 2, 4, 16],
                                              "pv": [2, 2, 4, 16], "seqlens": [2], "total": [1]}  # fmt: skip
    types = {"seqlens": int(TensorProto.INT32), "total": int(TensorProto.INT32)}
    assert one(gqa, inputs, ms=True, types=types).flops == ATTENTION_CORE


def test_microsoft_attention_includes_the_qkv_projection() -> None:
    # input [2, 8, 32] × weights [32, 3·64] (+ bias), then 4 heads of 16 over the 8 tokens.
    node = helper.make_node("Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=4)
    m = model_of([node], {"x": [2, 8, 32]}, ["y"], inits=[weight("w", [32, 192]), weight("b", [192])], ms=True)
    projection = 2 * (2 * 8) * 32 * 192 + 2 * 8 * 192
    assert flops(m) == [projection + 2 * 1024 * 8 + SOFTMAX * 64 * 8 + 2 * 1024 * 8]


# -- windows, normalisations, reductions --------------------------------------------------------


def test_pooling() -> None:
    x = {"x": [1, 2, 8, 8]}  # 128 elements
    maxpool = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    assert one(maxpool, x) == Work(32 * 9, 128 + 32)  # out [1, 2, 4, 4]
    assert one(helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2]), x).flops == 32 * 4
    assert one(helper.make_node("LpPool", ["x"], ["y"], kernel_shape=[3, 3]), x).flops == 72 * 9  # out [1, 2, 6, 6]
    assert one(helper.make_node("GlobalAveragePool", ["x"], ["y"]), x).flops == 128
    assert one(helper.make_node("GlobalMaxPool", ["x"], ["y"]), x).flops == 128


def test_normalisations_and_softmax() -> None:
    x = {"x": [2, 8, 16]}  # 256 elements
    ln = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)
    m = model_of([ln], x, ["y"], inits=[weight("g", [16]), weight("b", [16])])
    # Two passes over the input (statistics, then the normalisation), the scale and shift, the output.
    assert works(m) == [Work(5 * 256, 2 * 256 + 32 + 256)]
    assert one(helper.make_node("Softmax", ["x"], ["y"], axis=-1), x) == Work(SOFTMAX * 256, 3 * 256)
    assert one(helper.make_node("LogSoftmax", ["x"], ["y"], axis=-1), x).flops == SOFTMAX * 256
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])
    m = model_of([bn], {"x": [1, 2, 8, 8]}, ["y"], inits=[weight(n, [2]) for n in "sbmv"])
    assert flops(m) == [2 * 128]
    lrn = helper.make_node("LRN", ["x"], ["y"], size=3)
    assert one(lrn, {"x": [1, 2, 8, 8]}).flops == 128 * (2 * 3 + TRANSCENDENTAL + 2)
    skip = helper.make_node("SkipLayerNormalization", ["x", "s", "g"], ["y"], domain="com.microsoft")
    assert one(skip, {"x": [2, 8, 16], "s": [2, 8, 16], "g": [16]}, ms=True).flops == 6 * 256


@pytest.mark.parametrize(("mode", "taps"), [("nearest", 1), ("linear", 4), ("cubic", 16)])
def test_resize(mode: str, taps: int) -> None:
    # [1, 2, 4, 4] → [1, 2, 8, 8]: 128 outputs, taps per resized axis (2 axes).
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode=mode)
    m = model_of([node], {"x": [1, 2, 4, 4]}, ["y"], inits=[scales])
    assert flops(m) == [128 * taps]


def test_reductions_topk_cumsum() -> None:
    x = {"x": [4, 32]}  # 128 elements
    assert one(helper.make_node("ReduceMean", ["x"], ["y"], axes=[1]), x, opset=17) == Work(128, 128 + 4)
    assert one(helper.make_node("ReduceSumSquare", ["x"], ["y"], axes=[1]), x, opset=17).flops == 2 * 128
    assert one(helper.make_node("ArgMax", ["x"], ["y"], axis=1), x).flops == 128
    axis = numpy_helper.from_array(np.array(1, np.int64), "axis")
    assert flops(model_of([helper.make_node("CumSum", ["x", "axis"], ["y"])], x, ["y"], inits=[axis])) == [128]
    # TopK k = 5: a partial sort, log2(k + 1) rounded up = 3 comparisons per element.
    k = numpy_helper.from_array(np.array([5], np.int64), "k")
    m = model_of([helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=1)], x, ["values"], inits=[k])
    assert works(m) == [Work(128 * 3, 128 + 1 + 20 + 20)]  # reads x and k, writes values and indices


# -- elementwise and data movement ------------------------------------------------------------


def test_elementwise_and_data_movement() -> None:
    x = {"x": [2, 8, 16]}  # 256 elements
    assert one(helper.make_node("Tanh", ["x"], ["y"]), x) == Work(TRANSCENDENTAL * 256, 512)
    assert one(helper.make_node("Sum", ["x", "x", "x"], ["y"]), x) == Work(2 * 256, 4 * 256)
    # Data movement: no arithmetic, only traffic.
    assert one(helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 1]), x) == Work(0, 512)
    assert one(helper.make_node("Concat", ["x", "x"], ["y"], axis=1), x) == Work(0, 256 + 256 + 512)
    # Pure views touch no element: cost 1.
    shape = numpy_helper.from_array(np.array([16, 16], np.int64), "shape")
    m = model_of([helper.make_node("Reshape", ["x", "shape"], ["y"])], x, ["y"], inits=[shape])
    assert works(m) == [Work(0, 0)] and works(m)[0].cost == 1
    assert one(helper.make_node("Identity", ["x"], ["y"]), x).cost == 1
    # An embedding lookup reads the rows it outputs ([2, 8] ids × 16 features), not the table.
    gather = helper.make_node("Gather", ["table", "ids"], ["y"])
    int64 = int(TensorProto.INT64)
    m = model_of([gather], {"ids": [2, 8]}, ["y"], inits=[weight("table", [100, 16])], types={"ids": int64})
    assert works(m) == [Work(0, 2 * 256 + 16)]
    # ScatterND copies the data, then writes each update.
    scatter = helper.make_node("ScatterND", ["d", "i", "u"], ["y"])
    assert one(scatter, {"d": [8, 16], "i": [3, 1], "u": [3, 16]}, types={"i": int64}) == Work(0, 128 + 3 + 48 + 128)


def test_unknown_shapes_fall_back_but_never_to_zero() -> None:
    # A custom op: its output has no inferred shape, so its largest known input stands in.
    custom = helper.make_node("Mystery", ["x"], ["y"], domain="example.ops")
    m = model_of([custom], {"x": [4, 4]}, ["y"])
    m.opset_import.append(helper.make_opsetid("example.ops", 1))
    assert works(m) == [Work(16, 16 + 16)]
    # Nothing known at all (no shapes): one element's worth, never 0.
    for op, expected in (("MatMul", 1), ("Conv", 1), ("LSTM", 1), ("Einsum", 1), ("Add", 1), ("Softmax", SOFTMAX)):
        assert node_work(helper.make_node(op, ["a", "b"], ["c"]), {}) == Work(expected, 1)
    # Symbolic dims are 1 in the planner's shapes; a zero-size tensor still costs 1.
    assert one(helper.make_node("MatMul", ["a", "b"], ["y"]), {"a": ["n", 4], "b": [4, 5]}).flops == 2 * 5 * 4
    assert one(helper.make_node("Relu", ["x"], ["y"]), {"x": [0, 4]}).cost == 1
