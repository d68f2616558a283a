"""The mesh simulated at a scale one machine cannot host: real jobs for the rates, a model for the rest.

``run_simulation`` plays the protocol (scheduling, deadlines, sampling under the audit policy,
quorum with a referee, slashing, exclusion, rewards) for ``nodes`` nodes and ``jobs`` jobs, in
two parts that check each other (docs/design.md §13):

1. **The real sample** (``real`` jobs, at least 500 by default): a small population of nodes of
   every kind in the run, each with its own BLS key, registered in a real ledger. Each job is a
   job of its own (its own id, posted with a signed deposit); its node proves it honestly or
   cheats with the red team's code, and the verifier layer runs ``verify_and_settle`` with the
   samples the ledger's policy puts in force. A node whose result is rejected is slashed through
   its evidence, excluded like the mesh excludes it, and replaced by a fresh identity of the
   same kind. An equivocating node's second result goes through real equivocation evidence and
   ``slash_with_evidence``. At the end the ledger is audited with its rules replayed.
2. **The analytic model**: the same protocol, where a check is a draw from the detection rate
   the job's own step costs and the red team's cheats give for the samples in force
   (``redteam.miss_probability`` over the steps each calibration cheat is caught at). Nodes are
   cut into shards (many simulated nodes each), each shard with its own scheduler; shards run
   in this process or on Ray actors with the same results for the same seed.

The analytic rates are then checked against the real jobs' measured rates: each strategy's
predicted detection (the table at each real trial's samples) must fall in the Wilson 95%
interval of what the real verifier did, or the report says it does not.

Cheaters are rational about the audit: a cheating node behaves honestly while every step of its
jobs is checked (there a cheat is certain to be caught) and cheats on every job once fewer are.
Strategies: ``lazy`` skips about ``lazy_fraction`` of the work (its gain: the work saved);
``perturb`` ships a wrong intermediate value, recomputed on from there (its gain: ``gain``, what
a wrong result accepted is worth to whoever paid for it); ``equivocate`` settles an honest
result and signs a second, different one for the same job (sold for ``gain``), which the job
owner's receipt check turns into equivocation evidence.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from verimesh.errors import InvalidInputError, StepExecutionError
from verimesh.jobs.job import Job, compute_job_id, new_job
from verimesh.ledger.reputation import Standing, apply, fraud_slash

HONEST = "honest"
STRATEGIES = ("lazy", "perturb", "equivocate")
KINDS = (HONEST, *STRATEGIES)
MAX_NODES = 1_000_000
MAX_JOBS = 100_000_000
MAX_AMOUNT = 10**12  # stake, reward, gain, work cost: sums over 10^8 jobs stay exact in a float
MIN_TRIALS = 5  # real trials of a strategy (and honest answers) below which its rate is not judged
ACCEPT = {"kind": "verdict", "status": "accept"}
MIN_SHARD_NODES = 100  # a shard schedules among its own nodes: fewer would be a mesh of its own
MAX_ROUNDS = 10  # times a job goes round every eligible node of its shard before it is unserved
CHECKPOINT_EVERY = 10  # real jobs between the real ledger's checkpoints


@dataclass(frozen=True)
class Config:
    nodes: int = 1000
    jobs: int = 100_000
    cheaters: tuple[tuple[str, float], ...] = (("lazy", 0.03), ("perturb", 0.01), ("equivocate", 0.005))
    audit: str = "adaptive"  # adaptive | full | K (samples beside the mandatory steps)
    stake: int = 1000
    reward: int = 1
    gain: float = 1.0
    work_cost: float = 0.5  # an honest answer's compute, as a share of the reward
    lazy_fraction: float = 0.25
    slash_fraction: str = "0.5"
    replicas: int = 1
    drop: float = 0.01  # P(a node misses a task's deadline): the task is reassigned
    real: int = 500
    seed: int = 0
    shards: int = 8
    steps: int = 6
    calibration: int = 24

    def share(self, kind: str) -> float:
        return dict(self.cheaters).get(kind, 0.0)


def parse_cheaters(spec: str) -> tuple[tuple[str, float], ...]:
    """``lazy:3%,perturb:1%,equivocate:0.5%`` (or shares as fractions: ``lazy:0.03``)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, amount = part.partition(":")
        if not sep or name not in STRATEGIES:
            raise InvalidInputError(
                f"--cheaters: {part!r} is not STRATEGY:SHARE",
                hint=f"strategies: {', '.join(STRATEGIES)}; e.g. lazy:3%,perturb:1%",
            )
        try:
            value = float(amount[:-1]) / 100 if amount.endswith("%") else float(amount)
        except ValueError:
            raise InvalidInputError(f"--cheaters: {amount!r} is not a share (3% or 0.03)") from None
        if not math.isfinite(value) or not 0 <= value <= 1:
            raise InvalidInputError(f"--cheaters: the share of {name} must be between 0 and 100%")
        if name in out:
            raise InvalidInputError(f"--cheaters names {name} twice")
        out[name] = value
    if sum(out.values()) > 1 + 1e-9:
        raise InvalidInputError("--cheaters: the shares add up to more than 100%")
    return tuple(out.items())


