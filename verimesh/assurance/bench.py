"""Spot-check benchmarks (docs/design.md §8): ratios measured in one process, medians after warm-up.

- prove overhead = ``Worker.prove`` (run steps, hash, Merkle, sign, write bundle) / plain
  onnxruntime inference of the whole model with the same optimization level, both warm;
- verify cost = ``verify`` at the job's default policy / the same plain inference (a job owner's
  alternative is re-running the whole model). The verifier's sample is random, so each repeat
  verifies with several seeds and takes their mean.
- step costs = each step's estimated share of the plan's cost (what the verifier samples by)
  beside its measured share of the time of the chained steps (warm ``StepRunner`` sessions, as a
  worker runs them); a step of 1 ms or more whose shares differ by more than 2× is sampled out of
  proportion to the work it holds.

Shared machines are noisy, so each repeat times inference, prove and verify back to back and the
reported ratio is the median of the per-repeat ratios (times are medians too).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from verimesh.assurance.startup import FLOOR_CODE
from verimesh.errors import InvalidInputError

PROVE_TARGET = 1.25
VERIFY_TARGET = 0.35
ZK_TARGET = 1.10
SIGNATURES_TARGET = 50
APPENDS_TARGET = 5000
PROOF_MS_TARGET = 5.0
MIN_JUDGED_INFERENCE_S = 0.010
COST_RATIO_TARGET = 2.0  # measured share / estimated share, both ways
MIN_JUDGED_STEP_S = 0.001  # below this a step's time is mostly the session's fixed cost


@dataclass(frozen=True)
class SpotBench:
    model: str
    steps: int
    samples: int
    repeats: int
    inference_s: float
    prove_s: float
    verify_s: float
    verify_all_s: float
    bundle_bytes: int
    prove_overhead: float
    verify_ratio: float

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "prove_target_met": self.prove_overhead <= PROVE_TARGET,
            "verify_target_met": self.verify_ratio <= VERIFY_TARGET,
        }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from verimesh.jobs.runtime import onnxruntime_version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime_version(),
        "platform": platform.platform(),
    }


def _input_for(model: Path) -> Path | None:
    candidate = model.with_name(model.stem + ".input.npy")
    return candidate if candidate.exists() else None


def bench_spot(model: Path, *, repeats: int = 7, input_file: Path | None = None, steps: int | None = None) -> SpotBench:
    import onnxruntime as ort

    from verimesh.jobs.job import new_job
    from verimesh.jobs.runtime import StepRunner
    from verimesh.signing.keys import generate_key
    from verimesh.workflows import Worker, verify

    with tempfile.TemporaryDirectory(prefix="verimesh-bench-") as tmp:
        work = Path(tmp)
        input_file = input_file or _input_for(model) or _random_input(model, work)
        job = new_job(model, input_file, work / "job.json", steps=steps)
        feeds = job.read_input()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.log_severity_level = 3
        # As for verimesh's own sessions: without this the plain session's idle threads keep
        # spinning after each run and steal both cores from the operation timed next (measured on
        # ResNet-50: plain inference 59.0 ms either way; prove timed after it 113 ms vs 86 ms).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        plain = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
        worker = Worker(generate_key(), device="cpu")
        verifier = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
        public = worker.key.public

        def timed(fn: Callable[[], object]) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        def checked_verify(bundle: Path, seed: int, samples: int | str | None = None) -> None:
            verdict = verify(bundle, job=job, node_key=public, runner=verifier, seed=seed, samples=samples)  # type: ignore[arg-type]
            if not verdict:
                raise RuntimeError(f"benchmark bundle was rejected: {verdict.reason}")

        # Warm-up: sessions on both sides, every step (so no sample pays a session creation).
        for _ in range(2):
            plain.run(None, feeds)
            worker.prove(job, out=work / "warm.vmb")
        checked_verify(work / "warm.vmb", 0, "all")
        rows = []
        for i in range(repeats):
            # A worker writes a new file per job, so each timed prove does too (replacing one
            # file by another would time the file system freeing the old one).
            bundle = work / f"result-{i}.vmb"
            t_inf = timed(lambda: plain.run(None, feeds))
            t_prove = timed(partial(worker.prove, job, out=bundle))
            t_verify = statistics.fmean(timed(partial(checked_verify, bundle, 1000 * i + s)) for s in range(3))
            rows.append((t_inf, t_prove, t_verify))
            if i:
                (work / f"result-{i - 1}.vmb").unlink()
        verify_all = statistics.median(timed(lambda: checked_verify(bundle, 0, "all")) for _ in range(3))
        return SpotBench(
            model=model.name,
            steps=len(job.steps),
            samples=job.policy.samples,
            repeats=repeats,
            inference_s=statistics.median(r[0] for r in rows),
            prove_s=statistics.median(r[1] for r in rows),
            verify_s=statistics.median(r[2] for r in rows),
            verify_all_s=verify_all,
            bundle_bytes=bundle.stat().st_size,
            prove_overhead=statistics.median(r[1] / r[0] for r in rows),
            verify_ratio=statistics.median(r[2] / r[0] for r in rows),
        )


def _random_input(model: Path, work: Path) -> Path:
    """Random input of the model's shape (symbolic dims = 1), for models without MODEL.input.npy."""
    from verimesh.jobs.plan import load_model, model_io

    specs = model_io(load_model(model)[0])[0]
    rng = np.random.default_rng(0)
    tensors = {
        s.name: rng.standard_normal([d if isinstance(d, int) and d > 0 else 1 for d in s.shape or ()]).astype(s.dtype)
        for s in specs
    }
    path = work / "input.npz"
    np.savez(path, **tensors)  # type: ignore[arg-type]
    return path


