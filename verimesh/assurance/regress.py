"""Proof regression suites (``verimesh regress``): what a CI pipeline runs on every change.

A suite (TOML, docs/ci.md) lists cases: a model, an input, a mode and the expectations that
must hold. For each case:

1. zk: rebuild every pinned circuit step from its committed settings (no cache) and require the
   pinned verifying-key digest (circuit drift names the digest that moved).
2. Prove honestly and verify under the job's policy with the case's seed: must be accepted.
3. Budgets: prove and verify seconds, bundle bytes, and (zk) the quantization error of the
   proven outputs against onnxruntime's.
4. The built-in tamper set (``verimesh.assurance.tamper``), each verified with every step checked: none
   may be accepted.
5. Minimum detection rates for named red-team strategies (spot), measured with seeded trials.
6. Golden files made by earlier versions (``<golden>/<version>/<case>/``) must verify as they
   did when they were made: same status, same first failed check, same outputs and sampled
   steps; their evidence files must prove the same thing.

Results are values: every check has a deterministic ``reason`` and, apart, the numbers a run
measured (``measured``), so a serial and a parallel run give the same outcome (``outcome()``).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from verimesh import __version__
from verimesh.core.digest import sha256_bytes, sha256_file
from verimesh.errors import InvalidInputError, VerimeshError

GOLDEN_TYPE = "verimesh/golden"
MAX_SUITE_BYTES = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CASE_KEYS = {
    "name", "model", "input", "mode", "steps", "samples", "circuit", "srs", "tolerance_profile",
    "tamper", "detection_trials", "budget", "min_detection", "max_new_tokens",
}  # fmt: skip
_BUDGET_KEYS = (
    "max_prove_seconds", "max_verify_seconds", "max_proof_bytes", "max_quantization_error", "max_prove_ratio",
    "max_verify_ratio", "floor_seconds",
)  # fmt: skip


# -- suite file -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """What a case may cost. Time budgets are relative by default, measured against a reference
    in the same run (seconds do not travel between machines): a limit is
    ``max(ratio x reference, reference + floor)``, the reference being plain onnxruntime inference
    for a spot proof, full re-execution for a spot verification, bare ezkl witness + proof for a
    zk proof and bare ezkl verification for a zk verification. Absolute seconds remain available."""

    max_prove_seconds: float | None = None
    max_verify_seconds: float | None = None
    max_proof_bytes: int | None = None
    max_quantization_error: float | None = None
    max_prove_ratio: float | None = None
    max_verify_ratio: float | None = None
    floor_seconds: float | None = None


# Relative budgets a case gets when it names none: 3x the medians measured on the 2-core CI
# machine (docs/ci.md), the floor covering what a tiny model's fixed costs are (signing, files).
DEFAULT_RATIOS = {"spot": {"prove": 3.0, "verify": 3.0}, "zk": {"prove": 3.5, "verify": 3.0},
                  "generate": {"prove": 3.0, "verify": 3.0}}  # fmt: skip
DEFAULT_FLOOR_SECONDS = {"spot": 0.05, "zk": 1.0, "generate": 0.05}


@dataclass(frozen=True)
class Case:
    name: str
    model: Path
    input: Path
    mode: str
    steps: int | None
    samples: int
    circuit: Path | None
    srs: Path | None
    tolerance_profile: Path | None
    tamper: bool
    detection_trials: int
    budget: Budget
    min_detection: tuple[tuple[str, float], ...]
    max_new_tokens: int | None = None  # generate mode: the input is a prompt.json


@dataclass(frozen=True)
class Profile:
    cases: tuple[str, ...] | None
    detection_trials: int | None


@dataclass(frozen=True)
class Suite:
    path: Path
    name: str
    seed: int
    golden: Path
    cases: tuple[Case, ...]
    profiles: Mapping[str, Profile]

    def selected(self, profile: str | None, case: str | None = None) -> tuple[Case, ...]:
        """The cases a profile runs, with its detection trials applied (no profile: every case as
        written); ``case``: that one only."""
        if case is not None and case not in {c.name for c in self.cases}:
            raise _fail(self.path, f"no case {case!r}; cases: {', '.join(c.name for c in self.cases)}")
        picked = tuple(c for c in self.cases if case is None or c.name == case)
        if profile is None:
            return picked
        if profile not in self.profiles:
            raise _fail(self.path, f"no profile {profile!r}; profiles: {', '.join(self.profiles) or 'none'}")
        chosen = self.profiles[profile]
        cases = [c for c in picked if chosen.cases is None or c.name in chosen.cases]
        if chosen.detection_trials is not None:
            trials = chosen.detection_trials
            cases = [Case(**{**c.__dict__, "detection_trials": min(c.detection_trials, trials)}) for c in cases]
        return tuple(cases)

    def case_seed(self, case: Case) -> int:
        """A per-case seed from the suite seed and the case name (53 bits: JSON-safe)."""
        digest = sha256_bytes(f"verimesh.regress.v1\x00{self.seed}\x00{case.name}".encode())
        return int(digest.split(":")[1][:16], 16) >> 11


def _fail(path: Path, message: str) -> InvalidInputError:
    return InvalidInputError(f"suite {path}: {message}", code="invalid-suite", hint="see docs/ci.md for the format")


def _table(value: Any, what: str, path: Path, allowed: set[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, f"{what} must be a table")
    if allowed is not None:
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise _fail(path, f"{what} has unknown keys {unknown}")
    return value


def _number(value: Any, what: str, path: Path, *, integer: bool = False, low: float = 0.0) -> Any:
    number: Any = value
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    # math.isfinite only for floats: TOML integers are unbounded and overflow a float conversion.
    finite = not isinstance(value, float) or math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, kinds) or not finite or number < low:
        raise _fail(path, f"{what} must be a {'whole ' if integer else ''}number ≥ {low:g}, got {value!r}")
    return value


def _file(base: Path, value: Any, what: str, path: Path, *, folder: bool = False) -> Path:
    if not isinstance(value, str) or not value or "\x00" in value:  # a NUL byte is no path: os calls raise
        raise _fail(path, f"{what} must be a path")
    try:  # a name the file system refuses (a component over NAME_MAX, say) is no file either
        resolved = (base / value).resolve()
        found = resolved.is_dir() if folder else resolved.is_file()
    except OSError:
        found = False
    if not found:
        raise _fail(path, f"{what} {value[:200]!r} not found (paths are relative to the suite file)")
    return resolved


def _case(doc: Any, index: int, base: Path, path: Path) -> Case:
    from verimesh.assurance import generate_redteam, redteam

    doc = _table(doc, f"case #{index + 1}", path, _CASE_KEYS)
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(path, f"case #{index + 1} needs a name of letters, digits, '.', '_' or '-' (got {name!r})")
    what = f"case {name}:"
    mode = doc.get("mode", "spot")
    if mode not in ("spot", "zk", "generate"):
        raise _fail(path, f"{what} mode must be spot, zk or generate, got {mode!r}")
    if (mode == "generate") != ("max_new_tokens" in doc):
        raise _fail(path, f'{what} max_new_tokens goes with mode = "generate" (its input is a prompt.json)')
    if mode == "generate" and ("steps" in doc or "tolerance_profile" in doc):
        raise _fail(path, f"{what} a generate case is one step, the model: no steps or tolerance_profile")
    STRATEGIES = generate_redteam.STRATEGIES if mode == "generate" else redteam.STRATEGIES
    for required in ("model", "input"):
        if required not in doc:
            raise _fail(path, f"{what} needs {required}")
    budget_doc = _table(doc.get("budget", {}), f"{what} budget", path, _BUDGET_KEYS)
    budget = Budget(
        **{k: _number(v, f"{what} budget.{k}", path, integer=k == "max_proof_bytes") for k, v in budget_doc.items()}
    )
    detection = _table(doc.get("min_detection", {}), f"{what} min_detection", path, STRATEGIES)
    for strategy, rate in detection.items():
        if _number(rate, f"{what} min_detection.{strategy}", path) > 1:
            raise _fail(path, f"{what} min_detection.{strategy} is a rate between 0 and 1, got {rate}")
    if mode == "zk":
        if "circuit" not in doc:
            raise _fail(path, f"{what} zk mode needs circuit (a folder made by `verimesh circuit build`)")
        if detection:
            raise _fail(path, f"{what} min_detection measures spot-check sampling; zk cases have none")
        _check_circuit_model(base, doc, what, path)
    else:
        for key in ("circuit", "srs"):
            if key in doc:
                raise _fail(path, f'{what} {key} goes with mode = "zk"')
        if budget.max_quantization_error is not None:
            raise _fail(path, f'{what} max_quantization_error goes with mode = "zk"')
    steps = doc.get("steps")
    tamper = doc.get("tamper", True)
    if not isinstance(tamper, bool):
        raise _fail(path, f"{what} tamper must be true or false")
    return Case(
        name=name,
        model=_file(base, doc["model"], f"{what} model", path),
        input=_file(base, doc["input"], f"{what} input", path),
        mode=mode,
        steps=None if steps is None else _number(steps, f"{what} steps", path, integer=True, low=1),
        samples=_number(doc.get("samples", 1), f"{what} samples", path, integer=True),
        circuit=_file(base, doc["circuit"], f"{what} circuit", path, folder=True) if "circuit" in doc else None,
        srs=_file(base, doc["srs"], f"{what} srs", path) if "srs" in doc else None,
        tolerance_profile=(
            _file(base, doc["tolerance_profile"], f"{what} tolerance_profile", path)
            if "tolerance_profile" in doc
            else None
        ),
        tamper=tamper,
        detection_trials=_number(
            doc.get("detection_trials", 100), f"{what} detection_trials", path, integer=True, low=1
        ),
        budget=budget,
        min_detection=tuple((str(k), float(v)) for k, v in detection.items()),
        max_new_tokens=(
            _number(doc["max_new_tokens"], f"{what} max_new_tokens", path, integer=True, low=1)
            if "max_new_tokens" in doc
            else None
        ),
    )


def _check_circuit_model(base: Path, doc: dict[str, Any], what: str, path: Path) -> None:
    """A zk case's circuit must be built for its model: refused here, not after a rebuild."""
    from verimesh.jobs.circuit import load_circuit

    model, folder = (
        _file(base, doc["model"], f"{what} model", path),
        _file(base, doc["circuit"], f"{what} circuit", path, folder=True),
    )
    try:
        circuit = load_circuit(folder)
    except InvalidInputError as exc:
        raise _fail(path, f"{what} circuit {doc['circuit']!r}: {exc.message}") from exc
    if circuit.model_digest != sha256_file(model):
        raise _fail(path, f"{what} circuit {doc['circuit']!r} was built for another model than {doc['model']!r}")