def parse_audit(spec: str) -> str:
    if spec in ("adaptive", "full") or (spec.isdigit() and int(spec) < 10_000):
        return spec
    raise InvalidInputError(f"--audit takes adaptive, full or a number of samples per job, not {spec!r}")


def check_config(config: Config) -> None:
    if not 1 <= config.nodes <= MAX_NODES:
        raise InvalidInputError(f"--nodes must be between 1 and {MAX_NODES}")
    if not 1 <= config.jobs <= MAX_JOBS:
        raise InvalidInputError(f"--jobs must be between 1 and {MAX_JOBS}")
    if config.replicas > config.nodes:
        raise InvalidInputError(f"--replicas {config.replicas} needs at least as many nodes")
    if config.stake < 1 or config.reward < 1:
        raise InvalidInputError("--stake and --reward must be positive whole numbers (ledger units)")
    if config.stake > MAX_AMOUNT or config.reward > MAX_AMOUNT:
        raise InvalidInputError(f"--stake and --reward must be at most {MAX_AMOUNT:.0e}")
    for name, value in (("--gain", config.gain), ("--work-cost", config.work_cost)):
        if not math.isfinite(value) or not 0 <= value <= MAX_AMOUNT:
            raise InvalidInputError(f"{name} must be a number from 0 to {MAX_AMOUNT:.0e}")
    if not 0 < config.lazy_fraction < 1:
        raise InvalidInputError("--lazy-fraction must be between 0 and 1")
    if not 0 <= config.drop < 1:
        raise InvalidInputError("--drop must be at least 0 and below 1")
    try:
        fraction = Fraction(config.slash_fraction)
    except (ValueError, ZeroDivisionError):
        raise InvalidInputError(f"--slash-fraction {config.slash_fraction!r} is not a decimal") from None
    if not 0 < fraction <= 1:
        raise InvalidInputError("--slash-fraction must be above 0 and at most 1")
    parse_audit(config.audit)


# -- the workload and its detection model ---------------------------------------------------------


