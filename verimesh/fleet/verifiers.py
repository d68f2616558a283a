"""Verifiers that run many verifications: in this process, or on Ray actors with warm sessions.

A ``VerifyTask`` is one bundle, its job file and the node key it must be signed by; a
``VerifyOutcome`` is its verdict (and the evidence bytes of a reject that has some). Both kinds
of verifier yield outcomes as they finish.

On Ray, each actor keeps its onnxruntime sessions warm from task to task (a ``StepRunner`` per
precision and optimization level), has one task at a time (so a task's time limit is its own), and is placed on a
GPU where the cluster has them. A task that runs past its limit gets its actor killed and
restarted, and the task an ``error`` verdict. An actor that dies mid-check is restarted by Ray
and the task re-run on it (``max_restarts``, ``max_task_retries``: verification is
deterministic given its seed, so a retry decides the same); a task whose retries are spent is an
``error``. A verdict only ever comes from a run that finished: no failure becomes an accept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from verimesh.errors import InvalidInputError
from verimesh.jobs.job import load_job
from verimesh.jobs.runtime import StepRunner
from verimesh.jobs.verdict import Check, Verdict
from verimesh.signing.keys import PublicKey
from verimesh.spot.evidence import store_evidence
from verimesh.workflows import Samples, verify

DEFAULT_TIMEOUT = 600.0
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 2


@dataclass(frozen=True)
class VerifyTask:
    label: str  # the caller's name for it (a bundle's path)
    bundle: Path
    job: Path
    node_key: PublicKey
    samples: Samples = None
    seed: int | None = None
    job_id: str | None = None  # the job the caller routed the bundle to: the job file must still be it


@dataclass(frozen=True)
class VerifyOutcome:
    label: str
    verdict: Verdict
    seconds: float
    verifier: str  # "local", or "ray:<actor>"
    evidence: bytes | None = None  # a reject's evidence file, as the verifier wrote it


def failed(label: str, why: str, verifier: str, seconds: float = 0.0) -> VerifyOutcome:
    """An ``error`` outcome: the task was not decided (never an accept)."""
    return VerifyOutcome(label, Verdict("error", (Check("verifier", False, why),)), seconds, verifier)


def run_task(task: VerifyTask, runner: Callable[[str, str], StepRunner] | None = None,
             verifier: str = "local") -> VerifyOutcome:  # fmt: skip
    """Verify one task here. Bad input (a job file that does not load, a bad sample count) is an
    ``error`` outcome; a bundle that does not parse is ``verify``'s own ``error`` verdict."""
    started = time.perf_counter()
    try:
        job = load_job(task.job)
        if task.job_id is not None and job.job_id != task.job_id:
            raise InvalidInputError(f"the job file {task.job} changed: it is no longer job {task.job_id}")
        step_runner = runner(job.policy.precision, job.policy.optimization) if runner is not None else None
        verdict = verify(task.bundle, job=job, node_key=task.node_key, samples=task.samples, seed=task.seed,
                         runner=step_runner)  # fmt: skip
    except InvalidInputError as exc:
        return failed(task.label, exc.message, verifier, time.perf_counter() - started)
    evidence = Path(verdict.evidence).read_bytes() if verdict.evidence else None
    return VerifyOutcome(task.label, verdict, time.perf_counter() - started, verifier, evidence)


def keep_evidence(outcome: VerifyOutcome) -> VerifyOutcome:
    """Put a reject's evidence into this machine's evidence store (a remote verifier wrote it
    into its own) and point the verdict at it."""
    if outcome.evidence is None:
        return outcome
    data = outcome.evidence
    path, _ = store_evidence(lambda p: p.write_bytes(data))
    return replace(outcome, verdict=replace(outcome.verdict, evidence=str(path)))


class Verifiers(Protocol):
    name: str

    def run(self, tasks: Sequence[VerifyTask], *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[VerifyOutcome]: ...

    def close(self) -> None: ...


class LocalVerifiers:
    """One verification at a time in this process (its time limit is not enforced here: a job
    whose model may not finish belongs on Ray, where an actor can be killed)."""

    name = "local"

    def run(self, tasks: Sequence[VerifyTask], *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[VerifyOutcome]:
        for task in tasks:
            yield run_task(task)

    def close(self) -> None:
        pass


class _Actor:
    """The body of a Ray verifier actor (``ray.remote`` wraps it in ``RayVerifiers``)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._runners: dict[tuple[str, str], StepRunner] = {}

    def _runner(self, precision: str, optimization: str) -> StepRunner:
        key = (precision, optimization)
        if key not in self._runners:
            self._runners[key] = StepRunner(device=self.device, precision=precision, optimization=optimization)
        return self._runners[key]

    def verify(self, task: VerifyTask, name: str) -> VerifyOutcome:
        return run_task(task, self._runner, name)

    def pid(self) -> int:
        return os.getpid()


class RayVerifiers:
    """``actors`` verifier actors on the connected Ray cluster (``fleet.cluster.ray_cluster``)."""

    name = "ray"

    def __init__(self, actors: int) -> None:
        import ray

        if actors < 1:
            raise InvalidInputError("a Ray verifier fleet needs at least one actor")
        self._ray = ray
        gpus = float(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]
        per_actor = min(1.0, gpus / actors) if gpus else 0.0
        self._cls = ray.remote(num_cpus=1, num_gpus=per_actor, max_restarts=MAX_RESTARTS,
                               max_task_retries=MAX_TASK_RETRIES)(_Actor)  # fmt: skip
        self._device = "cuda" if per_actor else "cpu"
        self.actors: list[Any] = [self._cls.remote(self._device) for _ in range(actors)]

    def _replace(self, index: int) -> None:
        self._ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._cls.remote(self._device)

    def run(self, tasks: Sequence[VerifyTask], *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[VerifyOutcome]:
        ray = self._ray
        queue = list(reversed(tasks))
        running: dict[Any, tuple[int, VerifyTask, float]] = {}  # ref -> (actor index, task, started)
        free = list(range(len(self.actors)))
        while queue or running:
            while queue and free:
                index, task = free.pop(0), queue.pop()
                ref = self.actors[index].verify.remote(task, f"ray:{index}")
                running[ref] = (index, task, time.monotonic())
            soonest = min(started for _, _, started in running.values()) + timeout
            ready, _ = ray.wait(list(running), num_returns=1, timeout=max(0.0, soonest - time.monotonic()))
            for ref in ready:
                index, task, started = running.pop(ref)
                free.append(index)
                try:
                    yield keep_evidence(ray.get(ref))
                except ray.exceptions.RayError as exc:  # its retries spent: undecided
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    self._replace(index)
                    yield failed(task.label, f"the verifier failed: {first}"[:300], f"ray:{index}",
                                 time.monotonic() - started)  # fmt: skip
            now = time.monotonic()
            for ref, (index, task, started) in list(running.items()):
                if now - started >= timeout:
                    del running[ref]
                    self._replace(index)  # the only way to stop onnxruntime mid-run
                    free.append(index)
                    yield failed(task.label, f"verification ran past {timeout:g} s", f"ray:{index}", now - started)

    def pids(self) -> list[int]:
        return [int(p) for p in self._ray.get([a.pid.remote() for a in self.actors])]

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor, no_restart=True)
        self.actors = []


def open_verifiers(kind: str, *, actors: int = 1) -> Verifiers:
    """``local`` or ``ray`` (the process must be connected to a cluster: ``ray_cluster``)."""
    if kind == "local":
        return LocalVerifiers()
    return RayVerifiers(actors)
