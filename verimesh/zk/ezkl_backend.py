"""Zero-knowledge proofs with ezkl (docs/design.md §5). The only module that imports ezkl.

Circuits are built once by the job owner (``build_circuit``): per step, settings with explicit
visibility (first input public, last output public, boundaries between steps Poseidon-hashed,
parameters fixed into the verifying key; never private), calibration, compilation, setup. A
chain holds because step i+1 is fed step i's output field elements as they are, so the hash
step i outputs is the hash step i+1 takes in. Compiled circuits and proving keys live in the
content-addressed cache. ``prove`` runs witness generation and proving in a worker process
(ezkl holds the GIL) with a timeout; ``verify_proof`` never trusts the bundle's settings, vk or
SRS, and decodes claimed outputs only from ``instances``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verimesh.core.digest import sha256_bytes, sha256_file
from verimesh.core.processes import die_with_parent
from verimesh.errors import BackendUnavailableError, IntegrityError, InvalidInputError, VerimeshError
from verimesh.jobs.circuit import Circuit, CircuitStep, cache_dir, write_circuit
from verimesh.jobs.modelsafety import check_model_bytes

# Operators ezkl cannot prove, or proves wrongly (docs/design.md §5).
UNSUPPORTED_OPS: dict[str, str] = {
    "Mod": "no circuit for Mod",
    "NonZero": "data-dependent output shape",
    "If": "control flow",
    "Loop": "control flow",
    "Scan": "control flow",
    "QLinearConv": "quantized op",
    "QLinearMatMul": "quantized op",
    "ConvInteger": "quantized op",
    "MatMulInteger": "quantized op",
    "DynamicQuantizeLinear": "quantized op",
    "Unique": "data-dependent output shape",
}
TARGETS = ("resources", "accuracy")
DEFAULT_TOLERANCE = 0.05  # relative Frobenius error of ezkl's dequantized output vs onnxruntime's
MAX_SRS_LOGROWS = 26


def ezkl_module() -> Any:
    try:
        import ezkl
    except ImportError as exc:  # pragma: no cover - ezkl is a dependency
        raise BackendUnavailableError("ezkl is not installed", hint="pip install ezkl") from exc
    return ezkl


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """ezkl prints calibration tables on the process's stdout and stderr: keep them off ours
    (errors still reach us as exceptions). ``VERIMESH_VERBOSE=1`` shows them."""
    if os.environ.get("VERIMESH_VERBOSE"):
        yield
        return
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with quiet_output():
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError, OSError, TypeError) as exc:  # ezkl raises plain runtime errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidInputError(f"ezkl {what} failed: {first[:300]}", code="ezkl-failed") from exc


# -- SRS ------------------------------------------------------------------------------------------


def srs_logrows(path: Path) -> int:
    """An SRS file begins with k, the log2 of its rows, as a little-endian u32."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise InvalidInputError(f"cannot read SRS {path}: {exc.strerror}") from exc
    if len(head) != 4 or not 1 <= struct.unpack("<I", head)[0] <= MAX_SRS_LOGROWS:
        raise InvalidInputError(f"{path} is not a KZG SRS file")
    return int(struct.unpack("<I", head)[0])


def new_srs(path: Path, logrows: int) -> str:
    """Generate a local SRS with fresh randomness: for tests and demos only (whoever ran it knows
    the toxic waste). Production uses a ceremony SRS given with --srs. Returns its digest."""
    if not 1 <= logrows <= MAX_SRS_LOGROWS:
        raise InvalidInputError(f"logrows must be 1..{MAX_SRS_LOGROWS}")
    _call("gen_srs", ezkl_module().gen_srs, str(path), logrows)
    return sha256_file(path)


# -- quantization ---------------------------------------------------------------------------------


def quantize(array: np.ndarray, scale: int) -> list[str]:
    """Field elements of a float tensor at ``scale``, exactly as ezkl quantizes its inputs."""
    ezkl = ezkl_module()
    return [ezkl.float_to_felt(float(v), scale) for v in np.asarray(array, dtype=np.float64).reshape(-1)]


