"""Step planning: cut an ONNX model into self-contained step sub-models (docs/design.md §3).

Nodes are taken in topological order and a step is a contiguous run of them. At a cut, the
boundary is the set of tensors produced before it (graph inputs included) and still needed after
it; initializers and Constant nodes are not boundary tensors, each step carries its own copy.
Cut points are chosen near the cost-balanced targets (estimated FLOPs), preferring the cut with
the fewest boundary bytes inside a window around each target. Models with control flow
(subgraph attributes) or untyped intermediate tensors that cannot be cut run as one step, whose
step file is then the model file itself.

Trace order (the order of the commitment's leaves): the model inputs in model order, then each
step's outputs in order. Each tensor appears once, however many cuts it crosses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, shape_inference

from verimesh.core.digest import format_digest
from verimesh.core.files import read_user_file
from verimesh.core.tensors import ONNX_TO_DTYPE, Dim, TensorSpec
from verimesh.errors import InvalidInputError
from verimesh.jobs.costs import node_flops, numel
from verimesh.jobs.modelsafety import check_model_bytes, max_model_bytes
from verimesh.jobs.sensitivity import decisions, near_decision, sign_sensitive
from verimesh.jobs.tolerance import Tolerance

# Automatic step count: more steps make each spot check cheaper (a verifier re-runs a smaller
# share) and cost the worker more boundary tensors to hash. Large models get 16, small ones 8.
MAX_AUTO_STEPS = 8
MAX_AUTO_STEPS_LARGE = 16
LARGE_MODEL_FLOPS = 1e9
_WINDOW = 0.25  # fraction of a step's target cost within which the smallest boundary wins


@dataclass(frozen=True)
class Step:
    index: int
    first_node: int
    node_count: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    cost: int
    boundary_bytes: int


@dataclass(frozen=True)
class StepPlan:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    steps: tuple[Step, ...]
    whole_model: bool  # True: one step whose file is the model itself
    # Boundary tensors a later step divides by (their zeros keep their sign in comparisons).
    sign_sensitive: tuple[str, ...] = ()
    # Cuts left out because a boundary value sat near a later operator's decision point.
    hazard_cuts: int = 0
    # What a user should know about the plan: control flow made it one step, or fewer steps than
    # asked for were possible (the CLI prints them as notes).
    notes: tuple[str, ...] = ()

    @property
    def trace_names(self) -> tuple[str, ...]:
        names = [s.name for s in self.inputs]
        for step in self.steps:
            names.extend(step.outputs)
        return tuple(names)

    @property
    def total_cost(self) -> int:
        return sum(s.cost for s in self.steps)


@dataclass(frozen=True)
class PlannedModel:
    """A plan together with the serialized step models, ready to be written or run."""

    plan: StepPlan
    step_bytes: tuple[bytes, ...]

    @property
    def step_digests(self) -> tuple[str, ...]:
        return tuple(format_digest(hashlib.sha256(b).digest()) for b in self.step_bytes)


def load_model(path: Path) -> tuple[onnx.ModelProto, bytes]:
    """Read and check an ONNX file; the bytes are returned too, since they are what is digested."""
    data = read_user_file(path, what="model file", max_bytes=max_model_bytes())
    return parse_model(data, what=f"model {path}"), data


def parse_model(data: bytes, *, what: str) -> onnx.ModelProto:
    """Check that the model is one verimesh will run (modelsafety), then parse and check it."""
    from google.protobuf.message import DecodeError

    check_model_bytes(data, what=what)
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(f"{what} is not an ONNX model ({type(exc).__name__})") from exc
    if not model.graph.node:
        raise InvalidInputError(f"{what} is not an ONNX model (no graph nodes)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise InvalidInputError(f"{what} fails the ONNX checker: {first}") from exc
    return model


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError):
        inferred = model
    out: dict[str, onnx.ValueInfoProto] = {}
    for t in inferred.graph.initializer:
        out[t.name] = helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = vi
    return out


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    dtype = ONNX_TO_DTYPE.get(tt.elem_type)
    if dtype is None:
        raise InvalidInputError(
            f"tensor {vi.name!r} has ONNX type {onnx.TensorProto.DataType.Name(tt.elem_type)}, "
            "which verimesh cannot commit to"
        )
    if not tt.HasField("shape"):
        return TensorSpec(vi.name, dtype, None)
    dims: list[Dim] = []
    for d in tt.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return TensorSpec(vi.name, dtype, tuple(dims))


def model_io(model: onnx.ModelProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    init = {t.name for t in model.graph.initializer}
    inputs = tuple(_spec(vi) for vi in model.graph.input if vi.name not in init)
    outputs = tuple(_spec(vi) for vi in model.graph.output)
    return inputs, outputs


def _light_copy(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A copy for shape inference without large initializer data (their dims stay known as typed
    inputs; small ones, such as Reshape targets, are kept for data propagation). With ``shapes``,
    model inputs get concrete dims (symbolic ones become 1), for cost estimates."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.node.extend(model.graph.node)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    init_names = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        new = g.input.add()
        new.CopyFrom(vi)
        if shapes is None or vi.name in init_names or not vi.type.HasField("tensor_type"):
            continue
        concrete = shapes.get(vi.name)
        for i, d in enumerate(new.type.tensor_type.shape.dim):
            if concrete is not None and i < len(concrete):
                d.Clear()
                d.dim_value = concrete[i]
            elif not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    declared = {vi.name for vi in g.input}
    for t in model.graph.initializer:
        if int(np.prod(t.dims)) <= 4096:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _float_ancestors(
    start: set[str],
    compute: Sequence[onnx.NodeProto],
    producer: Mapping[str, int],
    free: frozenset[str],
    types: Mapping[str, onnx.ValueInfoProto],
    deciding: set[int],
) -> set[str]:
    """The float tensors produced by compute nodes that ``start`` is computed from, through nodes
    that are not themselves decisions."""
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
    seen: set[str] = set()
    stack = list(start)
    while stack:
        name = stack.pop()
        index = producer.get(name, -1)
        if name in seen or name in free or index < 0:
            continue
        if name not in types or types[name].type.tensor_type.elem_type not in float_types:
            continue
        seen.add(name)
        if index not in deciding:
            stack.extend(i for i in compute[index].input if i)
    return seen


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(_node_has_subgraph(node) for node in model.graph.node)


def _topological(model: onnx.ModelProto, available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in a topological order: the file's own order when it is one (the ONNX rule), else Kahn's."""
    nodes = list(model.graph.node)
    have = set(available)
    pending = nodes
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i == "" or i in have for i in node.input):
                ordered.append(node)
                have.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i and i not in have})[:3]
            raise InvalidInputError(f"model graph has a cycle or inputs nothing produces: {missing}")
        pending = rest
    return ordered