def _step_ops(step_model: bytes) -> str:
    """The op types that hold most of a step's estimated cost, heaviest first ("Conv×3, MaxPool")."""
    import onnx

    from verimesh.jobs.costs import node_flops
    from verimesh.jobs.plan import _light_copy, _value_infos

    model = onnx.load_model_from_string(step_model)
    shapes = _value_infos(_light_copy(model, {}))
    by_op: dict[str, list[int]] = {}
    for node in model.graph.node:
        if node.op_type != "Constant":
            by_op.setdefault(node.op_type, []).append(node_flops(node, shapes))
    total = sum(sum(v) for v in by_op.values()) or 1
    heavy = sorted(by_op.items(), key=lambda kv: -sum(kv[1]))
    if not heavy:
        return "-"
    shown = [(op, len(c)) for op, c in heavy if sum(c) >= 0.05 * total][:3] or [(heavy[0][0], len(heavy[0][1]))]
    return ", ".join(op if count == 1 else f"{op}×{count}" for op, count in shown)


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall, CPU seconds busy on the whole machine, CPU seconds of this process), or None off Linux."""
    import resource

    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    own = resource.getrusage(resource.RUSAGE_SELF)
    idle = fields[3] + fields[4]  # idle and iowait; steal counts as busy (another VM has the core)
    return time.perf_counter(), (sum(fields) - idle) / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def _others_cores(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> float | None:
    """Cores kept busy by other processes between two ``_cpu_seconds`` readings; None over less
    than 0.25 s, where the kernel's 10 ms accounting ticks say nothing."""
    if before is None or after is None or after[0] - before[0] < 0.25:
        return None
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0])


def bench_costs(
    model: Path, *, repeats: int = 11, input_file: Path | None = None, steps: int | None = None
) -> dict[str, Any]:
    """Plan a job (default plan unless ``steps``), then time each step warm with the worker's
    runner, chained in order from the job input; medians over ``repeats`` chains."""
    from verimesh.jobs.job import new_job
    from verimesh.jobs.runtime import StepRunner
    from verimesh.spot.spotcheck import run_steps

    with tempfile.TemporaryDirectory(prefix="verimesh-costs-bench-") as tmp:
        work = Path(tmp)
        input_file = input_file or _input_for(model) or _random_input(model, work)
        job = new_job(model, input_file, work / "job.json", steps=steps)
        runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
        blobs = job.read_step_models()
        trace = run_steps(job, blobs, job.read_input(), runner)  # sessions created, every input at hand
        run_steps(job, blobs, job.read_input(), runner)  # warm-up
        times: list[list[float]] = [[] for _ in job.steps]
        shares: list[list[float]] = [[] for _ in job.steps]
        busy = _cpu_seconds()
        for _ in range(repeats):
            chain = []
            for step in job.steps:
                feeds = {n: trace[n] for n in step.inputs}
                start = time.perf_counter()
                runner.run(step.digest, blobs[step.index], feeds, step.outputs)
                chain.append(time.perf_counter() - start)
            for i, t in enumerate(chain):
                times[i].append(t)
                shares[i].append(t / sum(chain))
        others = _others_cores(busy, _cpu_seconds())
        medians = [statistics.median(t) for t in times]
        total_cost = sum(max(s.cost, 1) for s in job.steps)
        total_s = sum(medians)
        rows: list[dict[str, Any]] = []
        for step, blob, t, share in zip(job.steps, blobs, medians, shares, strict=True):
            estimated = max(step.cost, 1) / total_cost
            # A share per chain, then the median: a load change between chains (a shared
            # machine) scales a whole chain and cancels out, as in the spot section's ratios.
            measured = statistics.median(share)
            ratio = measured / estimated
            judged = t >= MIN_JUDGED_STEP_S
            rows.append(
                {
                    "step": step.index,
                    "nodes": step.nodes,
                    "ops": _step_ops(blob),
                    "cost": step.cost,
                    "estimated_share": estimated,
                    "measured_s": t,
                    "min_s": min(times[step.index]),
                    "measured_share": measured,
                    "ratio": ratio,
                    "within_2x": (1 / COST_RATIO_TARGET <= ratio <= COST_RATIO_TARGET) if judged else None,
                }
            )
    judged_rows = [r for r in rows if r["within_2x"] is not None]
    worst = max(judged_rows, key=lambda r: max(r["ratio"], 1 / r["ratio"]), default=None)
    return {
        "model": model.name,
        "steps": len(rows),
        "repeats": repeats,
        "total_cost": total_cost,
        "total_s": total_s,
        "judged_steps": len(judged_rows),
        "worst_ratio": worst["ratio"] if worst else None,
        "all_within_2x": all(r["within_2x"] for r in judged_rows) if judged_rows else None,
        "other_cores": others,
        "rows": rows,
        "machine": machine(),
    }