def dequantize(felts: Sequence[str], scale: int, shape: Sequence[int]) -> np.ndarray:
    """Float64 values of field elements at ``scale`` (exact: integer / 2^scale)."""
    ezkl = ezkl_module()
    values = np.array([ezkl.felt_to_int(f) for f in felts], dtype=np.float64) / float(2**scale)
    return values.reshape(tuple(shape))


def poseidon(felts: Sequence[str]) -> str:
    return str(ezkl_module().poseidon_hash(list(felts))[0])


def check_supported(model: Any) -> None:
    """Refuse a model ezkl cannot prove, naming the operator and node."""
    import onnx

    def walk(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
        for node in graph.node:
            yield node
            for at in node.attribute:
                if at.type == onnx.AttributeProto.GRAPH:
                    yield from walk(at.g)
                elif at.type == onnx.AttributeProto.GRAPHS:
                    for g in at.graphs:
                        yield from walk(g)

    for node in walk(model.graph):
        reason = UNSUPPORTED_OPS.get(node.op_type)
        if reason is not None:
            raise InvalidInputError(
                f"ezkl cannot prove operator {node.op_type} (node {node.name or node.output[0]!r}): {reason}",
                code="unsupported-operator",
                hint="use --mode spot for this model",
            )
        if node.op_type == "Resize" and any(a.name == "mode" and a.s != b"nearest" for a in node.attribute):
            raise InvalidInputError(
                f"ezkl proves operator Resize (node {node.name!r}) wrongly unless mode is nearest",
                code="unsupported-operator",
                hint="use --mode spot for this model",
            )


# -- cache ----------------------------------------------------------------------------------------


def _cached(kind: str, key: str) -> Path:
    path = cache_dir() / kind / (hashlib.sha256(key.encode()).hexdigest() + ".bin")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def compiled_circuit(model: Path, settings: Path, model_digest: str, settings_digest: str) -> Path:
    path = _cached("compiled", f"{model_digest}|{settings_digest}")
    if not path.exists():
        tmp = path.with_name(path.name + f".{os.getpid()}.partial")
        _call("compile_circuit", ezkl_module().compile_circuit, str(model), str(tmp), str(settings))
        tmp.replace(path)
    return path


def proving_key(compiled: Path, srs: Path, srs_digest: str, vk_digest: str) -> Path:
    """The pk from the cache, or a setup whose vk must have the pinned digest (refused otherwise)."""
    path = _cached("pk", f"{sha256_file(compiled)}|{srs_digest}|{vk_digest}")
    if path.exists():
        return path
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        vk, pk = Path(tmp) / "vk", Path(tmp) / "pk"
        _call("setup", ezkl_module().setup, str(compiled), str(vk), str(pk), srs_path=str(srs))
        got = sha256_file(vk)
        if got != vk_digest:
            raise IntegrityError(
                f"setup reproduced verifying key {got[:19]}…, the circuit pins {vk_digest[:19]}…",
                code="vk-mismatch",
                hint="the settings, model or SRS differ from the circuit build",
            )
        pk.replace(path)
    return path


def reproduce_verifying_key(model: Path, settings: Path, srs: Path, *, pinned: str) -> str:
    """Compile and set up from scratch (no cache) and return the digest of the verifying key made.

    This is the circuit drift check: with the committed settings, model and SRS, the same
    verimesh and ezkl must give the ``pinned`` vk digest; a change that moves it shows here. When
    it does reproduce, the compiled circuit and pk go into the cache, so proving next is warm."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="verimesh-drift-", dir=cache_dir()) as tmp:
        compiled, vk, pk = Path(tmp) / "compiled", Path(tmp) / "vk", Path(tmp) / "pk"
        _call("compile_circuit", ezkl_module().compile_circuit, str(model), str(compiled), str(settings))
        _call("setup", ezkl_module().setup, str(compiled), str(vk), str(pk), srs_path=str(srs))
        got = sha256_file(vk)
        if got == pinned:
            cached = _cached("compiled", f"{sha256_file(model)}|{sha256_file(settings)}")
            if not cached.exists():
                compiled.replace(cached)
            pk.replace(_cached("pk", f"{sha256_file(cached)}|{sha256_file(srs)}|{pinned}"))
        return got


# -- build ----------------------------------------------------------------------------------------


def _settings_doc(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{path} is not ezkl settings")
    return doc


def _flat_inputs(tensors: Sequence[np.ndarray]) -> list[list[float]]:
    return [np.asarray(t, dtype=np.float64).reshape(-1).tolist() for t in tensors]


def symbolic_dims(model: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The model's symbolic input dimensions (a dynamic batch axis) fixed from the calibration
    input, as ezkl's ``variables``: a circuit is built for one shape."""
    fixed: dict[str, int] = {}
    for vi in model.graph.input:
        if vi.name not in inputs:
            continue
        shape = inputs[vi.name].shape
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.dim_param and axis < len(shape):
                if fixed.setdefault(dim.dim_param, int(shape[axis])) != shape[axis]:
                    raise InvalidInputError(
                        f"symbolic dimension {dim.dim_param!r} is {fixed[dim.dim_param]} in one input and "
                        f"{shape[axis]} in another"
                    )
    unresolved: set[str] = set()

    def collect(vis: Any) -> None:
        for vi in vis:
            for dim in vi.type.tensor_type.shape.dim:
                if dim.dim_param and dim.dim_param not in fixed:
                    unresolved.add(dim.dim_param)

    collect(model.graph.output)
    if unresolved:
        raise InvalidInputError(
            f"the model's output has symbolic dimensions ({', '.join(sorted(unresolved))}) that its inputs do not fix",
            code="unsupported-model",
            hint="export the model with fixed output shapes for zk mode",
        )
    return fixed


def build_circuit(
    model_path: Path,
    inputs: Mapping[str, np.ndarray],
    *,
    srs: Path,
    out: Path,
    steps: int = 1,
    target: str = "resources",
    tolerance: float = DEFAULT_TOLERANCE,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Circuit:
    """Calibrate, compile and set up each step; check ezkl's output against onnxruntime's."""
    from verimesh.jobs.plan import build_step_models, load_model, plan_model
    from verimesh.jobs.runtime import StepRunner

    ezkl = ezkl_module()
    if target not in TARGETS:
        raise InvalidInputError(f"target must be one of {TARGETS}")
    model, model_bytes = load_model(model_path)
    check_supported(model)
    variables = symbolic_dims(model, inputs)  # a dynamic batch axis: this circuit is for the input's size
    plan = plan_model(model, steps=steps, input_shapes={k: tuple(v.shape) for k, v in inputs.items()})
    planned = build_step_models(model, model_bytes, plan)
    srs_k = srs_logrows(srs)
    srs_digest = sha256_file(srs)
    out.mkdir(parents=True, exist_ok=True)
    runner = StepRunner(device="cpu")
    reference = dict(inputs)
    for step, blob, digest in zip(plan.steps, planned.step_bytes, planned.step_digests, strict=True):
        reference.update(runner.run(digest, blob, {n: reference[n] for n in step.inputs}, step.outputs))
    built: list[CircuitStep] = []
    carried: list[str] | None = None  # previous step's output felts, fed as they are
    last = len(plan.steps) - 1
    say = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="verimesh-circuit-") as tmp_dir:
        tmp = Path(tmp_dir)
        for step, blob, digest in zip(plan.steps, planned.step_bytes, planned.step_digests, strict=True):
            i = step.index
            say(f"step {i}: settings and calibration")
            model_file = out / f"step-{i:03d}.onnx"
            model_file.write_bytes(blob)
            settings = out / f"settings-{i:03d}.json"
            in_vis, out_vis = ("public" if i == 0 else "hashed"), ("public" if i == last else "hashed")
            args = ezkl.PyRunArgs()
            args.input_visibility, args.output_visibility = in_vis, out_vis
            args.param_visibility = "fixed"
            if variables:
                args.variables = sorted(variables.items())
            _call("gen_settings", ezkl.gen_settings, str(model_file), str(settings), py_run_args=args)
            data = tmp / f"calibration-{i}.json"
            data.write_text(json.dumps({"input_data": _flat_inputs([reference[n] for n in step.inputs])}))
            scales = None if i == 0 else [built[-1].output_scales[0]]
            _call(
                "calibrate_settings",
                ezkl.calibrate_settings,
                str(data),
                str(model_file),
                str(settings),
                target,
                scales=scales,
                max_logrows=srs_k,
            )
            doc = _settings_doc(settings)
            logrows = int(doc["run_args"]["logrows"])
            if logrows > srs_k:
                raise InvalidInputError(
                    f"step {i} needs 2^{logrows} rows; the SRS has 2^{srs_k}",
                    hint=f"use an SRS of at least {logrows} logrows",
                )
            if i and doc["model_input_scales"][0] != built[-1].output_scales[0]:
                raise InvalidInputError(f"step {i}: calibration moved the input scale; the chain would not hold")
            settings_digest = sha256_file(settings)
            say(f"step {i}: compile and setup (logrows {logrows})")
            compiled = compiled_circuit(model_file, settings, digest, settings_digest)
            vk = out / f"vk-{i:03d}.key"
            pk = _cached("pk-build", f"{sha256_file(compiled)}|{srs_digest}|{time.time_ns()}")
            _call("setup", ezkl.setup, str(compiled), str(vk), str(pk), srs_path=str(srs))
            vk_digest = sha256_file(vk)
            pk.replace(_cached("pk", f"{sha256_file(compiled)}|{srs_digest}|{vk_digest}"))
            witness_input = tmp / f"input-{i}.json"
            feed: list[Any] = _flat_inputs([reference[n] for n in step.inputs]) if carried is None else [carried]
            witness_input.write_text(json.dumps({"input_data": feed}))
            witness = _call(
                "gen_witness",
                ezkl.gen_witness,
                str(witness_input),
                str(compiled),
                str(tmp / f"w{i}.json"),
                srs_path=str(srs),
            )
            carried = [f for out_felts in witness["outputs"] for f in out_felts]
            built.append(
                CircuitStep(
                    index=i,
                    model=model_file.name,
                    model_digest=digest,
                    settings=settings.name,
                    settings_digest=settings_digest,
                    vk=vk.name,
                    vk_digest=vk_digest,
                    logrows=logrows,
                    input_visibility=in_vis,
                    output_visibility=out_vis,
                    inputs=step.inputs,
                    outputs=step.outputs,
                    input_scales=tuple(int(s) for s in doc["model_input_scales"]),
                    output_scales=tuple(int(s) for s in doc["model_output_scales"]),
                    input_shapes=tuple(tuple(int(d) for d in reference[n].shape) for n in step.inputs),
                    output_shapes=tuple(tuple(int(d) for d in reference[n].shape) for n in step.outputs),
                )
            )
    # Onboarding: ezkl's quantized outputs against onnxruntime's.
    final = built[-1]
    report: dict[str, Any] = {"tolerance": repr(tolerance), "outputs": {}}
    worst = 0.0
    offset = 0
    for name_, shape, scale in zip(final.outputs, final.output_shapes, final.output_scales, strict=True):
        count = math.prod(shape)
        got = dequantize((carried or [])[offset : offset + count], scale, shape)
        offset += count
        ref = np.asarray(reference[name_], dtype=np.float64)
        rel = float(np.linalg.norm(got - ref) / max(float(np.linalg.norm(ref)), 1e-30))
        worst = max(worst, rel)
        report["outputs"][name_] = {"rel_error": f"{rel:.6g}", "max_abs_error": f"{float(np.abs(got - ref).max()):.6g}"}
    if worst > tolerance:
        raise InvalidInputError(
            f"ezkl's quantized output drifts from onnxruntime's by {worst:.3g} (relative), beyond {tolerance}",
            code="quantization-drift",
            hint="try --target accuracy, fewer steps, or --mode spot",
        )
    circuit = Circuit(
        folder=out.resolve(),
        digest="",
        name=name or model_path.stem,
        model_digest=sha256_bytes(model_bytes),
        target=target,
        srs_path=os.path.relpath(srs.resolve(), out.resolve()),
        srs_digest=srs_digest,
        srs_logrows=srs_k,
        steps=tuple(built),
        onboarding=report,
        ezkl_version=str(getattr(ezkl, "__version__", "unknown")),
    )
    digest = write_circuit(circuit)
    return Circuit(**{**circuit.__dict__, "digest": digest})


# -- prove (in a worker process) ------------------------------------------------------------------


@dataclass(frozen=True)
class StepTask:
    model: str
    settings: str
    model_digest: str
    settings_digest: str
    vk_digest: str
    srs: str
    srs_digest: str
    input_data: list[Any]
    cache: str


def _prove_step(task: StepTask) -> tuple[bytes, list[str]]:
    """Child process: compile (cached), pk (cached or reproducible setup), witness, prove."""
    os.environ["VERIMESH_CACHE"] = task.cache
    warnings.simplefilter("ignore")
    ezkl = ezkl_module()
    compiled = compiled_circuit(Path(task.model), Path(task.settings), task.model_digest, task.settings_digest)
    pk = proving_key(compiled, Path(task.srs), task.srs_digest, task.vk_digest)
    with tempfile.TemporaryDirectory(prefix="verimesh-prove-") as tmp:
        data, witness, proof = Path(tmp) / "input.json", Path(tmp) / "witness.json", Path(tmp) / "proof.json"
        data.write_text(json.dumps({"input_data": task.input_data}))
        result = _call("gen_witness", ezkl.gen_witness, str(data), str(compiled), str(witness), srs_path=task.srs)
        _call("prove", ezkl.prove, str(witness), str(compiled), str(pk), str(proof), srs_path=task.srs)
        outputs = [f for out in result["outputs"] for f in out]
        return proof.read_bytes(), outputs


class ZkProver:
    """Proves circuits in one long-lived worker process (spawned on first use)."""

    def __init__(self, *, timeout: float = 3600.0) -> None:
        self.timeout = timeout
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # The worker dies with this process (a node killed mid-proof leaves no ezkl proving on).
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=die_with_parent, initargs=(os.getpid(),))  # fmt: skip
        return self._pool

    def worker_pids(self) -> list[int]:
        """PIDs of the live worker processes (for measurements)."""
        pool = self._pool
        return [p.pid for p in (getattr(pool, "_processes", None) or {}).values() if p.pid] if pool else []

    def close(self, *, kill: bool = False) -> None:
        """Stop the worker; ``kill`` for one stuck in a proof (a timeout)."""
        if self._pool is None:
            return
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=not kill, cancel_futures=True)
        if kill:
            for proc in processes:
                proc.kill()
        self._pool = None

    def prove(
        self,
        circuit: Circuit,
        inputs: Mapping[str, np.ndarray],
        srs: Path,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[list[bytes], list[str]]:
        """Proofs of every step, and the last step's output field elements."""
        srs_digest = circuit.srs_digest
        deadline = time.monotonic() + self.timeout
        carried: list[str] | None = None
        proofs = []
        for step in circuit.steps:
            # ezkl loads the step model from its path: check what it will run first.
            check_model_bytes(circuit.read(step.model, step.model_digest), what=f"circuit step {step.index} model")
            circuit.read(step.settings, step.settings_digest)
            feed: list[Any] = _flat_inputs([inputs[n] for n in step.inputs]) if carried is None else [carried]
            task = StepTask(
                str(circuit.path(step.model)),
                str(circuit.path(step.settings)),
                step.model_digest,
                step.settings_digest,
                step.vk_digest,
                str(srs),
                srs_digest,
                feed,
                str(cache_dir()),
            )
            future: Future[tuple[bytes, list[str]]] = self._executor().submit(_prove_step, task)
            try:
                proof, carried = future.result(timeout=max(1.0, deadline - time.monotonic()))
            except FutureTimeout as exc:
                self.close(kill=True)
                raise VerimeshError(f"proving timed out after {self.timeout:.0f} s", code="prove-timeout") from exc
            except BrokenProcessPool as exc:
                self.close(kill=True)
                raise BackendUnavailableError(
                    "the proving worker process died (out of memory?)", code="prover-crashed"
                ) from exc
            proofs.append(proof)
            if progress:
                progress(step.index + 1, len(circuit.steps))
        return proofs, carried or []


def bare_prove_seconds(circuit: Circuit, inputs: Mapping[str, np.ndarray], srs: Path) -> float:
    """Seconds ezkl alone takes for every step's witness and proof (cached compiled circuits and
    keys, in this process): the reference a verimesh zk proof is budgeted against."""
    ezkl = ezkl_module()
    carried: list[str] | None = None
    total = 0.0
    with tempfile.TemporaryDirectory(prefix="verimesh-bare-") as tmp:
        for step in circuit.steps:
            compiled = compiled_circuit(
                circuit.path(step.model), circuit.path(step.settings), step.model_digest, step.settings_digest
            )
            pk = proving_key(compiled, srs, circuit.srs_digest, step.vk_digest)
            feed: list[Any] = _flat_inputs([inputs[n] for n in step.inputs]) if carried is None else [carried]
            data, witness, proof = Path(tmp) / "in.json", Path(tmp) / "w.json", Path(tmp) / "p.json"
            data.write_text(json.dumps({"input_data": feed}))
            start = time.perf_counter()
            result = _call("gen_witness", ezkl.gen_witness, str(data), str(compiled), str(witness), srs_path=str(srs))
            _call("prove", ezkl.prove, str(witness), str(compiled), str(pk), str(proof), srs_path=str(srs))
            total += time.perf_counter() - start
            carried = [f for out in result["outputs"] for f in out]
    return total


def bare_verify_seconds(circuit: Circuit, bundle: Path, srs: Path) -> float:
    """Seconds ezkl alone takes to verify the bundle's proofs (the zk verification's reference)."""
    from verimesh.jobs.bundle import read_bundle

    proofs = read_bundle(bundle).proofs
    start = time.perf_counter()
    for step, proof in zip(circuit.steps, proofs, strict=True):
        verify_proof(proof, circuit.path(step.settings), circuit.path(step.vk), srs)
    return time.perf_counter() - start


# -- verify ---------------------------------------------------------------------------------------


def instances(proof: Mapping[str, Any]) -> list[str]:
    """The proof's public instances, flattened in order (inputs, then outputs)."""
    rows = proof.get("instances")
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise InvalidInputError("proof has no instances list")
    flat = [f for r in rows for f in r]
    if not all(isinstance(f, str) and len(f) == 64 for f in flat):
        raise InvalidInputError("proof instances are not 32-byte field elements")
    return [f.lower() for f in flat]


def instance_layout(step: CircuitStep) -> tuple[int, int]:
    """How many instances the step's inputs and outputs take (a hashed tensor takes one)."""
    n_in = len(step.inputs) if step.input_visibility == "hashed" else sum(math.prod(s) for s in step.input_shapes)
    n_out = len(step.outputs) if step.output_visibility == "hashed" else sum(math.prod(s) for s in step.output_shapes)
    return n_in, n_out


def verify_proof(proof_bytes: bytes, settings: Path, vk: Path, srs: Path) -> tuple[bool, str]:
    """ezkl.verify with the job owner's settings, vk and SRS; a raise is a failed proof."""
    ezkl = ezkl_module()
    with tempfile.TemporaryDirectory(prefix="verimesh-verify-") as tmp:
        path = Path(tmp) / "proof.json"
        path.write_bytes(proof_bytes)
        try:
            with quiet_output():
                ok = bool(ezkl.verify(str(path), str(settings), str(vk), srs_path=str(srs)))
        except (RuntimeError, ValueError, OSError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return False, f"ezkl rejected the proof: {first[:200]}"
    return ok, "" if ok else "ezkl rejected the proof"


def copy_circuit(circuit: Circuit, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ["circuit.json", *(n for s in circuit.steps for n in (s.model, s.settings, s.vk))]:
        shutil.copy2(circuit.path(name), dest / name)
