"""A node operator's daemon (``verimesh node run``, ``verimesh.mesh.Node``).

1. Register with the coordinator: a ledger registration signed by the node's key, with its
   declared stake (once; a restarted node is already registered and just rejoins).
2. Heartbeat in the background while it runs: a node whose heartbeat stops loses its lease.
3. Lease a task (the coordinator hands back a lease the node still holds, so a node that
   crashed and restarted resumes it), fetch the job's files by digest (each checked, kept in a
   cache folder), prove, upload for that lease, repeat. A task in challenge mode: upload the
   commitment (the signed statement, trace.json and the outputs, each proven under the root),
   then open the members the coordinator's challenge names, before its deadline. The bundle is
   kept in the work folder until then, so a node restarted with the same ``work_dir`` answers
   the challenge it owes; one that lost it gives the task back (a missed challenge).

A job the node will not run (an unsafe model, a file that does not match its digest) is given
back with its reason; it is never run, and the node is not offered that task again.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from verimesh.core.digest import sha256_bytes
from verimesh.errors import InvalidInputError
from verimesh.jobs.bundle import read_bundle, write_opening
from verimesh.jobs.job import Job
from verimesh.jobs.segments import check_ranges, segment_view
from verimesh.mesh.client import Client, MeshError
from verimesh.mesh.files import JOB_NAME, materialize
from verimesh.mesh.sandbox import Sandbox
from verimesh.signing.keys import SecretKey
from verimesh.spot.spotcheck import commitment_members
from verimesh.workflows import Worker

log = logging.getLogger("verimesh.mesh.node")

# A hook that may rewrite a bundle before it is uploaded (the red team's cheating nodes).
BundleHook = Callable[[Path, Any], None]


class Node:
    def __init__(
        self,
        coordinator: str,
        key: SecretKey,
        *,
        stake: int = 1000,
        device: str = "auto",
        work_dir: Path | None = None,
        poll: float = 0.5,
        heartbeat: float = 3.0,
        threads: int = 0,
        on_bundle: BundleHook | None = None,
        on_event: Callable[[str], None] | None = None,
        isolate: bool = True,
        srs: Path | None = None,
    ) -> None:
        self.client = Client(coordinator, key, sessions=True)
        self.key = key
        self.stake = stake
        self.device = device
        self.poll = poll
        self.heartbeat_interval = heartbeat
        self.worker = Worker(key, device=device, threads=threads, srs=srs)
        self._sandbox = Sandbox(prover_child, key, device, threads, srs) if isolate else None
        self.on_bundle = on_bundle
        self.on_event = on_event or (lambda line: log.info("%s", line))
        self._own_dir = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="verimesh-node-"))
        self.cache = self.work_dir / "blobs"
        self.cache.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self.done = 0

    def join(self) -> dict[str, Any]:
        from verimesh.jobs.runtime import resolve_device

        device = resolve_device(self.device)
        timeout = float(self.client.info().get("heartbeat_timeout", 15.0))
        self.heartbeat_interval = min(self.heartbeat_interval, max(0.1, timeout / 3))  # a beat late is no loss
        doc = self.client.register(stake=self.stake, device=device)
        self.on_event(f"node {self.key.node_id} {'registered' if doc.get('registered') else 'rejoined'} "
                      f"with {self.client.url}")  # fmt: skip
        return doc

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                self.client.heartbeat()
            except MeshError as exc:
                self.on_event(f"heartbeat failed: {exc.message}")

    def _fetch(self, task_id: str) -> Callable[[str], bytes]:
        def fetch(digest: str) -> bytes:
            cached = self.cache / digest.replace(":", "-")
            if cached.is_file():
                data = cached.read_bytes()
                if sha256_bytes(data) == digest:
                    return data
            data = self.client.file(task_id, digest)
            if sha256_bytes(data) != digest:
                raise InvalidInputError(f"the coordinator sent a file that is not {digest[:19]}…")
            partial = cached.with_suffix(".partial")
            partial.write_bytes(data)
            partial.replace(cached)
            return data

        return fetch

    def run_one(self) -> bool:
        """Lease, prove and upload one task; False when there was nothing to do."""
        lease = self.client.lease()
        if lease is None:
            return False
        task_id, lease_id = str(lease["task_id"]), str(lease["lease_id"])
        folder = Path(tempfile.mkdtemp(prefix="task-", dir=self.work_dir))
        challenged = lease.get("transfer") == "challenge"
        kept = self.work_dir / "answers" / f"{lease_id}.vmb"  # a challenge-mode bundle, until it is opened
        try:
            try:
                fetch = self._fetch(task_id)
                ranges, shard = lease.get("segments"), lease.get("shard")
                job, model = materialize(lease["files"], fetch, folder, with_model=not ranges)
                inputs_from: list[Path] = []
                if shard:  # the whole job on one row of a batch: the row, checked against what it pins
                    (job.base_dir / _shard_name(lease)).write_bytes(fetch(str(shard["input"])))
                    job = _shard_job(job, lease)
                if ranges:  # a segment: the parent's view, from its predecessors' verified bundles
                    job = segment_view(job, check_ranges(ranges, len(job.steps)), int(lease["position"]))
                    assert job.segment is not None
                    sources = {str(k) for k in job.segment.links()}
                    for position, digest in sorted(lease["inputs"].items(), key=lambda kv: int(kv[0])):
                        if position not in sources:
                            continue
                        path = folder / f"input-seg-{int(position)}.vmb"
                        path.write_bytes(fetch(str(digest)))
                        inputs_from.append(path)
                bundle = folder / "result.vmb"
                if lease.get("challenge") is not None and not kept.is_file():
                    raise InvalidInputError("it committed to this task and no longer has the bundle (restarted "
                                            "without its work folder)", code="lost-commitment")  # fmt: skip
                if job.mode == "zk":
                    self._check_srs(job)
                if not kept.is_file():
                    self.on_event(f"task {task_id[:8]}: proving job {job.job_id[:19]}… ({len(job.steps)} steps)")
                    self._prove(job.base_dir / JOB_NAME, lease, model, inputs_from, bundle, in_process=job.mode == "zk")
                    # The coordinator excludes a node whose upload it cannot read within its limits.
                    read_bundle(bundle, version=job.version)
                    if self.on_bundle is not None:
                        self.on_bundle(bundle, job)
                    if challenged:
                        kept.parent.mkdir(exist_ok=True)
                        bundle.replace(kept)
            except (InvalidInputError, OSError) as exc:  # the job's files, or this machine's: not the node's answer
                why = exc.message if isinstance(exc, InvalidInputError) else f"cannot lay out the job's files: {exc}"
                self.on_event(f"task {task_id[:8]}: will not run it ({why}); giving it back")
                self.client.release(task_id, lease_id, why)
                return True
            if challenged:
                try:
                    answer = self._answer_challenge(task_id, lease_id, kept, job, lease.get("challenge"))
                except InvalidInputError as exc:  # its own bundle unreadable now (a disk fault): it cannot answer
                    self.on_event(f"task {task_id[:8]}: cannot answer its challenge ({exc.message}); giving it back")
                    self.client.release(task_id, lease_id, exc.message)
                    kept.unlink(missing_ok=True)
                    return True
                kept.unlink(missing_ok=True)
            else:
                answer = self.client.result(task_id, lease_id, bundle.read_bytes())
            self.done += 1
            self.on_event(f"task {task_id[:8]}: uploaded ({answer.get('state')})")
        except MeshError as exc:
            if exc.status in (403, 404, 409):  # the lease is gone: nothing left to answer with this bundle
                kept.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return True

    def _check_srs(self, job: Job) -> None:
        """A zk job needs the SRS its circuit pins; a node started without one gives it back."""
        if self.worker.srs is None:
            raise InvalidInputError("a zk job, and this node has no SRS (start it with `node run --srs FILE`)",
                                    code="no-srs")  # fmt: skip
        job.load_circuit().resolve_srs(self.worker.srs)

    def _answer_challenge(self, task_id: str, lease_id: str, bundle: Path, job: Job,
                          challenge: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
        """Commit (unless a restarted node already did), then open what the challenge names."""
        full = read_bundle(bundle, version=job.version)
        if challenge is None:
            challenge = self.client.commit(task_id, lease_id, write_opening(full, commitment_members(job)))
        self.on_event(f"task {task_id[:8]}: challenged to open steps {challenge.get('steps')} "
                      f"({len(challenge['members'])} tensors)")  # fmt: skip
        try:
            opening = write_opening(full, challenge["members"])
        except InvalidInputError as exc:  # a challenge naming members this bundle lacks: not ours to answer
            raise MeshError(f"the coordinator's challenge names what no bundle holds: {exc.message}",
                            code="bad-challenge") from exc  # fmt: skip
        return self.client.open(task_id, lease_id, opening)

    def _prove(self, job_file: Path, lease: dict[str, Any], model: Path | None, inputs_from: list[Path],
               bundle: Path, *, in_process: bool = False) -> None:  # fmt: skip
        """Prove in the prover's child process, bounded by the lease's deadline (a job's model may
        run forever: the child is killed then, and the task given back). A zk job is proven here
        (``in_process``): ezkl runs in its own worker process already, bounded by its timeout."""
        message = (str(job_file), lease.get("segments"), int(lease.get("position", 0)),
                   None if model is None else str(model), [str(p) for p in inputs_from], str(bundle),
                   lease.get("shard"))  # fmt: skip
        if self._sandbox is None or in_process:
            try:
                _prove_message(self.worker, message)
            except InvalidInputError:
                raise
            except Exception as exc:
                raise InvalidInputError(f"proving failed: {type(exc).__name__}: {exc}", code="prove-failed") from exc
            return
        remaining = max(1.0, float(lease["deadline"]) - time.time())
        status, detail = self._sandbox.call(message, timeout=remaining)
        if status == "timeout":
            raise InvalidInputError(f"proving ran past the task's deadline ({remaining:.0f} s)", code="deadline")
        if status != "ok":
            raise InvalidInputError(f"proving failed: {detail or 'the prover process died'}", code="prove-failed")

    def run(self, *, max_tasks: int | None = None, idle_exit: float | None = None) -> int:
        """Serve until stopped (or ``max_tasks`` done, or idle for ``idle_exit`` s); tasks done."""
        self.join()
        beat = threading.Thread(target=self._beat, name="verimesh-heartbeat", daemon=True)
        beat.start()
        idle_since = time.monotonic()
        try:
            while not self._stop.is_set():
                if max_tasks is not None and self.done >= max_tasks:
                    break
                try:
                    worked = self.run_one()
                except MeshError as exc:
                    if exc.status == 403 and "excluded" in exc.message:
                        raise
                    if exc.status in (0, 429, 500, 502, 503):  # unreachable or busy: retry (idle meanwhile)
                        self.on_event(f"coordinator unavailable ({exc.message}); retrying")
                        self._stop.wait(max(self.poll, 1.0))
                    else:
                        self.on_event(f"refused: {exc.message}")
                    worked = False
                if worked:
                    idle_since = time.monotonic()
                elif idle_exit is not None and time.monotonic() - idle_since > idle_exit:
                    break
                else:
                    self._stop.wait(self.poll)
        finally:
            self._stop.set()
            beat.join(timeout=5)
        return self.done

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.stop()
        self.worker.close()
        if self._sandbox is not None:
            self._sandbox.close()
        self.client.close()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


_ProveMessage = tuple[str, Any, int, "str | None", list[str], str, Any]


def _shard_name(lease: dict[str, Any]) -> str:
    return f"shard-{int(lease['position'])}.npz"


def _shard_job(parent: Job, lease: dict[str, Any]) -> Job:
    """The lease's shard: the parent job on the row its input blob holds (written beside the job
    files as ``shard-K.npz``), refused unless the row is the one the shard's tensors pin."""
    from verimesh.core.tensors import TensorRef, load_input_file
    from verimesh.jobs.segments import shard_view

    shard, index = lease["shard"], int(lease["position"])
    if not isinstance(shard, dict) or not isinstance(shard.get("tensors"), list):
        raise InvalidInputError("the lease's shard is malformed")
    refs = tuple(TensorRef.from_json(t, what="shard input tensor") for t in shard["tensors"])
    values = load_input_file(parent.base_dir / _shard_name(lease), parent.model_inputs)
    if any(r.name not in values or TensorRef.of(r.name, values[r.name]) != r for r in refs):
        raise InvalidInputError("the shard's input is not the row its tensors pin")
    return shard_view(parent, int(shard.get("count", 0)), index, refs, _shard_name(lease))


def _prove_message(worker: Worker, message: _ProveMessage) -> str:
    from verimesh.jobs.job import load_job

    job_path, ranges, position, model, inputs_from, out, shard = message
    job = load_job(Path(job_path))
    if shard:
        job = _shard_job(job, {"shard": shard, "position": position})
    if ranges:
        job = segment_view(job, check_ranges(ranges, len(job.steps)), position)
    result = worker.prove(job, out=Path(out), model=None if model is None else Path(model),
                          inputs_from=[Path(p) for p in inputs_from])  # fmt: skip
    return result.root


def prover_child(key: SecretKey, device: str, threads: int, srs: Path | None = None) -> Callable[[_ProveMessage], str]:
    """The node's prover child process (``mesh.sandbox``): one warm Worker."""
    worker = Worker(key, device=device, threads=threads, srs=srs)
    return lambda message: _prove_message(worker, message)