def load_suite(path: Path) -> Suite:
    """Parse and check a suite file; every problem is one ``invalid-suite`` error naming the key."""
    from verimesh.core.files import read_user_file

    data = read_user_file(path, what="suite file", max_bytes=MAX_SUITE_BYTES)
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _fail(path, f"not valid TOML ({exc})") from exc
    except RecursionError as exc:  # tomllib recurses once per nested array or inline table
        raise _fail(path, "not valid TOML (nested too deeply)") from exc
    _table(doc, "the file", path, {"suite", "profile", "case"})
    head = _table(doc.get("suite", {}), "[suite]", path, {"name", "seed", "golden"})
    base = path.resolve().parent
    golden = head.get("golden", "golden")
    if not isinstance(golden, str) or not golden or "\x00" in golden:
        raise _fail(path, "[suite] golden must be a folder path")
    cases_doc = doc.get("case", [])
    if not isinstance(cases_doc, list) or not cases_doc:
        raise _fail(path, "no [[case]] tables: a suite needs at least one case")
    cases = tuple(_case(c, i, base, path) for i, c in enumerate(cases_doc))
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise _fail(path, f"case names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    profiles = {}
    for pname, pdoc in _table(doc.get("profile", {}), "[profile]", path).items():
        pdoc = _table(pdoc, f"profile {pname}", path, {"cases", "detection_trials"})
        chosen = pdoc.get("cases")
        listed = isinstance(chosen, list) and all(isinstance(c, str) for c in chosen)  # set() needs hashables
        if chosen is not None and (not listed or not set(chosen) <= set(names) or not chosen):
            raise _fail(path, f"profile {pname}: cases must list case names of this suite, got {chosen!r}")
        trials = pdoc.get("detection_trials")
        profiles[str(pname)] = Profile(
            tuple(chosen) if chosen is not None else None,
            None if trials is None else _number(trials, f"profile {pname} detection_trials", path, integer=True, low=1),
        )
    seed = _number(head.get("seed", 0), "[suite] seed", path, integer=True)
    name = head.get("name", path.stem)
    return Suite(path.resolve(), str(name), seed, (base / golden).resolve(), cases, profiles)


# -- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One expectation. ``reason`` is deterministic; ``measured`` holds what varies between runs."""

    name: str
    ok: bool
    reason: str
    measured: Mapping[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # how long the check took (JUnit's time); never part of the outcome

    def message(self) -> str:
        numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in self.measured.items())
        return f"{self.reason} ({numbers})" if numbers else self.reason

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "reason": self.reason, "measured": dict(self.measured),
                "seconds": round(self.seconds, 4)}  # fmt: skip


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class CaseResult:
    name: str
    mode: str
    checks: tuple[CheckResult, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def reported(self) -> tuple[CheckResult, ...]:
        """The checks, or one failed check saying there were none (a case with no checks fails)."""
        return self.checks or (CheckResult("no-checks", False, "the case ran no checks"),)

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.reported if not c.ok)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "checks": [c.to_json() for c in self.checks],
        }