def bench_ledger(entries: int, *, batch: int = 1000, nodes: int = 97, rules: bool = True) -> dict[str, Any]:
    """A log that passes the rules, on a fresh SQLite ledger: ``nodes`` registrations (each with
    the node's signed request), job posts (the owner's signed request and deposit) and settlements
    (receipt with a node-signed envelope, accepted verdict, reward) for distinct (node, job) pairs,
    appended in batches of about ``batch`` entries, each batch signed once by the writer.

    Timed: appends/s (the transactions alone: the nodes' envelope signatures are the nodes' work,
    made before each batch is timed), a root, inclusion and consistency proofs (medians of 200), a
    full ``ledger verify``, and ``ledger verify --rules`` (every request, envelope and batch
    signature checked again, spread over the machine's cores)."""
    import random

    from verimesh.core.canonical import b64encode
    from verimesh.core.digest import sha256_bytes
    from verimesh.ledger.events import sign_request
    from verimesh.ledger.store import Ledger, verify_ledger
    from verimesh.settlement import audit_ledger
    from verimesh.signing.envelope import make_statement, sign_statement
    from verimesh.signing.keys import generate_key

    reward = 1
    with tempfile.TemporaryDirectory(prefix="verimesh-ledger-bench-") as tmp:
        operator, owner = generate_key(), generate_key()
        ledger = Ledger.create(str(Path(tmp) / "bench.db"), operator, settings={"reward": reward})
        keys = [generate_key() for _ in range(min(nodes, max(1, entries // 10)))]
        appending = 0.0

        def timed(events: list[dict[str, Any]] | None = None, settle: list[tuple[Any, str, Any]] | None = None) -> int:
            nonlocal appending
            start = time.perf_counter()
            with ledger.transaction(operator) as txn:
                for event in events or ():
                    txn.append(event)
                for key, job_id, envelope in settle or ():
                    statement = envelope.statement()
                    raw = envelope.to_bytes()
                    claim = {"node_id": key.node_id, "job_id": job_id, "step_range": [0, 3]}
                    r = txn.append({"kind": "receipt", **claim, "subjects": statement["subject"],
                                    "envelope_digest": sha256_bytes(raw), "envelope": b64encode(raw)})  # fmt: skip
                    v = txn.append({"kind": "verdict", **claim, "status": "accept", "reason": "all checks passed",
                                    "seed": "1", "sampled_steps": [1, 3], "samples": 1, "receipt": r,
                                    "evidence_digest": None, "verifier": operator.node_id})  # fmt: skip
                    txn.append({"kind": "reward", **claim, "amount": reward, "verdict": v})
            appending += time.perf_counter() - start
            return ledger.size()

        size = timed([{"kind": "register", "node_id": k.node_id, "stake": 1000,
                       **sign_request(k, action="register", ledger_id=ledger.ledger_id, amount=1000).to_json()}
                      for k in keys])  # fmt: skip
        job_no = 0
        pairs: list[tuple[Any, str]] = []
        while entries - size >= 2:  # a batch is at least one event and its commit
            take = min(batch, entries - size)
            if entries - size - take == 1:
                take -= 1  # leave the last batch room for its commit
            room = take - 1
            events: list[dict[str, Any]] = []
            settle: list[tuple[Any, str, Any]] = []
            while room > 0:
                if not pairs or room < 3:
                    job_id = f"sha256:{job_no:064x}"
                    job_no += 1
                    request = sign_request(owner, action="job", ledger_id=ledger.ledger_id,
                                           amount=reward * len(keys), job_id=job_id)  # fmt: skip
                    events.append({"kind": "job", "job_id": job_id, "owner": owner.node_id,
                                   "deposit": request.amount, **request.to_json()})  # fmt: skip
                    pairs = [(k, job_id) for k in keys]
                    room -= 1
                    continue
                key, job_id = pairs.pop()
                predicate = {"job_id": job_id, "node_id": key.node_id, "mode": "spot", "step_range": [0, 3]}
                statement = make_statement({"logits": f"sha256:{job_no:064x}"},
                                           "https://verimesh.dev/spot-check/v2", predicate)  # fmt: skip
                settle.append((key, job_id, sign_statement(statement, key)))
                room -= 3
            size = timed(events, settle)
        appends = size / appending
        rng = random.Random(0)

        def median_ms(fn: Callable[[], object]) -> float:
            times = []
            for _ in range(200):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times) * 1e3

        root_ms = median_ms(lambda: ledger.root(rng.randrange(1, size + 1)))
        inclusion_ms = median_ms(lambda: ledger.inclusion_proof(rng.randrange(size), size))
        consistency_ms = median_ms(lambda: ledger.consistency_proof(rng.randrange(1, size), size))
        start = time.perf_counter()
        report = verify_ledger(ledger)
        verify_s = time.perf_counter() - start
        if not report.ok:
            raise RuntimeError(f"benchmark ledger does not verify: {report.problems[:1]}")
        rules_s = None
        if rules:
            start = time.perf_counter()
            audited = audit_ledger(ledger, rules=True)
            rules_s = time.perf_counter() - start
            if not audited.ok:
                raise RuntimeError(f"benchmark ledger breaks a rule: {[*audited.problems, *audited.violations][:1]}")
    return {
        "entries": size,
        "batch": batch,
        "appends_per_s": appends,
        "signed_batches": report.commits_checked,
        "root_ms": root_ms,
        "inclusion_ms": inclusion_ms,
        "consistency_ms": consistency_ms,
        "verify_s": verify_s,
        "verify_rules_s": rules_s,
        "cores": os.cpu_count(),
        "machine": machine(),
    }


def _peak_rss_mb(pid: int | None = None) -> float:
    """VmHWM of a process (this one by default), in MB; 0 where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def bench_zk(
    model: Path, *, srs: Path, steps: int = 1, repeats: int = 3, input_file: Path | None = None
) -> dict[str, Any]:
    """Build a circuit, then time setup, cold and warm proofs through verimesh against bare
    ``ezkl.gen_witness`` + ``ezkl.prove`` on the same compiled circuit and key, and verification."""
    import json as _json
    import os

    from verimesh.core.tensors import load_input_file
    from verimesh.jobs.circuit import cache_dir
    from verimesh.jobs.job import new_job
    from verimesh.jobs.plan import load_model, model_io
    from verimesh.signing.keys import generate_key
    from verimesh.workflows import Worker, verify
    from verimesh.zk import ezkl_backend as zk

    ezkl = zk.ezkl_module()
    input_file = input_file or _input_for(model)
    if input_file is None:
        raise InvalidInputError(f"no input for {model}: pass one (MODEL.input.npy is looked for)")
    tensors = load_input_file(input_file, model_io(load_model(model)[0])[0])
    saved_cache = os.environ.get("VERIMESH_CACHE")
    with tempfile.TemporaryDirectory(prefix="verimesh-zk-bench-") as tmp:
        work = Path(tmp)
        os.environ["VERIMESH_CACHE"] = str(work / "cache")
        try:
            start = time.perf_counter()
            circuit = zk.build_circuit(model, tensors, srs=srs, out=work / "circuit", steps=steps)
            build_s = time.perf_counter() - start
            step = circuit.steps[0]
            compiled = zk.compiled_circuit(
                circuit.path(step.model), circuit.path(step.settings), step.model_digest, step.settings_digest
            )
            start = time.perf_counter()
            with zk.quiet_output():
                ezkl.setup(str(compiled), str(work / "vk"), str(work / "pk"), srs_path=str(srs))
            setup_s = time.perf_counter() - start
            pk_mb = sum(p.stat().st_size for p in (cache_dir() / "pk").glob("*.bin")) / 1e6
            job = new_job(model, input_file, work / "job.json", mode="zk", circuit=circuit.folder)
            key = generate_key()
            for cached in (cache_dir() / "pk").glob("*.bin"):  # cold: the worker must set up again
                cached.rename(cached.with_suffix(".keep"))
            worker = Worker(key, srs=srs)
            try:
                start = time.perf_counter()
                worker.prove(job, out=work / "cold.vmb")
                cold_s = time.perf_counter() - start
                bare_times, warm_times = [], []
                data = work / "input.json"
                data.write_text(
                    _json.dumps(
                        {"input_data": [np.asarray(tensors[n], np.float64).reshape(-1).tolist() for n in step.inputs]}
                    )
                )
                pk = next((cache_dir() / "pk").glob("*.bin"))
                for i in range(repeats):  # interleaved, as for the spot benchmark
                    if steps == 1:
                        start = time.perf_counter()
                        with zk.quiet_output():
                            ezkl.gen_witness(str(data), str(compiled), str(work / "w.json"), srs_path=str(srs))
                            ezkl.prove(
                                str(work / "w.json"), str(compiled), str(pk), str(work / "p.json"), srs_path=str(srs)
                            )
                        bare_times.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    worker.prove(job, out=work / f"warm-{i}.vmb")
                    warm_times.append(time.perf_counter() - start)
                pids = worker._zk.worker_pids() if worker._zk is not None else []
                worker_rss = max((_peak_rss_mb(pid) for pid in pids), default=0.0)
            finally:
                worker.close()
            verify_times = []
            for _ in range(repeats):
                start = time.perf_counter()
                verdict = verify(work / "warm-0.vmb", job=job, node_key=key.public)
                verify_times.append(time.perf_counter() - start)
                if not verdict:
                    raise RuntimeError(f"benchmark proof was rejected: {verdict.reason}")
            warm = statistics.median(warm_times)
            bare = statistics.median(bare_times) if bare_times else float("nan")
            return {
                "model": model.name,
                "steps": steps,
                "logrows": [s.logrows for s in circuit.steps],
                "build_s": build_s,
                "setup_s": setup_s,
                "cold_prove_s": cold_s,
                "warm_prove_s": warm,
                "bare_ezkl_prove_s": bare,
                "warm_over_bare": warm / bare if bare_times else None,
                "verify_s": statistics.median(verify_times),
                "pk_mb": pk_mb,
                "proof_kb": sum(len(p) for p in read_proofs(work / "warm-0.vmb")) / 1024,
                # The proving worker's own peak (setup and proofs): the bench process also holds
                # whatever earlier sections loaded, and runs the bare ezkl proofs itself.
                "peak_rss_mb": worker_rss or _peak_rss_mb(),
                "repeats": repeats,
                "machine": machine(),
            }
        finally:
            if saved_cache is None:
                os.environ.pop("VERIMESH_CACHE", None)
            else:
                os.environ["VERIMESH_CACHE"] = saved_cache


def read_proofs(bundle: Path) -> tuple[bytes, ...]:
    from verimesh.jobs.bundle import read_bundle

    return read_bundle(bundle).proofs


def bench_signatures(count: int = 200, *, reference_count: int = 5, signers: int = 8) -> dict[str, Any]:
    """Envelope verifications per second with the fast backend and with py_ecc, and aggregates:
    one envelope co-signed by ``signers`` keys (FastAggregateVerify) and ``signers`` envelopes
    checked together (AggregateVerify)."""
    from verimesh.core.canonical import canonical_json
    from verimesh.signing import _bls
    from verimesh.signing.envelope import PAYLOAD_TYPE, make_statement, pae, sign_statement
    from verimesh.signing.keys import generate_key

    keys = [generate_key() for _ in range(signers)]
    predicate = {"job_id": "sha256:" + "1" * 64, "commitment": {"root": "sha256:" + "2" * 64, "leaves": 17}}
    envelopes = []
    for i in range(count):
        statement = make_statement({"logits": "sha256:" + f"{i:064x}"}, "https://verimesh.dev/spot-check/v1", predicate)
        envelopes.append((sign_statement(statement, keys[i % signers]), keys[i % signers].public))
    results: dict[str, Any] = {"count": count, "signers": signers, "machine": machine()}
    backends: list[tuple[str, _bls.Backend, int]] = [(n, _bls.backend(n), count) for n in _bls.available_backends()]
    backends.append(("py_ecc", _bls.PyEccBackend(), reference_count))
    for name, backend, n in backends:
        start = time.perf_counter()
        for envelope, public in envelopes[:n]:
            message = pae(envelope.payload_type, envelope.payload)
            if not backend.verify(public.key, message, envelope.signatures[0].sig):
                raise RuntimeError("benchmark envelope did not verify")
        results[f"{name}_verifications_per_s"] = n / (time.perf_counter() - start)
    fast = backends[0][1]
    results["backends"] = [name for name, _, _ in backends]
    results["fast_backend"] = backends[0][0]
    results["fast_verifications_per_s"] = results[f"{backends[0][0]}_verifications_per_s"]
    # One statement co-signed by every signer (a verifier committee): one pairing check.
    message = pae(PAYLOAD_TYPE, canonical_json({"statement": "co-signed"}))
    aggregate = fast.aggregate([k.sign(message) for k in keys])
    start = time.perf_counter()
    ok = fast.fast_aggregate_verify([k.public.key for k in keys], message, aggregate)
    results["fast_aggregate_verify_ms"] = (time.perf_counter() - start) * 1e3
    # Distinct envelopes by distinct signers, checked in one aggregate.
    batch = [(pae(e.payload_type, e.payload), p.key, e.signatures[0].sig) for e, p in envelopes[:signers]]
    aggregate = fast.aggregate([sig for _, _, sig in batch])
    start = time.perf_counter()
    ok = ok and fast.aggregate_verify([pk for _, pk, _ in batch], [m for m, _, _ in batch], aggregate)
    results["aggregate_verify_ms"] = (time.perf_counter() - start) * 1e3
    results["aggregate_verify_per_envelope_ms"] = results["aggregate_verify_ms"] / signers
    if not ok:
        raise RuntimeError("benchmark aggregate did not verify")
    results["target_met"] = results["fast_verifications_per_s"] >= SIGNATURES_TARGET
    return results


# -- the whole benchmark (`verimesh bench`, `make bench`) ------------------------------------------

SECTIONS = (
    "spot",
    "subtasks",
    "mesh",
    "costs",
    "zk",
    "signatures",
    "ledger",
    "startup",
    "generate",
    "fleet",
    "simulate",
)
BEGIN_MARK = "<!-- verimesh bench: generated from here; edit outside these marks -->"
END_MARK = "<!-- verimesh bench: end of generated part -->"


@dataclass(frozen=True)
class BenchOptions:
    """What one ``verimesh bench`` run measures (``quick`` only changes the defaults chosen by the CLI)."""

    models: tuple[Path, ...]
    repeats: int
    steps: int | None
    zk_models: tuple[Path, ...]
    srs: Path | None
    zk_repeats: int
    signatures: int
    ledger_sizes: tuple[int, ...]
    sections: tuple[str, ...] = SECTIONS
    quick: bool = False
    cost_models: tuple[Path, ...] = ()  # the costs section's models (the CLI's default: see `bench`)
    startup_model: Path | None = None  # the startup section's model (the CLI's default: fixtures/mlp.onnx)
    generate_models: tuple[tuple[Path, Path], ...] = ()  # (decoder model, prompt.json): the generate section


def run_benchmarks(options: BenchOptions, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every section asked for; returns the JSON report (targets judged in ``targets``)."""
    say = progress or (lambda message: None)
    report: dict[str, Any] = {
        "type": "verimesh/bench-report",
        "version": 1,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "quick": options.quick,
        "machine": machine(),
        "notes": [],
    }
    if "spot" in options.sections:
        report["spot"] = []
        for model in options.models:
            say(f"spot: {model.name} ({options.repeats} repeats)")
            report["spot"].append(bench_spot(model, repeats=options.repeats, steps=options.steps).to_json())
    if "subtasks" in options.sections:
        from verimesh.assurance.subtask_bench import bench_subtasks

        report["subtasks"] = []
        picked = _model_with_input(options.models, max, "subtasks", report)
        if picked is not None:
            largest, input_file = picked
            repeats = max(3, options.repeats // 2)
            say(f"subtasks: {largest.name} in 4 segments ({repeats} repeats)")
            report["subtasks"].append(bench_subtasks(largest, input_file, segments=4, repeats=repeats))
    if "mesh" in options.sections:
        from verimesh.assurance.mesh_bench import bench_mesh

        picked = _model_with_input(options.models, min, "mesh", report)
        if picked is not None:
            smallest, mesh_input = picked
            tasks, count = (20, 4) if options.quick else (200, 20)
            say(f"mesh: {tasks} tasks of {smallest.name} on {count} nodes")
            report["mesh"] = [bench_mesh(smallest, mesh_input, tasks=tasks, nodes=count)]
        picked = _model_with_input(options.models, max, "mesh challenges", report)
        if picked is not None:
            from verimesh.assurance.mesh_bench import bench_challenges

            largest, challenge_input = picked
            say(f"mesh: challenge-mode bytes of {largest.name} per audit level")
            report["challenges"] = bench_challenges(largest, challenge_input, seeds=16 if options.quick else 64)
    if "costs" in options.sections:
        report["costs"] = []
        for model in options.cost_models:
            say(f"costs: {model.name} ({options.repeats} repeats)")
            report["costs"].append(bench_costs(model, repeats=options.repeats, steps=options.steps))
    if "zk" in options.sections:
        report["zk"] = []
        srs = options.srs
        if srs is None:
            report["notes"].append("zk skipped: no SRS (pass --srs; nothing is downloaded)")
        else:
            for model in options.zk_models:
                say(f"zk: {model.name} ({options.zk_repeats} repeats)")
                report["zk"].append(bench_zk(model, srs=srs, repeats=options.zk_repeats))
    if "signatures" in options.sections:
        say(f"signatures: {options.signatures} envelopes")
        report["signatures"] = bench_signatures(options.signatures)
    if "ledger" in options.sections:
        report["ledger"] = []
        for entries in options.ledger_sizes:
            say(f"ledger: {entries:,} entries")
            report["ledger"].append(bench_ledger(entries))
    if "startup" in options.sections:
        from verimesh.assurance.startup import bench_startup

        start_model = options.startup_model
        start_input = _input_for(start_model) if start_model is not None else None
        if start_model is None or start_input is None:
            report["notes"].append("startup skipped: no model with an input beside it (fixtures/mlp.onnx)")
        else:
            repeats = 5 if options.quick else 11
            say(f"startup: {start_model.name} ({repeats} repeats of each process)")
            report["startup"] = bench_startup(start_model, start_input, repeats=repeats)
    if "generate" in options.sections:
        from verimesh.assurance.generate_bench import bench_generate

        report["generate"] = []
        if not options.generate_models:
            report["notes"].append("generate skipped: no decoder model (fixtures/lm.onnx with lm.prompt.json)")
        for model, prompt in options.generate_models:
            new_tokens, repeats = (32, 3) if options.quick else (128, 5)
            say(f"generate: {model.name}, {new_tokens} new tokens ({repeats} repeats)")
            report["generate"].append(bench_generate(model, prompt, new_tokens=new_tokens, repeats=repeats))
    if "fleet" in options.sections:
        from verimesh.assurance.fleet_bench import bench_fleet

        picked = _model_with_input(options.models, max, "fleet", report)
        if picked is not None:
            largest, fleet_input = picked
            bundles, repeats = (20, 1) if options.quick else (100, 3)
            say(f"fleet: {bundles} verifications of {largest.name}, in process and on 1 and 2 Ray actors")
            report["fleet"] = [bench_fleet(largest, fleet_input, bundles=bundles, repeats=repeats)]
    if "simulate" in options.sections:
        from verimesh.assurance.simulate import bench_simulate

        say("simulate: the analytic model in this process (" + ("10^3 nodes, 10^5 jobs)" if options.quick
            else "10^4 nodes, 10^6 jobs)"))  # fmt: skip
        report["simulate"] = bench_simulate(quick=options.quick)
    report["targets"] = targets(report)
    return report


def _model_with_input(models: tuple[Path, ...], pick: Callable[..., Path], section: str,
                      report: dict[str, Any]) -> tuple[Path, Path] | None:  # fmt: skip
    """The largest (``max``) or smallest (``min``) spot model by size and the input beside it; None,
    with a note in the report, when there is none."""
    model = pick(models, key=lambda m: m.stat().st_size) if models else None
    input_file = _input_for(model) if model is not None else None
    if model is None or input_file is None:
        report["notes"].append(f"{section} skipped: no spot model with an input beside it")
        return None
    return model, input_file


MESH_TASKS_TARGET = 50.0  # issue 16: small tasks per second on two cores
MESH_OVERHEAD_MS = 25.0  # issue 16: the coordinator's own cost per task, BLS checks included


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """docs/design.md §8's targets against this report. Spot ratios are judged on the model with the most
    inference time (sub-millisecond fixtures measure fixed costs, not overhead)."""
    rows: list[dict[str, Any]] = []

    def add(name: str, goal: str, value: float | None, met: bool | None, where: str) -> None:
        rows.append({"target": name, "goal": goal, "measured": value, "met": met, "where": where})

    spot = report.get("spot") or []
    if spot:
        big = max(spot, key=lambda r: r["inference_s"])
        where = f"{big['model']}, {big['steps']} steps, inference {big['inference_s'] * 1e3:.1f} ms"
        # Below ~10 ms of inference a ratio measures fixed costs (a 1.5 ms BLS verification, file
        # creation), not overhead: such a run shows the numbers but does not judge them.
        judged = big["inference_s"] >= MIN_JUDGED_INFERENCE_S
        if not judged:
            where += " (too small to judge: run `make bench` for the ResNet-50-size model)"
        add("spot prove / inference", f"≤ {PROVE_TARGET}", big["prove_overhead"],
            big["prove_overhead"] <= PROVE_TARGET if judged else None, where)  # fmt: skip
        add("spot verify / full re-execution", f"≤ {VERIFY_TARGET}", big["verify_ratio"],
            big["verify_ratio"] <= VERIFY_TARGET if judged else None, where)  # fmt: skip
    for row in report.get("zk") or []:
        ratio = row["warm_over_bare"]
        add("zk warm prove / bare ezkl", f"≤ {ZK_TARGET}", ratio, None if ratio is None else ratio <= ZK_TARGET,
            f"{row['model']}, logrows {max(row['logrows'])}")  # fmt: skip
    sig = report.get("signatures")
    if sig:
        add("envelope verifications/s", f"≥ {SIGNATURES_TARGET}", sig["fast_verifications_per_s"],
            sig["target_met"], f"{sig['fast_backend']} backend")  # fmt: skip
    ledger = report.get("ledger") or []
    if ledger:
        big = max(ledger, key=lambda r: r["entries"])
        where = f"SQLite, {big['entries']:,} entries, batches of {big['batch']:,}"
        add("ledger appends/s", f"≥ {APPENDS_TARGET:,}", big["appends_per_s"],
            big["appends_per_s"] >= APPENDS_TARGET, where)  # fmt: skip
        worst = max(big["inclusion_ms"], big["consistency_ms"])
        # The goal is stated at 10^6 entries; a smaller ledger cannot show it.
        judged = worst <= PROOF_MS_TARGET if big["entries"] >= 1_000_000 else None
        add("inclusion / consistency proof ms", f"≤ {PROOF_MS_TARGET:g} at 10^6", worst, judged, where)
    generated = report.get("generate") or []
    if generated:
        from verimesh.assurance import generate_bench as gen

        big = max(generated, key=lambda r: r["plain_s"])
        judged = big["plain_s"] >= gen.MIN_JUDGED_GENERATION_S
        where = f"{big['model']}, {big['new_tokens']} tokens, generation {big['plain_s'] * 1e3:.0f} ms" + (
            "" if judged else " (too small to judge: fixed costs dominate; a larger decoder judges it)"
        )
        add("generate prove / plain generation", f"≤ {gen.PROVE_TARGET}", big["prove_over_plain"],
            big["prove_over_plain"] <= gen.PROVE_TARGET if judged else None, where)  # fmt: skip
        add("generate prove without self-check / plain", f"≤ {gen.PROVE_TARGET}", big["unchecked_over_plain"],
            big["unchecked_over_plain"] <= gen.PROVE_TARGET if judged else None, where)  # fmt: skip
        add("generate verify (all positions) / generation", f"≤ {gen.VERIFY_TARGET}", big["verify_over_generation"],
            big["verify_over_generation"] <= gen.VERIFY_TARGET if judged else None, where)  # fmt: skip
    for row in report.get("mesh") or []:
        where = f"{row['model']}, {row['nodes']} nodes, {row['tasks']} tasks, coordinator and nodes on one machine"
        add("mesh small tasks/s", f"≥ {MESH_TASKS_TARGET:g}", row["tasks_per_s"],
            row["tasks_per_s"] >= MESH_TASKS_TARGET, where)  # fmt: skip
        overhead = row["settle_p50_ms"] - row["bare_verify_ms"]
        add("coordinator overhead per task, p50 ms (settle less the bare check)", f"≤ {MESH_OVERHEAD_MS:g}", overhead,
            overhead <= MESH_OVERHEAD_MS, where)  # fmt: skip
    challenges = report.get("challenges")
    if challenges:
        default = challenges["levels"][challenges["default_level"]]
        add("challenge upload (sent packed) / full bundle, median at the default policy",
            f"≤ {challenges['target_share']:g}", default["median_sent_share"],
            default["median_sent_share"] <= challenges["target_share"],
            f"{challenges['model']}, audit level {default['level']} (the job's samples {default['samples']}), "
            f"{challenges['seeds']} challenges")  # fmt: skip
    sim = report.get("simulate")
    if sim:
        add("simulate 10^4 nodes x 10^6 jobs, s", f"≤ {sim['target_s']:g}", sim["seconds"],
            sim["seconds"] <= sim["target_s"] if sim["at_full_scale"] else None,
            f"{sim['nodes']:,} nodes, {sim['jobs']:,} jobs, in process" + ("" if sim["at_full_scale"]
            else " (quick: not the stated scale)"))  # fmt: skip
    start = report.get("startup")
    if start:
        add("verify process / python + onnxruntime + numpy", f"≤ {start['target']:g}", start["verify_over_floor"],
            start["target_met"], f"{start['model']}, bytecode cached, {start['repeats']} runs each")  # fmt: skip
    return rows


def _cell(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{0 if abs(value) >= 100 else digits}f}"


def render_markdown(report: dict[str, Any], *, command: str) -> str:
    """The generated part of docs/benchmarks.md: machine, targets, then one table per section."""
    info = report["machine"]
    lines = [
        f"Generated by `{command}` on {report['date']}"
        + (" (quick: fewer repeats and entries)" if report["quick"] else "")
        + f". Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"onnxruntime {info['onnxruntime']}, {info['platform']}.",
        "",
        "### Targets (design.md §8)",
        "",
        "| target | goal | measured | met | where |",
        "|---|---|---|---|---|",
    ]
    for row in report["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['target']} | {row['goal']} | {_cell(row['measured'])} | {met} | {row['where']} |")
    if report.get("spot"):
        lines += [
            "",
            "### Spot-check",
            "",
            "Each repeat times plain onnxruntime inference of the whole model, `Worker.prove` (warm "
            "sessions, a new bundle file) and `verify` at the default policy (mean of 3 seeds) back to "
            "back; times are medians, ratios medians of per-repeat ratios.",
            "",
            "| model | steps | repeats | inference ms | prove ms | prove / inference | verify ms "
            "| verify / inference | verify all ms | bundle KB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["spot"]:
            lines.append(
                f"| {r['model']} | {r['steps']} | {r['repeats']} | {r['inference_s'] * 1e3:.2f} | "
                f"{r['prove_s'] * 1e3:.2f} | {r['prove_overhead']:.2f} | {r['verify_s'] * 1e3:.2f} | "
                f"{r['verify_ratio']:.2f} | {r['verify_all_s'] * 1e3:.2f} | {r['bundle_bytes'] / 1024:.1f} |"
            )
    if report.get("subtasks"):
        from verimesh.assurance.subtask_bench import subtasks_table

        lines += [
            "",
            "### Sub-tasks: one job in segments by several nodes",
            "",
            "The largest spot model, proven whole by one node and split into 4 segments each proven by "
            "its own warm worker (reading its predecessor's bundle first), then verified whole and as a "
            "chain at the job's default policy (the same 3 seeds each); medians.",
            "",
            *subtasks_table(report["subtasks"]),
        ]
    if report.get("mesh"):
        from verimesh.assurance.mesh_bench import mesh_table

        lines += [
            "",
            "### Live mesh: a coordinator process and node daemons on loopback",
            "",
            "`verimesh serve` (SQLite) in its own process, the nodes as threads of the bench process, each "
            "job of the smallest spot model planned beforehand; request latencies as the nodes see them, "
            "verify+settle is the coordinator's spot check plus its ledger transaction per task.",
            "",
            *mesh_table(report["mesh"]),
        ]
    if report.get("challenges"):
        from verimesh.assurance.mesh_bench import challenge_table

        lines += [
            "",
            "### Challenge mode: bytes a node uploads per job",
            "",
            "The node's commitment (statement, trace.json, outputs) plus its answer to the challenge (the "
            "sampled steps' tensors, each with its inclusion proof), against the full bundle it would upload "
            "otherwise; challenges drawn as the coordinator draws them.",
            "",
            *challenge_table(report["challenges"]),
        ]
    if report.get("costs"):
        lines += [
            "",
            "### Step costs: estimated share against measured share of the time",
            "",
            "Each model is planned by default, then its steps are run chained with the worker's warm "
            "sessions; a step's measured share is the median over the repeats of its time over that "
            "chain's, its estimated share its cost over the plan's (what the verifier samples by). "
            f"Steps of 1 ms or more are judged: measured / estimated within {COST_RATIO_TARGET:g}× either way. "
            "The shares hold on an otherwise idle machine only (a GRU hands every time step to the "
            "thread pool, so one competing process can multiply its time): the last column says "
            "how many cores other processes kept busy meanwhile.",
            "",
            *costs_table(report["costs"]),
        ]
    if report.get("zk"):
        lines += ["", "### Zero-knowledge (ezkl)", "", *zk_table(report["zk"])]
    sig = report.get("signatures")
    if sig:
        names = sig["backends"]
        lines += [
            "",
            "### Signatures (BLS12-381, envelope = DSSE PAE of an in-toto statement)",
            "",
            "| "
            + " | ".join(f"verifications/s, {n}" for n in names)
            + f" | one envelope co-signed by {sig['signers']} (FastAggregateVerify) ms "
            f"| {sig['signers']} envelopes by {sig['signers']} nodes (AggregateVerify) ms |",
            "|" + "---|" * (len(names) + 2),
            "| "
            + " | ".join(_cell(sig[f"{n}_verifications_per_s"], 1) for n in names)
            + f" | {sig['fast_aggregate_verify_ms']:.2f} | {sig['aggregate_verify_ms']:.2f} |",
        ]
    if report.get("ledger"):
        lines += ["", "### Ledger (SQLite, WAL, synchronous FULL; proofs are medians of 200)", ""]
        lines += ledger_table(report["ledger"])
    start = report.get("startup")
    if start:
        sec = start["seconds"]
        as_is = (
            "set: an editable checkout compiles every module on every run" if start["dont_write_bytecode"] else "unset"
        )
        lines += [
            "",
            "### Start-up (whole processes, median wall seconds)",
            "",
            f'`verimesh verify` of an mlp bundle as a new process against `python -c "{FLOOR_CODE}"` (the '
            "least an onnxruntime-based verifier pays), alternated in one run; `as is`: this environment's "
            f"Python settings (PYTHONDONTWRITEBYTECODE {as_is}).",
            "",
            "| floor | verify (accept) | verify (reject) | verify / floor | as is: floor | as is: verify "
            "| as is: ratio | `--version` | `import verimesh.workflows` |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {sec['floor']:.3f} | {sec['verify_accept']:.3f} | {sec['verify_reject']:.3f} | "
            f"{start['verify_over_floor']:.2f} | {sec['as_is_floor']:.3f} | {sec['as_is_verify_accept']:.3f} | "
            f"{start['as_is_verify_over_floor']:.2f} | {sec['version']:.3f} | {sec['import_workflows']:.3f} |",
        ]
    if report.get("generate"):
        from verimesh.assurance.generate_bench import generate_table

        lines += [
            "",
            "### Generate mode (a decoder with a KV cache)",
            "",
            "Plain greedy generation (the same decode loop, committing nothing), `Worker.prove` of the "
            "generate job (records, seal, signature, bundle) and `verify` with every position checked "
            "(one prefill pass over prompt + answer), back to back with warm sessions; medians.",
            "",
            *generate_table(report["generate"]),
        ]
    if report.get("fleet"):
        from verimesh.assurance.fleet_bench import fleet_table

        lines += [
            "",
            "### Verifier fleet (verify-many's verifiers)",
            "",
            "One bundle verified N times with every step re-checked, in process and on 1 and 2 Ray verifier "
            "actors of a loopback cluster (warm sessions); medians. Ratios are bundles/s over in process.",
            "",
            *fleet_table(report["fleet"]),
        ]
    if report.get("simulate"):
        from verimesh.assurance.simulate import simulate_table

        lines += [
            "",
            "### Simulation (`verimesh simulate`'s analytic model)",
            "",
            "The protocol played for every simulated job in this process (no real sample); medians.",
            "",
            *simulate_table(report["simulate"]),
        ]
    for note in report.get("notes", []):
        lines += ["", f"Note: {note}."]
    return "\n".join(lines) + "\n"


def costs_table(reports: list[dict[str, Any]]) -> list[str]:
    """``bench_costs`` reports as markdown: one summary row per model, then one row per step."""
    met = {True: "yes", False: "**no**", None: "n/a"}
    lines = [
        "| model | steps | repeats | cost, GFLOP-eq. | chained steps ms | steps ≥ 1 ms | worst measured / estimated "
        f"| all within {COST_RATIO_TARGET:g}× | cores busy with other work |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['repeats']} | {r['total_cost'] / 1e9:.3f} | {r['total_s'] * 1e3:.2f} "
            f"| {r['judged_steps']} | {_cell(r['worst_ratio'])} | {met[r['all_within_2x']]} "
            f"| {_cell(r.get('other_cores'))} |"
        )
    lines += [
        "",
        "| model | step | nodes | main ops (by estimate) | estimated share | measured ms | measured share "
        "| measured / estimated | within 2× |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        for row in r["rows"]:
            lines.append(
                f"| {r['model']} | {row['step']} | {row['nodes']} | {row['ops']} | {row['estimated_share']:.1%} "
                f"| {row['measured_s'] * 1e3:.2f} | {row['measured_share']:.1%} | {row['ratio']:.2f} "
                f"| {met[row['within_2x']]} |"
            )
    return lines


def zk_table(rows: list[dict[str, Any]]) -> list[str]:
    """``bench_zk`` rows as a markdown table (also what ``verimesh circuit bench`` prints)."""
    lines = [
        "| model | steps | logrows | setup s | cold prove s | warm prove s | bare ezkl s | warm / bare | verify s "
        "| pk MB | proof KB | prover peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['steps']} | {max(r['logrows'])} | {r['setup_s']:.2f} | {r['cold_prove_s']:.2f} | "
            f"{r['warm_prove_s']:.2f} | {_cell(r['bare_ezkl_prove_s'])} | {_cell(r['warm_over_bare'], 3)} | "
            f"{r['verify_s']:.3f} | {r['pk_mb']:.0f} | {r['proof_kb']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return lines


def ledger_table(rows: list[dict[str, Any]]) -> list[str]:
    """``bench_ledger`` rows as a markdown table (also what ``verimesh ledger bench`` prints)."""
    lines = [
        "| entries | batch | appends/s (signed batches) | root ms | inclusion proof ms | consistency proof ms "
        "| full verify s | verify --rules s | cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rules_s = r.get("verify_rules_s")
        lines.append(
            f"| {r['entries']:,} | {r['batch']:,} | {r['appends_per_s']:,.0f} | {r['root_ms']:.2f} | "
            f"{r['inclusion_ms']:.2f} | {r['consistency_ms']:.2f} | {r['verify_s']:.1f} | "
            f"{'n/a' if rules_s is None else f'{rules_s:.1f}'} | {r.get('cores') or 'n/a'} |"
        )
    return lines


def write_markdown(path: Path, generated: str) -> None:
    """Put ``generated`` between the marks in ``path``, keeping everything outside them (the
    analysis written by hand); a file without marks is created, or gets the marks appended."""
    block = f"{BEGIN_MARK}\n\n{generated}\n{END_MARK}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if BEGIN_MARK in text and END_MARK in text:
        head, rest = text.split(BEGIN_MARK, 1)
        tail = rest.split(END_MARK, 1)[1]
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