def write_builtin_model(folder: Path) -> tuple[Path, Path]:
    """A seeded 7-layer MLP (ONNX, float32) and an input for it: the default simulated workload."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    widths = [32, 128, 128, 96, 64, 64, 32, 8]
    nodes, weights, x = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        weights += [
            numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array((rng.standard_normal(b) * 0.1).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
        ]
        x = f"a{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Tanh", [x], [f"h{i}"]))
            x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "verimesh-simulate-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, widths[0]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, widths[-1]])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    np.save(folder / "input.npy", rng.standard_normal((1, widths[0])).astype(np.float32))
    return folder / "model.onnx", folder / "input.npy"


@dataclass(frozen=True)
class Workload:
    """What the analytic model knows of the job (plain values: it travels to Ray actors)."""

    steps: int
    job_samples: int
    costs: tuple[int, ...]
    detection: dict[str, tuple[float, ...]]  # strategy -> P(caught) for k = 0 .. steps-1 samples
    verify_cost: tuple[float, ...]  # expected re-run cost for k samples, as a share of the whole job

    def rate(self, strategy: str, k: int) -> float:
        table = self.detection[strategy]
        return table[min(k, len(table) - 1)]


def build_workload(job: Job, cheater: Any, rng: random.Random, calibration: int, lazy_fraction: float,
                   strategies: Sequence[str] = STRATEGIES) -> Workload:  # fmt: skip
    """Detection tables from calibration cheats (not the real sample's), and expected check costs."""
    from verimesh.assurance.redteam import miss_probability
    from verimesh.spot.spotcheck import mandatory_steps, sample_steps

    steps = len(job.steps)
    costs = tuple(max(s.cost, 1) for s in job.steps)
    always = frozenset(mandatory_steps(job))
    caught: dict[str, list[frozenset[int]]] = {"lazy": [], "perturb": []}
    makers: list[tuple[str, Callable[[], Any]]] = [("lazy", lambda: cheater.lazy(lazy_fraction))] * calibration
    for index in range(max(steps - 1, 1)):
        makers.append(("perturb", partial(cheater.perturb_step, index if steps > 1 else 0)))
    for name, make in makers:
        try:
            make()
        except StepExecutionError:  # the model does not run on what this cheat changed: not a cheat it can make
            continue
        caught[name].append(cheater.caught_by(cheater.last_trace))
    for name, sets in list(caught.items()):
        if not sets and name not in strategies:
            del caught[name]  # not in the run: no table
        elif not sets:
            raise InvalidInputError(f"the {name} strategy cannot cheat on this model (no calibration cheat of it runs)",
                                    hint="simulate it without that strategy in --cheaters")  # fmt: skip
    detection = {
        name: tuple(float(np.mean([1 - miss_probability(costs, c, k, always) for c in sets])) for k in range(steps))
        for name, sets in caught.items()
    }
    detection["equivocate"] = (1.0,) * steps  # the owner's receipt check holds both statements
    total = sum(costs)
    window = job.policy.window == 2
    expected = []
    for k in range(steps):
        draws = []
        for _ in range(400):
            checked = set(sample_steps(job, k, rng))
            if window:
                checked |= {i + 1 for i in checked if i + 1 < steps}
            draws.append(sum(costs[i] for i in checked) / total)
        expected.append(float(np.mean(draws)))
    return Workload(steps, job.policy.samples, costs, detection, tuple(expected))


def copy_job(job: Job) -> Job:
    """Another job of the same model, input and policy, with its own nonce and id (the step files
    are the same files)."""
    draft = replace(job, nonce=secrets.token_hex(16), job_id="")
    return replace(draft, job_id=compute_job_id(draft.document()))


# -- the analytic model, shard by shard -----------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    index: int
    kinds: tuple[int, ...]  # an index into KINDS per node
    jobs: int
    seed: int
    config: Config
    workload: Workload
    false_positive: float  # P(an honest answer is rejected): the real sample's measured rate


def samples_in_force(audit: str, standing: Standing, work: Workload) -> int:
    if audit == "adaptive":
        return standing.samples_for(work.steps, work.job_samples)
    if audit == "full":
        return work.steps - 1
    return min(int(audit), work.steps - 1)


def run_shard(shard: Shard) -> dict[str, Any]:
    """Play ``shard.jobs`` jobs on the shard's nodes; returns counters and per-node results."""
    cfg, work, rng = shard.config, shard.workload, random.Random(shard.seed)
    n = len(shard.kinds)
    kinds = [KINDS[k] for k in shard.kinds]
    standing = [Standing(str(i)) for i in range(n)]
    stake = [cfg.stake] * n
    served, earned, spent, slashed, gains = [0] * n, [0.0] * n, [0.0] * n, [0] * n, [0.0] * n
    ejected_at, cheats, caught_count = [0] * n, [0] * n, [0] * n
    eligible, position = list(range(n)), list(range(n))
    fraction, full = Fraction(cfg.slash_fraction), work.steps - 1
    answer_cost = cfg.work_cost * cfg.reward
    totals = dict.fromkeys(("completed", "unserved", "wrong_accepted", "reassigned", "answers", "referees"), 0)
    work_units = verify_units = audit_share = 0.0

    def exclude(i: int) -> None:
        last = eligible.pop()
        if last != i:
            eligible[position[i]] = last
            position[last] = position[i]
        ejected_at[i] = served[i]

    def slash(i: int) -> None:
        amount = fraud_slash(stake[i], fraction)
        stake[i] -= amount
        slashed[i] += amount
        caught_count[i] += 1
        exclude(i)

    for _ in range(shard.jobs):
        used: set[int] = set()
        missed: set[int] = set()  # nodes that missed this job's deadline: asked again in a later round
        passed: list[tuple[int, bool, bool]] = []  # (node, its answer is wrong, it signed a second one)
        done, rounds = False, 0
        while not done:
            if len(eligible) <= len(used):
                if not missed or rounds == MAX_ROUNDS:
                    totals["unserved"] += 1
                    break
                used -= missed
                missed.clear()
                rounds += 1
            node = eligible[rng.randrange(len(eligible))]
            while node in used:
                node = eligible[rng.randrange(len(eligible))]
            used.add(node)
            if rng.random() < cfg.drop:  # missed the deadline: the lease goes to another node
                totals["reassigned"] += 1
                missed.add(node)
                continue
            kind, k = kinds[node], samples_in_force(cfg.audit, standing[node], work)
            cheat = kind != HONEST and k < full
            served[node] += 1
            totals["answers"] += 1
            audit_share += (k + 1) / work.steps
            verify_units += work.verify_cost[k]
            effort = 1 - cfg.lazy_fraction if cheat and kind == "lazy" else 1.0
            work_units += effort
            spent[node] += effort * answer_cost
            cheats[node] += cheat
            wrong = cheat and kind != "equivocate"
            if wrong and rng.random() < work.rate(kind, k):
                slash(node)
                used.discard(node)  # excluded now: ``used`` counts the eligible nodes tried
                continue
            if not cheat and rng.random() < shard.false_positive:
                slash(node)
                used.discard(node)
                continue
            passed.append((node, wrong, cheat and kind == "equivocate"))
            if len(passed) < cfg.replicas:
                continue
            if cfg.replicas > 1 and any(w for _, w, _ in passed):  # the answers disagree: the referee
                totals["referees"] += 1
                verify_units += len(passed)
                for i, w, _ in passed:
                    if w:
                        slash(i)
                        used.discard(i)
                passed = [entry for entry in passed if not entry[1]]
                if not passed:  # every answer was wrong: the task goes out again
                    continue
            done = True
        if not done:
            continue
        totals["completed"] += 1
        totals["wrong_accepted"] += any(w for _, w, _ in passed)
        for i, w, second in passed:
            earned[i] += cfg.reward
            standing[i] = apply(standing[i], ACCEPT)
            if w:
                gains[i] += cfg.gain if kinds[i] == "perturb" else 0.0  # lazy's gain is the work it saved
            if second:  # sold for the gain; the owner's receipt check makes it evidence
                gains[i] += cfg.gain
                slash(i)
    return {
        **totals,
        "work_units": work_units,
        "verify_units": verify_units,
        "audit_share": audit_share,
        "nodes": [
            {
                "kind": kinds[i],
                "served": served[i],
                "profit": earned[i] + gains[i] - spent[i] - slashed[i],
                "cheats": cheats[i],
                "caught": caught_count[i],
                "ejected_at": ejected_at[i],
                "slashed": slashed[i],
            }
            for i in range(n)
        ],
    }


def shard_seed(seed: int, index: int) -> int:
    material = hashlib.sha256(b"verimesh.simulate.v1\x00%d\x00%d" % (seed, index)).digest()
    return int.from_bytes(material[:8], "big")


def make_shards(config: Config, workload: Workload, false_positive: float) -> list[Shard]:
    """The population (its kinds in their shares, shuffled by the seed) cut into ``shards``
    contiguous shards of at least MIN_SHARD_NODES nodes (one for a smaller population), each with
    its share of the jobs."""
    rng = random.Random(shard_seed(config.seed, -1))
    counts = {name: round(config.nodes * config.share(name)) for name in STRATEGIES}
    if sum(counts.values()) > config.nodes:
        raise InvalidInputError("--cheaters leave no room for the nodes asked for")
    population = [KINDS.index(name) for name in STRATEGIES for _ in range(counts[name])]
    population += [0] * (config.nodes - len(population))
    rng.shuffle(population)
    count = max(1, min(config.shards, config.nodes // max(MIN_SHARD_NODES, config.replicas)))
    bounds = [round(i * config.nodes / count) for i in range(count + 1)]
    jobs = [
        round(config.jobs * bounds[i + 1] / config.nodes) - round(config.jobs * bounds[i] / config.nodes)
        for i in range(count)
    ]
    return [
        Shard(
            i,
            tuple(population[bounds[i] : bounds[i + 1]]),
            jobs[i],
            shard_seed(config.seed, i),
            config,
            workload,
            false_positive,
        )
        for i in range(count)
    ]


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean and its normal 95% interval (None where fewer than two values)."""
    if not values:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(statistics.fmean(values))
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n": 1}
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(values)}


def merge(config: Config, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The analytic part of the report, from every shard's counters and nodes."""
    from verimesh.assurance.redteam import wilson

    total = {
        key: sum(r[key] for r in results)
        for key in ("completed", "unserved", "wrong_accepted", "reassigned", "answers", "referees")
    }
    work = sum(r["work_units"] for r in results)
    nodes = [n for r in results for n in r["nodes"]]
    low, high = wilson(total["wrong_accepted"], max(total["completed"], 1))
    per_kind: dict[str, Any] = {}
    ejected: dict[str, Any] = {}
    to_ejection: dict[str, Any] = {}
    profit: dict[str, Any] = {}
    for kind in KINDS:
        mine = [n for n in nodes if n["kind"] == kind]
        if not mine:
            continue
        served = sum(n["served"] for n in mine)
        out = [n for n in mine if n["ejected_at"]]
        cheats, caught = sum(n["cheats"] for n in mine), sum(n["caught"] for n in mine)
        ejected[kind] = {
            "nodes": len(mine),
            "ejected": len(out),
            "share": len(out) / len(mine),
            "cheated": sum(1 for n in mine if n["cheats"]),
        }
        times = sorted(n["ejected_at"] for n in out)
        to_ejection[kind] = (
            {
                "median": statistics.median(times),
                "mean": statistics.fmean(times),
                "p90": times[int(0.9 * (len(times) - 1))],
                "max": times[-1],
                "not_ejected": len(mine) - len(out),
            }
            if times
            else {"median": None, "mean": None, "p90": None, "max": None, "not_ejected": len(mine)}
        )
        per_node = mean_ci([n["profit"] for n in mine])
        per_job = sum(n["profit"] for n in mine) / served if served else None
        profit[kind] = {"per_node": per_node, "per_job": per_job}
        per_kind[kind] = {
            "nodes": len(mine),
            "answers": served,
            "cheats": cheats,
            "caught": caught,
            "detection_rate": caught / cheats if cheats and kind != HONEST else None,
        }
    honest_per_job = profit.get(HONEST, {}).get("per_job")
    for entry in profit.values():
        entry["vs_honest_per_job"] = (
            None if entry["per_job"] is None or honest_per_job is None else (entry["per_job"] - honest_per_job)
        )
    return {
        **total,
        "wrong_accepted_per_million": 1e6 * total["wrong_accepted"] / max(total["completed"], 1),
        "wrong_accepted_per_million_ci95": [1e6 * low, 1e6 * high],
        "honest_slashed": sum(1 for n in nodes if n["kind"] == HONEST and n["slashed"]),
        "ejected": ejected,
        "jobs_to_ejection": to_ejection,
        "verification_cost_share": sum(r["verify_units"] for r in results) / work if work else 0.0,
        "audit_rate": sum(r["audit_share"] for r in results) / max(total["answers"], 1),
        "profit": profit,
        "kinds": per_kind,
    }


def run_analytic(
    config: Config, workload: Workload, false_positive: float, runner: Callable[[Sequence[Shard]], list[dict[str, Any]]]
) -> tuple[dict[str, Any], float]:
    shards = make_shards(config, workload, false_positive)
    started = time.perf_counter()
    results = runner(shards)
    seconds = time.perf_counter() - started
    return merge(config, results), seconds


def in_process(shards: Sequence[Shard]) -> list[dict[str, Any]]:
    return [run_shard(s) for s in shards]


# -- the real sample -----------------------------------------------------------------------------


@dataclass
class _RealNode:
    kind: str
    key: Any
    jobs: int = 0


@dataclass
class _Trials:
    trials: int = 0
    detected: int = 0
    predicted: list[float] = field(default_factory=list)
    wrong_accepted: int = 0
    inapplicable: int = 0  # cheats the model would not run: played honestly


def run_real(
    job: Job, cheater: Any, workload: Workload, config: Config, work: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """``config.real`` real jobs through prove, verify and ledger settlement (module docstring, 1)."""
    from verimesh.assurance.redteam import wilson
    from verimesh.errors import VerificationFailedError
    from verimesh.jobs.bundle import read_bundle
    from verimesh.ledger.store import Ledger
    from verimesh.settlement import (
        all_standings,
        audit_ledger,
        register_job,
        register_node,
        sign_request,
        slash_with_evidence,
        verify_and_settle,
    )
    from verimesh.signing.keys import generate_key
    from verimesh.spot.equivocation import write_equivocation_evidence
    from verimesh.workflows import seal_trace

    rng = random.Random(shard_seed(config.seed, -2))
    operator, owner = generate_key(), generate_key()
    ledger = Ledger.create(
        str(work / "real.db"), operator, settings={"reward": config.reward, "fraud_fraction": config.slash_fraction}
    )
    kinds = [HONEST] + [name for name in STRATEGIES if config.share(name) > 0]
    identities: dict[str, str] = {}

    def join(kind: str) -> _RealNode:
        node = _RealNode(kind, generate_key())
        request = sign_request(node.key, action="register", ledger_id=ledger.ledger_id, amount=config.stake)
        register_node(ledger, request, writer=operator)
        identities[node.key.public.node_id] = kind
        return node

    active = [join(kind) for kind in kinds for _ in range(2)]
    trials = {kind: _Trials() for kind in kinds}
    honest_rejects = honest_answers = replaced = 0
    full = workload.steps - 1
    prove_s = verify_s = 0.0
    started = time.perf_counter()
    for t in range(config.real):
        if t and t % 100 == 0:
            say(f"real sample: {t}/{config.real} jobs")
        if t % CHECKPOINT_EVERY == 0:  # what a reader re-checks is the log since the last checkpoint
            ledger.checkpoint(operator)
        this = copy_job(job)
        post = sign_request(owner, action="job", ledger_id=ledger.ledger_id, amount=config.reward, job_id=this.job_id)
        register_job(ledger, post, writer=operator)
        slot = rng.randrange(len(active))
        node = active[slot]
        node.jobs += 1
        public = node.key.public
        if config.audit == "adaptive":
            from verimesh.settlement import node_standing

            asked: Any = None
            k = node_standing(ledger, public.node_id).samples_for(workload.steps, workload.job_samples)
        elif config.audit == "full":
            asked, k = "all", full
        else:
            asked = k = min(int(config.audit), full)
        cheat = node.kind != HONEST and k < full
        cheater.retarget(this, node.key)
        tick = time.perf_counter()
        bundle = None
        try:
            if cheat and node.kind == "lazy":
                bundle = cheater.lazy(config.lazy_fraction)
            elif cheat and node.kind == "perturb":
                bundle = cheater.perturb_step(rng.randrange(full) if full else 0)
        except StepExecutionError:  # the model does not run on this cheat: the node plays this job honestly
            trials[node.kind].inapplicable += 1
            cheat = False
        if bundle is None:
            bundle = work / "honest.vmb"
            seal_trace(this, cheater.honest, key=node.key, runner=cheater.runner, out=bundle)
        traced = dict(cheater.last_trace) if cheat and node.kind != "equivocate" else None
        prove_s += time.perf_counter() - tick
        tick = time.perf_counter()
        settled = verify_and_settle(
            bundle,
            job=this,
            ledger=ledger,
            writer=operator,
            samples=asked,
            seed=rng.getrandbits(53),
            evidence_out=work / "evidence.vme",
        )
        verify_s += time.perf_counter() - tick
        in_force = full if settled.samples_in_force is None else settled.samples_in_force
        status = settled.verdict.status
        if status not in ("accept", "reject"):
            raise RuntimeError(f"the real sample's verification did not decide: {settled.verdict.reason}")
        caught = status == "reject"
        if not cheat:
            honest_answers += 1
            if caught:
                honest_rejects += 1
        if cheat:
            record = trials[node.kind]
            record.trials += 1
            record.predicted.append(workload.rate(node.kind, in_force))
            if node.kind == "equivocate":
                second = cheater.perturb_step(full)  # other outputs, beyond the tolerance
                evidence = work / "equivocation.vme"
                write_equivocation_evidence(
                    evidence,
                    job=this,
                    first=read_bundle(bundle, version=this.version),
                    second=read_bundle(second, version=this.version),
                    public=public,
                )
                try:
                    caught = slash_with_evidence(ledger, evidence, writer=operator).amount > 0
                except VerificationFailedError:
                    caught = False
                second.unlink(missing_ok=True)
            elif not caught and traced is not None and cheater.harmful(traced):
                record.wrong_accepted += 1
            record.detected += caught
        bundle.unlink(missing_ok=True)
        if caught:  # excluded, as the mesh excludes it; a fresh identity of its kind takes its place
            active[slot] = join(node.kind)
            replaced += 1
    seconds = time.perf_counter() - started
    standings = all_standings(ledger)
    honest_slashed = sum(1 for node_id, s in standings.items() if identities.get(node_id) == HONEST and s.slashed)
    audit = audit_ledger(ledger, operator=operator.public)
    strategies: dict[str, Any] = {}
    for kind, record in trials.items():
        if kind == HONEST:
            continue
        low, high = wilson(record.detected, record.trials)
        predicted = statistics.fmean(record.predicted) if record.predicted else None
        strategies[kind] = {
            "trials": record.trials,
            "detected": record.detected,
            "rate": record.detected / record.trials if record.trials else None,
            "ci95": [low, high] if record.trials else None,
            "analytic": predicted,
            "within_ci": None if predicted is None else low - 1e-9 <= predicted <= high + 1e-9,
            "wrong_accepted": record.wrong_accepted,
            "inapplicable": record.inapplicable,
        }
    low, high = wilson(honest_rejects, honest_answers)
    return {
        "jobs": config.real,
        "nodes": len(identities),
        "replaced": replaced,
        "honest": {
            "answers": honest_answers,
            "rejected": honest_rejects,
            "ci95": [low, high],
            "analytic": 0.0,
            "within_ci": low <= 1e-9,  # Wilson's lower bound at 0 successes is 0 up to rounding
        },
        "honest_slashed": honest_slashed,
        "strategies": strategies,
        "ledger_verified": bool(audit.ok),
        "ledger_entries": audit.size,
        "seconds": seconds,
        "jobs_per_s": config.real / seconds if seconds else None,
        "prove_seconds": prove_s,
        "verify_and_settle_seconds": verify_s,
    }


# -- the whole run ------------------------------------------------------------------------------


def run_simulation(
    config: Config,
    *,
    model: Path | None = None,
    input_file: Path | None = None,
    runner: Callable[[Sequence[Shard]], list[dict[str, Any]]] = in_process,
    sweep: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The report (JSON-ready): the analytic run, the real sample, and how they compare; with
    ``sweep``, also the analytic run at every fixed number of samples (for ``plot``)."""
    check_config(config)
    say = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="verimesh-simulate-") as tmp:
        work = Path(tmp)
        model, job, cheater, workload = _prepare(config, work, model, input_file, say)
        real = None
        if config.real:
            say(f"real sample: {config.real} jobs through prove, verify and ledger settlement")
            real = run_real(job, cheater, workload, config, work, say)
    false_positive = real["honest"]["rejected"] / max(real["honest"]["answers"], 1) if real else 0.0
    say(f"analytic model: {config.nodes} nodes, {config.jobs} jobs")
    analytic, seconds = run_analytic(config, workload, false_positive, runner)
    verdict, within = _judge(real)
    report: dict[str, Any] = {
        "config": {**asdict(config), "cheaters": dict(config.cheaters), "model": model.name},
        "workload": {
            "steps": workload.steps,
            "job_samples": workload.job_samples,
            "costs": list(workload.costs),
            "detection": {k: list(v) for k, v in workload.detection.items()},
            "verify_cost": list(workload.verify_cost),
        },
        **analytic,
        "honest_slashed": analytic["honest_slashed"] + (real["honest_slashed"] if real else 0),
        "honest_slashed_simulated": analytic["honest_slashed"],
        "real": real,
        "analytic_within_real_ci": within,
        "analytic_check": verdict,
        "speed": {
            "seconds": seconds,
            "simulated_jobs_per_s": config.jobs / seconds if seconds else None,
            "shards": len(make_shards(config, workload, false_positive)),
        },
    }
    if sweep:
        small = replace(config, nodes=min(config.nodes, 1000), jobs=min(config.jobs, 50_000))
        points = []
        for k in range(workload.steps):
            say(f"sweep: {k} samples per job")
            result, _ = run_analytic(replace(small, audit=str(k)), workload, false_positive, runner)
            points.append(_point(str(k), result))
        result, _ = run_analytic(small, workload, false_positive, runner)
        report["sweep"] = {
            "nodes": small.nodes,
            "jobs": small.jobs,
            "fixed": points,
            "policy": _point(config.audit, result),
        }
    return report


def _prepare(
    config: Config, work: Path, model: Path | None, input_file: Path | None, say: Callable[[str], None]
) -> tuple[Path, Job, Any, Workload]:
    """The workload's job (the built-in model unless one is given), a cheater for it, and the
    detection model calibrated on it."""
    from verimesh.assurance.redteam import _Cheater
    from verimesh.signing.keys import generate_key

    if model is None:
        model, input_file = write_builtin_model(work / "workload")
    assert input_file is not None
    job = new_job(model, input_file, work / "job.json", steps=config.steps)
    cheater = _Cheater(job, generate_key(), work, random.Random(shard_seed(config.seed, -3)))
    say(f"calibrating the detection model on {model.name} ({len(job.steps)} steps)")
    kinds = [name for name, share in config.cheaters if share > 0]
    workload = build_workload(
        job, cheater, random.Random(shard_seed(config.seed, -4)), config.calibration, config.lazy_fraction, kinds
    )
    return model, job, cheater, workload


def _judge(real: dict[str, Any] | None) -> tuple[str, bool | None]:
    """(what the comparison says, analytic_within_real_ci): None without a real sample; False
    when a rate is outside its interval, or a kind has too few real trials to judge."""
    if real is None:
        return "not checked: no real sample (--real 0)", None
    rates = {"honest (false rejects)": (real["honest"]["answers"], real["honest"]["within_ci"])}
    rates.update({kind: (s["trials"], s["within_ci"]) for kind, s in real["strategies"].items()})
    few = [f"{kind} ({count})" for kind, (count, _) in rates.items() if count < MIN_TRIALS]
    outside = [kind for kind, (count, inside) in rates.items() if count >= MIN_TRIALS and not inside]
    size = "" if real["jobs"] >= 500 else f"; a sample of {real['jobs']} jobs, where the check asks for at least 500"
    if outside:
        return f"the analytic rate of {', '.join(outside)} is OUTSIDE the real jobs' 95% interval{size}", False
    if few:
        return (
            f"not checked for {', '.join(few)}: fewer than {MIN_TRIALS} real trials (under the adaptive policy "
            f"a cheater plays 10 honest jobs first; a larger --real gives more){size}",
            False,
        )
    if not real["strategies"]:
        return f"only the honest rate was compared (no cheaters in the run): inside its 95% interval{size}", True
    return f"every analytic rate is inside the real jobs' 95% interval{size}", True


def _point(audit: str, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "audit": audit,
        "audit_rate": result["audit_rate"],
        "profit": result["profit"],
        "wrong_accepted_per_million": result["wrong_accepted_per_million"],
        "wrong_accepted_per_million_ci95": result["wrong_accepted_per_million_ci95"],
    }


def plot(report: dict[str, Any], out: Path) -> None:
    """Each strategy's profit per node (95% interval) and wrong results accepted per 10^6 jobs,
    against the share of steps checked; the chosen policy marked apart."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from verimesh.errors import BackendUnavailableError

        raise BackendUnavailableError("--plot needs matplotlib", hint="pip install matplotlib") from exc
    sweep = report["sweep"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in KINDS:
        xs, ys, errs = [], [], []
        for p in sweep["fixed"]:
            entry = p["profit"].get(kind)
            if entry and entry["per_node"]["mean"] is not None:
                xs.append(p["audit_rate"])
                ys.append(entry["per_node"]["mean"])
                ci = entry["per_node"]["ci95"] or [ys[-1], ys[-1]]
                errs.append((ys[-1] - ci[0], ci[1] - ys[-1]))
        if not xs:
            continue
        line = left.errorbar(xs, ys, yerr=np.array(errs).T, marker="o", capsize=3, label=kind)
        chosen = sweep["policy"]["profit"].get(kind)
        if chosen and chosen["per_node"]["mean"] is not None:
            left.plot(
                [sweep["policy"]["audit_rate"]],
                [chosen["per_node"]["mean"]],
                "*",
                markersize=13,
                color=line[0].get_color(),
            )
    left.axhline(0, color="grey", linewidth=0.8)
    left.set_xlabel("share of steps checked per answer")
    left.set_ylabel("profit per node over the run")
    left.set_title(f"profit by strategy (stars: --audit {sweep['policy']['audit']})")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    xs = [p["audit_rate"] for p in sweep["fixed"]]
    ys = [p["wrong_accepted_per_million"] for p in sweep["fixed"]]
    highs = [p["wrong_accepted_per_million_ci95"][1] for p in sweep["fixed"]]
    right.plot(xs, ys, "o-", label="fixed samples per job")
    right.fill_between(xs, [p["wrong_accepted_per_million_ci95"][0] for p in sweep["fixed"]], highs, alpha=0.2)
    right.plot(
        [sweep["policy"]["audit_rate"]],
        [sweep["policy"]["wrong_accepted_per_million"]],
        "*",
        markersize=13,
        label=f"--audit {sweep['policy']['audit']}",
    )
    right.set_xlabel("share of steps checked per answer")
    right.set_ylabel("wrong results accepted per 10^6 jobs")
    right.set_title(f"{sweep['nodes']} nodes, {sweep['jobs']} jobs per point")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary(report: dict[str, Any]) -> str:
    """The report as a terminal table and a few lines."""
    cfg = report["config"]
    lines = [
        f"{cfg['nodes']} nodes, {cfg['jobs']} jobs, audit {cfg['audit']}, stake {cfg['stake']}, reward "
        f"{cfg['reward']}, replicas {cfg['replicas']} ({report['speed']['seconds']:.1f} s, "
        f"{report['speed']['simulated_jobs_per_s'] or 0:,.0f} simulated jobs/s)",
        "",
        f"{'kind':<11} {'nodes':>6} {'cheats':>7} {'caught':>7} {'ejected':>8} {'jobs to ejection':>17} "
        f"{'profit/node [95% CI]':>28} {'vs honest/job':>14}",
    ]
    for kind, info in report["kinds"].items():
        ej, tte, prof = report["ejected"][kind], report["jobs_to_ejection"][kind], report["profit"][kind]
        ci = prof["per_node"]["ci95"]
        span = f"{_num(prof['per_node']['mean'])} [{_num(ci[0]) if ci else '-'}, {_num(ci[1]) if ci else '-'}]"
        median = "-" if tte["median"] is None else f"median {tte['median']:g}"
        lines.append(
            f"{kind:<11} {info['nodes']:>6} {info['cheats']:>7} {info['caught']:>7} {ej['ejected']:>8} "
            f"{median:>17} {span:>28} {_num(prof['vs_honest_per_job'], 3):>14}"
        )
    low, high = report["wrong_accepted_per_million_ci95"]
    lines += [
        "",
        f"wrong results accepted: {report['wrong_accepted']} of {report['completed']} jobs = "
        f"{report['wrong_accepted_per_million']:.1f} per 10^6 [95% CI {low:.1f}, {high:.1f}]",
        f"honest nodes slashed: {report['honest_slashed']}",
        f"verification cost: {100 * report['verification_cost_share']:.1f}% of the work "
        f"(share of steps checked per answer: {100 * report['audit_rate']:.1f}%); reassigned after a missed "
        f"deadline: {report['reassigned']}; referee calls: {report['referees']}; unserved: {report['unserved']}",
    ]
    real = report["real"]
    if real:
        lines += [
            "",
            f"real sample: {real['jobs']} jobs, {real['nodes']} identities, {real['seconds']:.1f} s "
            f"({_num(real['jobs_per_s'], 1)} jobs/s); ledger audit {'ok' if real['ledger_verified'] else 'FAILED'}, "
            f"honest rejected {real['honest']['rejected']}/{real['honest']['answers']}",
        ]
        for kind, s in real["strategies"].items():
            ci = s["ci95"]
            lines.append(
                f"  {kind:<11} detected {s['detected']}/{s['trials']}"
                + (
                    f" = {s['rate']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}], analytic {s['analytic']:.3f}: "
                    f"{'inside' if s['within_ci'] else 'OUTSIDE'}"
                    if s["trials"]
                    else ""
                )
            )
    lines.append(f"analytic model vs real jobs: {report['analytic_check']}")
    return "\n".join(lines)


# -- verimesh bench --only simulate --------------------------------------------------------------

SCALE_TARGET_S = 600.0  # a 10^4-node, 10^6-job simulation on this machine (issue 18)


def bench_simulate(*, quick: bool = False, repeats: int = 3) -> dict[str, Any]:
    """Simulated jobs/s of the analytic model in this process at 10^4 nodes x 10^6 jobs (quick:
    10^3 x 10^5), the default strategies and adaptive audit; medians over ``repeats``."""
    config = Config(nodes=1000 if quick else 10_000, jobs=100_000 if quick else 1_000_000, real=0)
    with tempfile.TemporaryDirectory(prefix="verimesh-simulate-bench-") as tmp:
        workload = _prepare(config, Path(tmp), None, None, lambda message: None)[3]
    walls = [run_analytic(config, workload, 0.0, in_process)[1] for _ in range(1 if quick else repeats)]
    wall = statistics.median(walls)
    return {"nodes": config.nodes, "jobs": config.jobs, "shards": config.shards, "repeats": len(walls),
            "seconds": wall, "simulated_jobs_per_s": config.jobs / wall,
            "at_full_scale": not quick, "target_s": SCALE_TARGET_S}  # fmt: skip


def simulate_table(row: dict[str, Any]) -> list[str]:
    return [
        "| nodes | jobs | shards | repeats | seconds | simulated jobs/s |",
        "|---|---|---|---|---|---|",
        f"| {row['nodes']:,} | {row['jobs']:,} | {row['shards']} | {row['repeats']} | {row['seconds']:.1f} "
        f"| {row['simulated_jobs_per_s']:,.0f} |",
    ]