@dataclass(frozen=True)
class _Split:
    """Compute nodes in topological order, and the constant-only nodes every step may carry."""

    compute: tuple[onnx.NodeProto, ...]
    free_names: frozenset[str]  # initializers and outputs of constant-only nodes
    free_nodes: tuple[onnx.NodeProto, ...]  # constant-only nodes, topological order


def _split(model: onnx.ModelProto, graph_inputs: Sequence[str]) -> _Split:
    """Constant nodes, and nodes whose inputs are all initializers or constants (torch's Identity
    over a shared weight, a Transpose of a weight), are not work to check: each step that needs
    their outputs carries its own copy, so they never become boundary tensors."""
    init_names = {t.name for t in model.graph.initializer}
    free = set(init_names)
    free_nodes: list[onnx.NodeProto] = []
    compute: list[onnx.NodeProto] = []
    for node in _topological(model, set(graph_inputs) | init_names):
        standard = node.domain in ("", "ai.onnx")
        is_constant = node.op_type == "Constant" and not node.input
        inputs = [i for i in node.input if i]
        if standard and (is_constant or (inputs and all(i in free for i in inputs))) and not _node_has_subgraph(node):
            free.update(o for o in node.output if o)
            free_nodes.append(node)
        else:
            compute.append(node)
    return _Split(tuple(compute), frozenset(free), tuple(free_nodes))


def _node_has_subgraph(node: onnx.NodeProto) -> bool:
    return any(at.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for at in node.attribute)