@dataclass(frozen=True)
class Report:
    suite: str
    profile: str | None
    cases: tuple[CaseResult, ...]
    seconds: float
    machine: Mapping[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(c.ok for c in self.cases)

    def outcome(self) -> list[dict[str, Any]]:
        """What must not depend on how the suite was run: every check's name, result and reason."""
        return [
            {"case": c.name, "ok": c.ok, "checks": [(k.name, k.ok, k.reason) for k in c.checks]} for c in self.cases
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "verimesh/regress-report",
            "version": 1,
            "suite": self.suite,
            "profile": self.profile,
            "verimesh": __version__,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "machine": dict(self.machine),
            "cases": [c.to_json() for c in self.cases],
        }


# -- one case ---------------------------------------------------------------------------------------


class _CaseRun:
    """Runs the checks of one case in a scratch folder; a verimesh error fails its phase, not the run."""

    def __init__(self, suite: Suite, case: Case, work: Path, *, update_golden: bool) -> None:
        self.suite, self.case, self.work, self.update_golden = suite, case, work, update_golden
        self.seed = suite.case_seed(case)
        self.checks: list[CheckResult] = []
        self._since = time.perf_counter()

    def check(self, name: str, ok: bool, reason: str, **measured: float) -> None:
        now = time.perf_counter()
        self.checks.append(CheckResult(name, bool(ok), reason, measured, now - self._since))
        self._since = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        try:
            yield
        except VerimeshError as exc:
            self.check(name, False, exc.one_line())
        except OSError as exc:
            self.check(name, False, f"error[io-error]: {exc.strerror or exc} {exc.filename or ''}".strip())
        except Exception as exc:  # noqa: BLE001 - a suite runner reports a phase's bug and goes on, as pytest does
            self.check(name, False, f"error[internal-error]: {type(exc).__name__}: {str(exc)[:300]}")

    def run(self) -> None:
        case = self.case
        if case.mode == "zk":
            with self.phase("circuit-drift"):
                self.circuit_drift()
        with self.phase("honest"):
            self.honest()
        if case.min_detection:
            with self.phase("detection"):
                self.detection()
        if self.update_golden:
            # Golden files record what a version does when it works: never from a failing case.
            failing = [c.name for c in self.checks if not c.ok]
            if failing:
                self.check("golden-update", False, f"not written: the case fails ({', '.join(failing[:3])})")
            else:
                with self.phase("golden-update"):
                    make_golden(self.suite, case)
                    folder = golden_folder(self.suite, case)
                    self.check("golden-update", True, f"wrote {folder.parent.name}/{case.name}")
        with self.phase("golden"):
            self.golden()

    def circuit_drift(self) -> None:
        from verimesh.jobs.circuit import load_circuit
        from verimesh.zk import ezkl_backend as zk

        assert self.case.circuit is not None
        circuit = load_circuit(self.case.circuit)
        srs = circuit.resolve_srs(self.case.srs)
        for step in circuit.steps:
            pinned = ((step.model, step.model_digest), (step.settings, step.settings_digest), (step.vk, step.vk_digest))
            found = [(name, digest, sha256_file(circuit.path(name))) for name, digest in pinned]
            moved = [(name, digest, got) for name, digest, got in found if got != digest]
            if moved:  # a file edited without re-pinning it in circuit.json
                changes = "; ".join(f"{n} moved: pinned {d}, found {got}" for n, d, got in moved)
                self.check(f"circuit-drift:step-{step.index}", False, changes)
                continue
            start = time.perf_counter()
            got = zk.reproduce_verifying_key(
                circuit.path(step.model), circuit.path(step.settings), srs, pinned=step.vk_digest
            )
            ok = got == step.vk_digest
            reason = (
                f"step {step.index} vk {step.vk_digest} reproduces"
                if ok
                else f"step {step.index} vk moved: pinned {step.vk_digest}, rebuilt {got}"
            )
            self.check(f"circuit-drift:step-{step.index}", ok, reason, seconds=time.perf_counter() - start)

    def honest(self) -> None:
        from verimesh.signing.keys import generate_key
        from verimesh.workflows import Worker, verify

        case, budget = self.case, self.case.budget
        job = case_job(case, self.work / "job.json")
        key = generate_key()
        worker = Worker(key, device="cpu", srs=case.srs)
        try:
            result = worker.prove(job, out=self.work / "honest.vmb")  # cold: fills the zk key cache
            verdict = verify(result.bundle, job=job, node_key=key.public, seed=self.seed, srs=case.srs)
            self.check("honest-verify", verdict.accepted, "accepted" if verdict.accepted else _verdict_text(verdict))
            timings = _timings(job, worker, result.bundle, key, case, self.work, self.seed)
        finally:
            worker.close()
        self.time_budget("prove-seconds", timings["prove"], timings["prove_reference"], budget.max_prove_seconds,
                         budget.max_prove_ratio, "prove")  # fmt: skip
        self.time_budget("verify-seconds", timings["verify"], timings["verify_reference"], budget.max_verify_seconds,
                         budget.max_verify_ratio, "verify")  # fmt: skip
        self.budget("proof-bytes", result.bytes_written, budget.max_proof_bytes, "bytes")
        if budget.max_quantization_error is not None:
            self.budget("quantization-error", _quantization_error(job, result.bundle),
                        budget.max_quantization_error, "(relative Frobenius)")  # fmt: skip
        if case.tamper and case.mode == "generate":
            self.generate_cheats(job, key)
        elif case.tamper:
            self.tampers(job, result.bundle, key)

    def generate_cheats(self, job: Any, key: Any) -> None:
        """Generate mode: each of the red team's cheats once, verified with every position checked."""
        import random

        import numpy as np

        from verimesh.assurance.generate_redteam import STRATEGIES, _Cheater
        from verimesh.workflows import verify

        cheater = _Cheater(job, key, self.work, random.Random(self.seed))
        rng = np.random.default_rng(self.seed)
        for strategy in STRATEGIES:
            with self.phase(f"tamper:{strategy}"):
                played = cheater.play(strategy, rng)
                if played is None or played[1] < 1.0:  # nothing to attack, or a near-tie (no fraud there)
                    self.check(f"tamper:{strategy}", True, "not applicable to this job's answer")
                    continue
                verdict = verify(cheater.seal(played[0]), job=job, node_key=key.public, samples="all", seed=self.seed)
                caught = not verdict.accepted
                reason = f"{verdict.status} at {_failed_check(verdict)}" if caught else "ACCEPTED a cheating answer"
                self.check(f"tamper:{strategy}", caught, reason)

    def time_budget(
        self, name: str, value: float, reference: float, absolute: float | None, ratio: float | None, what: str
    ) -> None:
        """An absolute budget where the case gives one, else ``max(ratio x reference, reference + floor)``."""
        case = self.case
        if absolute is not None and ratio is None:
            self.budget(name, value, absolute, "s")
            return
        ratio = DEFAULT_RATIOS[case.mode][what] if ratio is None else ratio
        floor = DEFAULT_FLOOR_SECONDS[case.mode] if case.budget.floor_seconds is None else case.budget.floor_seconds
        limit = max(ratio * reference, reference + floor)
        if absolute is not None:
            limit = min(limit, absolute)
        ok = value <= limit
        rule = f"max({_fmt(ratio)} x reference, reference + {_fmt(floor)} s)" + (
            f", at most {_fmt(absolute)} s" if absolute is not None else ""
        )
        self.check(f"budget:{name}", ok, f"{'within' if ok else 'over'} budget: {rule}", value=value,
                   reference=reference, limit=limit)  # fmt: skip

    def budget(self, name: str, value: float, limit: float | None, unit: str) -> None:
        if limit is None:
            return
        ok = value <= limit
        self.check(f"budget:{name}", ok, f"{'within' if ok else 'over'} budget: max {_fmt(limit)} {unit}", value=value)

    def tampers(self, job: Any, bundle: Path, key: Any) -> None:
        from verimesh.assurance.tamper import Inapplicable, tamper_set
        from verimesh.signing.keys import generate_key
        from verimesh.workflows import verify

        other_job = case_job(self.case, self.work / "other-job.json")
        made = tamper_set(job, bundle, key=key, other_key=generate_key(), other_job=other_job,
                          work=self.work / "tamper", seed=self.seed)  # fmt: skip
        for tampered in made:
            if isinstance(tampered, Inapplicable):  # the model offers this tamper nothing to work on
                self.check(f"tamper:{tampered.name}", True, f"not applicable: {tampered.reason}")
                continue
            with self.phase(f"tamper:{tampered.name}"):
                verdict = verify(tampered.bundle, job=tampered.job, node_key=key.public, samples="all",
                                 seed=self.seed, srs=self.case.srs)  # fmt: skip
                caught = not verdict.accepted
                reason = f"{verdict.status} at {_failed_check(verdict)}" if caught else "ACCEPTED a tampered bundle"
                self.check(f"tamper:{tampered.name}", caught, reason)

    def detection(self) -> None:
        from verimesh.assurance.redteam import run_redteam

        case = self.case
        strategies = [s for s, _ in case.min_detection]
        if case.mode == "generate":
            from verimesh.assurance.generate_redteam import run_generate_redteam

            assert case.max_new_tokens is not None
            report = run_generate_redteam(case.model, case.input, max_new_tokens=case.max_new_tokens,
                                          trials=case.detection_trials, honest=1, seed=self.seed,
                                          strategies=strategies)  # fmt: skip
        else:
            report = run_redteam(case.model, case.input, trials=case.detection_trials, honest=0,
                                 samples=case.samples, steps=case.steps, seed=self.seed,
                                 strategies=strategies)  # fmt: skip
        rates = {s["strategy"]: (s["detected"], s["trials"]) for s in report["strategies"]}
        for strategy, minimum in case.min_detection:
            detected, trials = rates[strategy]
            ok = detected >= minimum * trials
            reason = f"detected {detected}/{trials} ({'≥' if ok else '<'} min {minimum:g})"
            self.check(f"detection:{strategy}", ok, reason)

    def golden(self) -> None:
        found = sorted(self.suite.golden.glob(f"*/{self.case.name}/golden.json"))
        if not found:
            self.check("golden", False, f"no golden files for this case under {self.suite.golden.name}/ "
                                        "(make them with --update-golden)")  # fmt: skip
            return
        for doc_path in found:
            with self.phase(f"golden:{doc_path.parent.parent.name}"):
                srs = case_srs(self.case)
                for name, ok, reason in check_golden(doc_path.parent, srs=srs, work=self.work):
                    self.check(f"golden:{doc_path.parent.parent.name}/{name}", ok, reason)


def _timings(job: Any, worker: Any, bundle: Path, key: Any, case: Case, work: Path, seed: int) -> dict[str, float]:
    """Warm medians of the case's proof and verification, each beside its reference measured in
    the same process and moment: plain inference and full re-execution (spot), bare ezkl (zk)."""
    from verimesh.jobs.runtime import StepRunner
    from verimesh.spot.spotcheck import run_steps
    from verimesh.workflows import verify

    def timed(fn: Callable[[], object], repeats: int) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    repeats = 3 if case.mode in ("spot", "generate") else 1
    prove = timed(lambda: worker.prove(job, out=work / "warm.vmb"), repeats)
    if case.mode == "generate":  # both against plain generation (the decode loop, committing nothing)
        from verimesh.jobs.generation import generate

        gen_runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
        blob, digest, prompt = job.read_step_model(0), job.steps[0].digest, job.read_input()["input_ids"]

        def plain() -> object:
            run = lambda feeds, names: gen_runner.run(digest, blob, feeds, names)  # noqa: E731
            return generate(run, job.generate, prompt, job.nonce, lambda _t, _row: None)

        plain()
        reference = timed(plain, repeats)
        return {"prove": prove, "prove_reference": reference, "verify_reference": reference,
                "verify": timed(lambda: verify(bundle, job=job, node_key=key.public, seed=seed), repeats)}  # fmt: skip
    if case.mode == "zk":
        from verimesh.zk import ezkl_backend as zk

        circuit = job.load_circuit()
        srs = circuit.resolve_srs(case.srs)
        inputs = job.read_input()
        prove_reference = timed(lambda: zk.bare_prove_seconds(circuit, inputs, srs), 1)
        verify_s = timed(lambda: verify(bundle, job=job, node_key=key.public, seed=seed, srs=case.srs), repeats)
        verify_reference = timed(lambda: zk.bare_verify_seconds(circuit, bundle, srs), 1)
        return {"prove": prove, "prove_reference": prove_reference, "verify": verify_s,
                "verify_reference": verify_reference}  # fmt: skip
    runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
    model = job.resolve(job.model_path).read_bytes()
    inputs = job.read_input()
    names = list(job.output_names)
    runner.run("plain-" + job.model_digest, model, inputs, names)  # warm-up: the session is made once
    verify(bundle, job=job, node_key=key.public, runner=runner, samples="all", seed=seed)
    return {
        "prove": prove,
        "prove_reference": timed(lambda: runner.run("plain-" + job.model_digest, model, inputs, names), repeats),
        "verify": timed(lambda: verify(bundle, job=job, node_key=key.public, runner=runner, seed=seed), repeats),
        "verify_reference": timed(lambda: run_steps(job, None, inputs, runner), repeats),
    }


def case_job(case: Case, out: Path, *, circuit: Path | None = None) -> Any:
    """A fresh job for the case (its own nonce, so its own job id), written to ``out``; ``circuit``
    overrides the case's (golden files carry a copy of it)."""
    from verimesh.jobs.job import new_job

    if case.mode == "generate":
        from verimesh.jobs.generate_job import new_generate_job

        assert case.max_new_tokens is not None
        return new_generate_job(case.model, case.input, out, max_new_tokens=case.max_new_tokens)
    return new_job(case.model, case.input, out, mode=case.mode, steps=case.steps, samples=case.samples,
                   circuit=circuit or case.circuit, profile=case.tolerance_profile)  # fmt: skip


def case_srs(case: Case) -> Path | None:
    """The SRS of a zk case: its ``srs``, else the one its circuit records (golden copies of the
    circuit cannot find it through their recorded relative path)."""
    if case.mode != "zk" or case.srs is not None:
        return case.srs
    from verimesh.jobs.circuit import load_circuit

    assert case.circuit is not None
    return load_circuit(case.circuit).resolve_srs()


def _verdict_text(verdict: Any) -> str:
    return f"{verdict.status} at {_failed_check(verdict)}: {verdict.reason}"


def _failed_check(verdict: Any) -> str:
    failed = [c.name for c in verdict.checks if not c.ok]
    return failed[0] if failed else "no failed check"


def _quantization_error(job: Any, bundle: Path) -> float:
    """Largest relative Frobenius error of the proven (dequantized) outputs against onnxruntime's."""
    import numpy as np

    from verimesh.jobs.bundle import read_bundle
    from verimesh.jobs.runtime import StepRunner
    from verimesh.spot.spotcheck import run_steps

    reference = run_steps(job, None, job.read_input(), StepRunner(device="cpu"))
    claimed = read_bundle(bundle).tensors
    worst = 0.0
    for name in job.output_names:
        ref = np.asarray(reference[name], dtype=np.float64)
        err = np.linalg.norm(np.asarray(claimed[name], dtype=np.float64) - ref) / max(float(np.linalg.norm(ref)), 1e-30)
        worst = max(worst, float(err))
    return worst


def run_case(suite: Suite, case: Case, *, update_golden: bool = False) -> CaseResult:
    """Run one case's checks (numbered in the module docstring) and return their results."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="verimesh-regress-") as tmp:
        runner = _CaseRun(suite, case, Path(tmp), update_golden=update_golden)
        runner.run()
    return CaseResult(case.name, case.mode, tuple(runner.checks), time.perf_counter() - start)


def _run_case_in_worker(suite_path: str, profile: str | None, name: str, update_golden: bool) -> CaseResult:
    suite = load_suite(Path(suite_path))
    case = next(c for c in suite.selected(profile) if c.name == name)
    return run_case(suite, case, update_golden=update_golden)


Event = Callable[[str, CaseResult | None], None]


def run_suite(
    suite: Suite,
    *,
    profile: str | None = None,
    jobs: int = 1,
    update_golden: bool = False,
    on_event: Event | None = None,
    only: str | None = None,
) -> Report:
    """Run the cases of ``profile`` (serially, or in ``jobs`` processes); results keep suite order.

    ``on_event(name, None)`` when a case starts (serial runs), ``on_event(name, result)`` when it ends."""
    from verimesh.assurance.bench import machine

    cases = suite.selected(profile, only)
    tell = on_event or (lambda name, result: None)
    start = time.perf_counter()
    results: dict[str, CaseResult] = {}
    if jobs <= 1:
        for case in cases:
            tell(case.name, None)
            results[case.name] = run_case(suite, case, update_golden=update_golden)
            tell(case.name, results[case.name])
    else:
        # spawn: onnxruntime and ezkl hold threads that a fork would copy half-way.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {
                pool.submit(_run_case_in_worker, str(suite.path), profile, c.name, update_golden): c.name for c in cases
            }
            for name in futures.values():
                tell(name, None)
            for future in as_completed(futures):
                name = futures[future]
                try:
                    results[name] = future.result()
                except BrokenProcessPool as exc:  # killed (OOM, signal): the case fails, the report stands
                    mode = next(c.mode for c in cases if c.name == name)
                    died = CheckResult("worker-process", False, f"the process running the case died ({exc})")
                    results[name] = CaseResult(name, mode, (died,), 0.0)
                tell(name, results[name])
    ordered = tuple(results[c.name] for c in cases)
    return Report(suite.name, profile, ordered, time.perf_counter() - start, machine())


# -- golden files -----------------------------------------------------------------------------------


def golden_folder(suite: Suite, case: Case) -> Path:
    return suite.golden / f"v{__version__}" / case.name


def make_golden(suite: Suite, case: Case) -> Path:
    """Write this version's golden files for ``case``: the job, the node's public key, an honest
    bundle, a fraudulent one (and for spot its evidence file), and the verdicts they get now."""
    from verimesh.assurance.tamper import Tamperer
    from verimesh.signing.keys import generate_key, write_public_key
    from verimesh.spot.evidence import check_evidence
    from verimesh.workflows import prove, verify

    folder = golden_folder(suite, case)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    circuit = None
    if case.circuit is not None:
        from verimesh.jobs.circuit import load_circuit
        from verimesh.zk.ezkl_backend import copy_circuit

        # A copy: the golden bundle was proven against this circuit, whatever circuits/ holds later.
        circuit = folder / "circuit"
        copy_circuit(load_circuit(case.circuit), circuit)
    job = case_job(case, folder / "job.json", circuit=circuit)
    key = generate_key()
    write_public_key(folder / "node.pub", key.public)
    srs = case_srs(case)
    prove(job, key=key, out=folder / "honest.vmb", device="cpu", srs=srs)
    seed = suite.case_seed(case)
    with tempfile.TemporaryDirectory(prefix="verimesh-golden-") as tmp:
        other = case_job(case, Path(tmp) / "other.json", circuit=circuit)
        if case.mode == "generate":  # an answer whose last token was edited to another decisive one
            _generate_fraud(job, key, folder / "fraud.vmb", Path(tmp), seed)
        else:
            tamperer = Tamperer(job, key=key, other_key=generate_key(), other_job=other, seed=seed)
            cheat = "output-perturbed" if case.mode == "spot" else "claimed-output-not-proven"
            tamperer.make(cheat, folder / "honest.vmb", folder / "fraud.vmb")
    entries: list[dict[str, Any]] = []
    for bundle in ("honest.vmb", "fraud.vmb"):
        evidence = folder / "fraud.vme" if bundle == "fraud.vmb" and case.mode != "zk" else None
        verdict = verify(folder / bundle, job=job, node_key=key.public, seed=seed, evidence_out=evidence,
                         srs=srs)  # fmt: skip
        entries.append({"bundle": bundle, "seed": seed, "expect": _verdict_record(verdict)})
        if evidence is not None:
            if verdict.evidence is None:
                raise InvalidInputError(f"case {case.name}: the fraudulent golden bundle left no evidence")
            result = check_evidence(evidence)
            entries.append({"evidence": evidence.name, "expect": _evidence_record(result)})
    doc = {
        "type": GOLDEN_TYPE,
        "version": 1,
        "verimesh": __version__,
        "case": case.name,
        "mode": case.mode,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "job": "job.json",
        "node_key": "node.pub",
        "checks": entries,
    }
    (folder / "golden.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return folder


def _generate_fraud(job: Any, key: Any, out: Path, work: Path, seed: int) -> None:
    import random

    import numpy as np

    from verimesh.assurance.generate_redteam import _Cheater

    cheater = _Cheater(job, key, work, random.Random(seed))
    for _ in range(50):
        played = cheater.play("edited-token", np.random.default_rng(seed))
        if played is not None and played[1] == 1.0:
            shutil.copyfile(cheater.seal(played[0]), out)
            return
    raise InvalidInputError("the golden answer has no decisive position to edit")


def _verdict_record(verdict: Any) -> dict[str, Any]:
    return {
        "status": verdict.status,
        "failed_check": None if verdict.accepted else _failed_check(verdict),
        "outputs": dict(sorted(verdict.outputs.items())),
        "sampled_steps": list(verdict.sampled_steps),
    }


def _evidence_record(result: Any) -> dict[str, Any]:
    return {"proves_fraud": result.proves_fraud, "kind": result.kind, "node_id": result.node_id}


def check_golden(folder: Path, *, srs: Path | None, work: Path) -> list[tuple[str, bool, str]]:
    """Verify one golden folder as recorded; returns (file, ok, reason) per recorded check."""
    from verimesh.core.canonical import parse_json
    from verimesh.core.files import read_user_file
    from verimesh.jobs.job import load_job
    from verimesh.signing.keys import load_public_key
    from verimesh.spot.evidence import check_evidence
    from verimesh.workflows import verify

    path = folder / "golden.json"
    try:
        # Bounded in size and depth: a golden folder may come from anywhere (a pull request).
        doc = parse_json(read_user_file(path, what="golden file", max_bytes=1 << 20), what=f"golden file {path}")
        if not isinstance(doc, dict) or doc.get("type") != GOLDEN_TYPE or doc.get("version") != 1:
            raise InvalidInputError(f"{path} is not a verimesh golden file (type/version)")
        job = load_job(folder / _plain(doc["job"]))
        public = load_public_key(folder / _plain(doc["node_key"]))
        entries = list(doc["checks"])
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("expect"), dict):
                raise InvalidInputError(f"{path}: each check must be an object with an expect object")
            if not ("bundle" in entry and isinstance(entry.get("seed"), int)) and "evidence" not in entry:
                raise InvalidInputError(f"{path}: each check names a bundle (with a seed) or an evidence file")
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{path} is malformed ({exc})") from exc
    results = []
    for entry in entries:
        if "bundle" in entry:
            name = _plain(entry["bundle"])
            verdict = verify(folder / name, job=job, node_key=public, seed=int(entry["seed"]),
                             evidence_out=work / "golden.vme", srs=srs)  # fmt: skip
            got, want = _verdict_record(verdict), entry["expect"]
        else:
            name = _plain(entry["evidence"])
            got, want = _evidence_record(check_evidence(folder / name)), entry["expect"]
        moved = sorted(k for k in want if got.get(k) != want[k])
        if not moved:
            results.append((name, True, f"verifies as recorded ({_summary(want)})"))
        else:
            changes = "; ".join(f"{k}: recorded {want[k]!r}, now {got.get(k)!r}" for k in moved)
            results.append((name, False, f"no longer verifies as recorded: {changes}"))
    if not results:
        raise InvalidInputError(f"{path} records no checks")
    return results


def _plain(name: Any) -> str:
    """A file name inside the golden folder (no path separators: a golden file cannot point elsewhere)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInputError(f"golden file name {name!r} must be a plain file name")
    return str(name)


def _summary(record: Mapping[str, Any]) -> str:
    if "status" in record:
        return str(record["status"]) + (f" at {record['failed_check']}" if record.get("failed_check") else "")
    return f"{record['kind']}, proves fraud: {record['proves_fraud']}"


# -- reports ----------------------------------------------------------------------------------------


def junit_xml(report: Report) -> bytes:
    """JUnit XML: one testsuite, one testcase per check (classname = the case)."""
    failures = sum(len(c.failures) for c in report.cases)
    tests = sum(len(c.reported) for c in report.cases)
    root = ElementTree.Element("testsuites", name=f"verimesh regress {report.suite}", tests=str(tests),
                               failures=str(failures), time=f"{report.seconds:.3f}")  # fmt: skip
    suite = ElementTree.SubElement(root, "testsuite", name=report.suite, tests=str(tests), failures=str(failures),
                                   errors="0", skipped="0", time=f"{report.seconds:.3f}")  # fmt: skip
    for case in report.cases:
        for check in case.reported:
            element = ElementTree.SubElement(suite, "testcase", classname=f"regress.{case.name}", name=check.name,
                                             time=f"{check.seconds:.3f}")  # fmt: skip
            if not check.ok:
                failure = ElementTree.SubElement(element, "failure", message=check.message(), type="regression")
                failure.text = f"{case.name}: {check.name}: {check.message()}"
    ElementTree.indent(root)
    return bytes(ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)) + b"\n"


