"""The planner on graphs torch rarely exports: branches, concat, several inputs and outputs,
Constant/ConstantOfShape, opsets 9-20, control flow. Chained steps must equal the whole model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import MODELS, control_flow_model, model_path
from verimesh.errors import InvalidInputError
from verimesh.jobs.plan import build_step_models, load_model, parse_model, plan_model


def run_chain(
    model: onnx.ModelProto, steps: int | None, feeds: dict[str, np.ndarray]
) -> tuple[int, dict[str, np.ndarray]]:
    data = model.SerializeToString()
    plan = plan_model(model, steps=steps)
    planned = build_step_models(model, data, plan)
    env = dict(feeds)
    for step, blob in zip(plan.steps, planned.step_bytes, strict=True):
        onnx.checker.check_model(onnx.load_model_from_string(blob))
        sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        env.update(zip(step.outputs, sess.run(list(step.outputs), {n: env[n] for n in step.inputs}), strict=True))
    assert len(set(plan.trace_names)) == len(plan.trace_names)
    return len(plan.steps), {o.name: env[o.name] for o in model.graph.output}


def whole(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in model.graph.output], sess.run(None, feeds), strict=True))


def branchy(opset: int) -> onnx.ModelProto:
    """Two inputs, a diamond, a concat, a residual, a Constant and (opset >= 9) ConstantOfShape, two outputs."""
    w = numpy_helper.from_array(np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4), "w")
    nodes = [
        helper.make_node("MatMul", ["a", "w"], ["m"]),
        helper.make_node("Relu", ["m"], ["left"]),
        helper.make_node("Sigmoid", ["m"], ["right"]),
        helper.make_node("Add", ["left", "b"], ["left2"]),
        helper.make_node("Concat", ["left2", "right"], ["cat"], axis=1),
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Mul", ["cat", "two"], ["scaled"]),
        helper.make_node("Shape", ["a"], ["shape_a"]),
        helper.make_node(
            "ConstantOfShape", ["shape_a"], ["ones"], value=numpy_helper.from_array(np.array([1.0], np.float32))
        ),
        helper.make_node("Add", ["a", "ones"], ["a1"]),
        helper.make_node("Tanh", ["scaled"], ["t"]),
        helper.make_node(
            "ReduceSum" if opset < 13 else "Identity", ["t"], ["out_main"], **({"keepdims": 1} if opset < 13 else {})
        ),
        helper.make_node("Add", ["a1", "left"], ["out_side"]),
    ]
    graph = helper.make_graph(
        nodes,
        "branchy",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4]),
        ],
        [
            helper.make_tensor_value_info("out_main", TensorProto.FLOAT, ["d0", "d1"]),
            helper.make_tensor_value_info("out_side", TensorProto.FLOAT, [2, 4]),
        ],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 15 else 8
    return model


FEEDS = {"a": np.arange(8, dtype=np.float32).reshape(2, 4) / 8, "b": np.ones((2, 4), np.float32)}


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 20])
@pytest.mark.parametrize("steps", [None, 2, 3, 5])
def test_branchy_graph_chains_equal_whole_model(opset: int, steps: int | None) -> None:
    model = branchy(opset)
    onnx.checker.check_model(model)
    count, got = run_chain(model, steps, FEEDS)
    expected = whole(model, FEEDS)
    assert count == (steps or count) and count > 1
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("steps", [None, 2, 4, 1000])
def test_fixture_chains_equal_whole_model(name: str, steps: int | None) -> None:
    model, _ = load_model(model_path(name))
    x = np.load(model_path(name).with_suffix(".input.npy"))
    count, got = run_chain(model, steps, {"input": x})
    np.testing.assert_allclose(got["logits"], whole(model, {"input": x})["logits"], rtol=1e-5, atol=1e-6)
    assert count > 1


def test_constants_never_cross_a_boundary() -> None:
    model = branchy(17)
    plan = plan_model(model, steps=5)
    crossing = {n for s in plan.steps for n in s.inputs}
    assert not crossing & {"two", "ones", "w"}


def test_control_flow_runs_as_one_step() -> None:
    model = control_flow_model()
    plan = plan_model(model, steps=3)
    assert plan.whole_model and len(plan.steps) == 1
    assert len(plan.notes) == 1 and "control flow" in plan.notes[0]  # said, not silent
    planned = build_step_models(model, model.SerializeToString(), plan)
    assert planned.step_bytes == (model.SerializeToString(),)


def test_steps_one_and_too_many() -> None:
    model = branchy(17)
    assert len(plan_model(model, steps=1).steps) == 1 and not plan_model(model, steps=1).notes
    many = plan_model(model, steps=10_000)
    assert len(many.steps) <= len(model.graph.node)
    assert many.notes == (f"--steps 10000: the model can be cut into {len(many.steps)} steps",)
    assert not plan_model(model).notes  # the automatic choice needs no note
    with pytest.raises(InvalidInputError):
        plan_model(model, steps=0)


def test_rejects_non_models() -> None:
    with pytest.raises(InvalidInputError, match="not an ONNX model"):
        parse_model(b"\x08\x07garbage", what="m")
    with pytest.raises(InvalidInputError):
        parse_model(b"", what="m")


def test_plan_is_deterministic() -> None:
    model, data = load_model(model_path("transformer"))
    a = build_step_models(model, data, plan_model(model)).step_digests
    b = build_step_models(model, data, plan_model(model)).step_digests
    assert a == b