def plan_model(
    model: onnx.ModelProto,
    *,
    steps: int | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
    tolerance: Tolerance | None = None,
) -> StepPlan:
    """Choose the step plan. ``steps=None`` picks 8 steps (16 from 1 GFLOP up), fewer when the
    model has fewer places to cut; 1 means no cut.

    ``reference`` (the values of ``decision_inputs`` on the job's input) and ``tolerance``: no
    cut is placed between a tensor and a later operator whose decision a within-tolerance move of
    that tensor could flip (jobs/sensitivity.py); without them only the graph decides."""
    if steps is not None and steps < 1:
        raise InvalidInputError("--steps must be at least 1")
    inputs, outputs = model_io(model)
    graph_inputs = [s.name for s in inputs]
    split = _split(model, graph_inputs)
    compute, free = split.compute, split.free_names
    n = len(compute)
    types = _value_infos(_light_copy(model))
    sized = _value_infos(_light_copy(model, input_shapes or {}))
    costs = [node_flops(node, sized) for node in compute]

    def whole(note: str = "", hazard_cuts: int = 0) -> StepPlan:
        step = Step(0, 0, n, tuple(graph_inputs), tuple(s.name for s in outputs), sum(costs), 0)
        return StepPlan(inputs, outputs, (step,), True, hazard_cuts=hazard_cuts, notes=(note,) if note else ())

    if n == 0:
        raise InvalidInputError("model has no compute nodes to run")
    if _has_subgraphs(model):
        return whole(
            "the model has control flow (a node with a subgraph: If, Loop or Scan), so it is one step: "
            "every check re-runs the whole model"
        )
    if steps is not None and steps == 1:
        return whole()

    # Live ranges: tensor t is live at cut c (between node c-1 and c) when producer(t) < c <= last_use(t).
    producer = {name: -1 for name in graph_inputs}
    last_use: dict[str, int] = {}
    for i, node in enumerate(compute):
        for name in node.input:
            if name and name not in free:
                last_use[name] = i
        for name in node.output:
            if name:
                producer[name] = i
    for spec in outputs:
        last_use[spec.name] = n
    live_bytes = np.zeros(n + 2, dtype=np.int64)
    blocked = np.zeros(n + 2, dtype=np.int64)  # cuts where a live tensor has no known dtype
    for name, p in producer.items():
        u = last_use.get(name)
        if u is None or u <= p:
            continue
        vi = sized.get(name)
        nbytes = (
            (numel(vi) or 1024) * np.dtype(ONNX_TO_DTYPE.get(vi.type.tensor_type.elem_type, "float32")).itemsize
            if vi
            else 4096
        )
        live_bytes[p + 1] += nbytes
        live_bytes[u + 1] -= nbytes
        if name not in types or types[name].type.tensor_type.elem_type not in ONNX_TO_DTYPE:
            blocked[p + 1] += 1
            blocked[u + 1] -= 1
    live = np.cumsum(live_bytes)
    cuttable = np.cumsum(blocked) == 0
    candidates = [c for c in range(1, n) if cuttable[c]]
    hazards: list[tuple[int, int]] = []  # (producer, consumer): no cut in between
    if reference is not None and tolerance is not None:
        found = decisions(compute, types)
        deciding = {d.index for d in found}
        for decision in found:
            movable = {name for name in decision.inputs if producer.get(name, -1) >= 0 and name not in free}
            if not movable or not near_decision(decision, reference, movable, tolerance):
                continue
            # A nudge anywhere upstream of the deciding value moves it too: no cut may separate
            # the decision from any float tensor it is computed from (back to the exact input,
            # constants, or an earlier decision, whose discrete output is compared exactly).
            for name in _float_ancestors(movable, compute, producer, free, types, deciding):
                hazards.append((producer[name], min(last_use.get(name, decision.index), decision.index)))
    before = len(candidates)
    candidates = [c for c in candidates if not any(p < c <= q for p, q in hazards)]
    hazard_cuts = before - len(candidates)
    auto = MAX_AUTO_STEPS_LARGE if sum(costs) >= LARGE_MODEL_FLOPS else MAX_AUTO_STEPS
    wanted = min(auto, n) if steps is None else steps
    left_out = f"; {hazard_cuts} cuts were left out next to decision points (cut safety)" if hazard_cuts else ""
    if wanted > len(candidates) + 1:
        if steps is not None and steps > 1 and not candidates:
            return whole(f"--steps {steps}: the model has no place to cut, so it is one step{left_out}", hazard_cuts)
        wanted = len(candidates) + 1
    if wanted <= 1:
        return whole(hazard_cuts=hazard_cuts)
    prefix = np.concatenate([[0], np.cumsum(costs)])
    total = float(prefix[-1]) or 1.0
    cuts: list[int] = []
    for j in range(1, wanted):
        target = total * j / wanted
        window = _WINDOW * total / wanted
        lo = cuts[-1] if cuts else 0
        remaining = wanted - j  # steps still to place after this cut
        pool = [c for c in candidates if c > lo and sum(1 for d in candidates if d > c) >= remaining - 1]
        if not pool:
            break
        near = [c for c in pool if abs(prefix[c] - target) <= window]
        if near:
            best = min(near, key=lambda c: (int(live[c]), abs(float(prefix[c]) - target), c))
        else:
            best = min(pool, key=lambda c: (abs(float(prefix[c]) - target), int(live[c]), c))
        cuts.append(best)
    bounds = [0, *cuts, n]
    plan_steps: list[Step] = []
    for k in range(len(bounds) - 1):
        a, b = bounds[k], bounds[k + 1]
        produced_here: set[str] = set()
        step_inputs: list[str] = []
        for node in compute[a:b]:
            for name in node.input:
                if name and name not in free and name not in produced_here and name not in step_inputs:
                    step_inputs.append(name)
            produced_here.update(o for o in node.output if o)
        step_outputs = [o for node in compute[a:b] for o in node.output if o and last_use.get(o, -1) >= b]
        plan_steps.append(
            Step(
                k,
                a,
                b - a,
                tuple(step_inputs),
                tuple(step_outputs),
                int(prefix[b] - prefix[a]),
                int(live[b]) if b < n else 0,
            )
        )
    # Graph outputs that are graph inputs (pass-through) need no step; everything else is produced.
    divided: list[str] = []  # boundary tensors a later step reads where the sign of a zero matters
    for step in plan_steps[:-1]:
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in compute[step.first_node + step.node_count :]:
            for name in node.input:
                if name in step.outputs:
                    consumers.setdefault(name, []).append(node)
        divided.extend(sign_sensitive(consumers, step.outputs))
    notes: tuple[str, ...] = ()
    if steps is not None and len(plan_steps) < steps:
        notes = (f"--steps {steps}: the model can be cut into {len(plan_steps)} steps{left_out}",)
    return StepPlan(inputs, outputs, tuple(plan_steps), False, tuple(sorted(set(divided))), hazard_cuts, notes)