def markdown_summary(report: Report) -> str:
    """A summary fit for a CI job page: verdict line, one row per case, then every failure."""
    held = sum(c.ok for c in report.cases)
    head = "✅ every case holds" if report.ok else f"❌ {len(report.cases) - held} of {len(report.cases)} cases failed"
    lines = [
        f"## verimesh regress: {report.suite}" + (f" (profile {report.profile})" if report.profile else ""),
        "",
        f"{head} — verimesh {__version__}, {report.seconds:.1f} s on {report.machine.get('cores', '?')} cores",
        "",
        "| case | mode | result | checks | prove s | verify s | bundle bytes |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for case in report.cases:
        by_name = {c.name: c for c in case.checks}
        prove, verify = by_name.get("budget:prove-seconds"), by_name.get("budget:verify-seconds")
        size = by_name.get("budget:proof-bytes")
        prove_s, verify_s, size_s = (_fmt(c.measured["value"]) if c else "-" for c in (prove, verify, size))
        passed = sum(c.ok for c in case.checks)
        lines.append(f"| {case.name} | {case.mode} | {'pass' if case.ok else '**FAIL**'} | "
                     f"{passed}/{len(case.checks)} | {prove_s} | {verify_s} | {size_s} |")  # fmt: skip
    failed = [(case, check) for case in report.cases for check in case.failures]
    if failed:
        lines += ["", "### Failures", ""]
        lines += [f"- **{case.name}** `{check.name}`: {check.message()}" for case, check in failed]
    return "\n".join(lines) + "\n"