def decision_inputs(model: onnx.ModelProto) -> list[str]:
    """The tensors whose values the cut-safety check needs (inputs of deciding nodes)."""
    inputs, _ = model_io(model)
    split = _split(model, [s.name for s in inputs])
    types = _value_infos(_light_copy(model))
    names = [name for d in decisions(split.compute, types) for name in d.node.input if name]
    return list(dict.fromkeys(names))


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> tuple[bytes, list[str]]:
    """The model with ``names`` as extra graph outputs (those computed inside the graph whose type
    is known), serialized, and the names it added."""
    types = _value_infos(_light_copy(model))
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {o.name for o in extended.graph.output} | {i.name for i in extended.graph.input}
    present |= {t.name for t in extended.graph.initializer}
    added = []
    for name in names:
        if name not in present and name in types:
            extended.graph.output.append(_io_info(name, types))
            present.add(name)
            added.append(name)
    return bytes(extended.SerializeToString()), added


def initializer_values(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    wanted = set(names)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}


def build_step_models(model: onnx.ModelProto, model_bytes: bytes, plan: StepPlan) -> PlannedModel:
    """Serialize each step as a self-contained model (deterministic bytes for a given input)."""
    if plan.whole_model:
        return PlannedModel(plan, (model_bytes,))
    init = {t.name: t for t in model.graph.initializer}
    split = _split(model, [s.name for s in plan.inputs])
    compute = split.compute
    producer_of = {o: node for node in split.free_nodes for o in node.output if o}
    types = _value_infos(_light_copy(model))
    blobs = []
    for step in plan.steps:
        nodes = compute[step.first_node : step.first_node + step.node_count]
        # The constant-only nodes this step needs, transitively, kept in topological order.
        needed: set[int] = set()
        stack = [name for node in nodes for name in node.input if name in producer_of]
        while stack:
            node = producer_of[stack.pop()]
            if id(node) not in needed:
                needed.add(id(node))
                stack.extend(i for i in node.input if i in producer_of)
        const_nodes = [node for node in split.free_nodes if id(node) in needed]
        used = {name for node in [*const_nodes, *nodes] for name in node.input if name}
        graph = helper.make_graph(
            [*const_nodes, *nodes],
            f"verimesh_step_{step.index}",
            [_io_info(name, types) for name in step.inputs],
            [_io_info(name, types) for name in step.outputs],
            initializer=[init[name] for name in sorted(used & set(init))],
        )
        sub = helper.make_model(
            graph,
            opset_imports=list(model.opset_import),
            ir_version=model.ir_version,
            producer_name="verimesh-step",
            functions=list(model.functions),
        )
        blobs.append(sub.SerializeToString(deterministic=True))
    return PlannedModel(plan, tuple(blobs))


def _io_info(name: str, types: Mapping[str, onnx.ValueInfoProto]) -> onnx.ValueInfoProto:
    vi = types.get(name)
    if vi is None:
        raise InvalidInputError(f"tensor {name!r} at a step boundary has no known type")
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    return out


def plan_and_build(
    model_path: Path,
    *,
    steps: int | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[PlannedModel, str]:
    """Load, plan and build; returns the planned model and the model digest."""
    model, data = load_model(model_path)
    plan = plan_model(model, steps=steps, input_shapes=input_shapes)
    digest = format_digest(hashlib.sha256(data).digest())
    return build_step_models(model, data, plan), digest


def describe_steps(planned: PlannedModel) -> list[dict[str, Any]]:
    return [
        {
            "index": s.index,
            "nodes": s.node_count,
            "cost": s.cost,
            "inputs": list(s.inputs),
            "outputs": list(s.outputs),
            "boundary_bytes": s.boundary_bytes,
            "digest": d,
        }
        for s, d in zip(planned.plan.steps, planned.step_digests, strict=True)
    ]
