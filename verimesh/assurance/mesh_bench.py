"""``verimesh bench``'s mesh section: a real coordinator process and node daemons on loopback.

A coordinator (``verimesh serve`` in its own process, SQLite) and ``nodes`` node daemons
(``mesh.Node``, threads of this process, each with its own key) run ``tasks`` jobs of one small
model, each job planned beforehand by the owner (planning is the owner's cost, not the mesh's).
Measured: tasks per second from the first lease to the last verdict; every request's latency as
the node sees it (lease, file, result, heartbeat; p50/p99); the coordinator's verify-and-settle
time per task (the spot check and the ledger transaction, p50/p99) beside a bare ``verify`` of
one bundle; the bytes a task moves (files to the node, the bundle back).

``bench_challenges``: the bytes a node uploads in challenge mode (its commitment, then its answer
to the challenge: the bodies ``Node`` sends, built by the same functions) against its full bundle,
per audit level, over many challenges drawn as the coordinator draws them.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (Linux /proc; 0 where it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:  # a child is listed under the thread that started it
        for thread in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (thread / "children").read_text().split()]
    except (OSError, ValueError):
        pass
    return found


def _cpu_now(server: int) -> dict[str, float]:
    """CPU seconds so far of the coordinator's main process, its children (the verifier), and
    this process (the node daemons' threads)."""
    return {"coordinator": _cpu_seconds(server), "verifier": sum(_cpu_seconds(c) for c in _children(server)),
            "nodes": _cpu_seconds(os.getpid())}  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_mesh(model: Path, input_file: Path, *, tasks: int = 40, nodes: int = 4) -> dict[str, Any]:
    from verimesh.jobs.job import new_job
    from verimesh.mesh.client import Client, MeshError, upload_job
    from verimesh.mesh.node import Node
    from verimesh.signing.keys import generate_key, write_key_pair
    from verimesh.workflows import prove, verify

    with tempfile.TemporaryDirectory(prefix="verimesh-bench-mesh-") as tmp:
        work = Path(tmp)
        write_key_pair(work / "op.key", generate_key())
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = (work / "serve.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "verimesh", "serve", "--ledger", f"sqlite:///{work / 'mesh.db'}",
             "--operator-key", str(work / "op.key"), "--port", str(port)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            owner = Client(url, generate_key())
            for _ in range(300):
                try:
                    owner.info()
                    break
                except MeshError:
                    time.sleep(0.1)
            jobs = [new_job(model, input_file, work / f"job-{i}" / "job.json") for i in range(tasks)]
            # A bare verify of one bundle, for scale.
            key = generate_key()
            prove(jobs[0], key=key, out=work / "one.vmb", device="cpu")
            started = time.perf_counter()
            verify(work / "one.vmb", job=jobs[0], node_key=key.public)
            bare_verify = time.perf_counter() - started
            bundle_bytes = (work / "one.vmb").stat().st_size
            for job in jobs:
                path = job.base_dir / "job.json"
                files = upload_job(owner, path, input_blob=job.resolve(job.input_path).read_bytes())
                owner.submit_job(job.canonical_bytes(), files=files, deposit=10, deadline=300, max_attempts=3)
            daemons = [
                Node(url, generate_key(), device="cpu", poll=0.05, heartbeat=1.0, isolate=False) for _ in range(nodes)
            ]
            for d in daemons:
                d.join()
            threads = [threading.Thread(target=d.run, kwargs={"idle_exit": 3.0}, daemon=True) for d in daemons]
            t0 = time.perf_counter()
            cpu0 = _cpu_now(server.pid)
            for t in threads:
                t.start()
            while True:  # task counts only: the poll is the bench's, not load the mesh should carry
                counts = owner.status(jobs=0)["tasks"]
                if counts.get("done", 0) + counts.get("failed", 0) >= tasks:
                    break
                time.sleep(0.1)
            elapsed = time.perf_counter() - t0
            cpu1 = _cpu_now(server.pid)
            status = owner.status()
            for d in daemons:
                d.stop()
            for t in threads:
                t.join(timeout=30)
            settle = [float(t["verdict"]["settle_s"]) for j in status["jobs"] for t in j["tasks"]
                      if t["verdict"] and t["verdict"].get("settle_s") is not None]  # fmt: skip
            calls: dict[str, list[float]] = {}
            moved_in, moved_out = 0, 0
            for d in daemons:
                for kind, seconds, sent, received in d.client.timings:
                    calls.setdefault(kind, []).append(seconds)
                    moved_out += sent
                    moved_in += received
                d.close()
            done = status["tasks"].get("done", 0)
            return {
                "model": model.name, "tasks": tasks, "nodes": nodes, "done": done,
                "failed": status["tasks"].get("failed", 0), "elapsed_s": elapsed, "tasks_per_s": done / elapsed,
                "requests": {k: {"count": len(v), "p50_ms": _pct(v, 0.5) * 1e3, "p99_ms": _pct(v, 0.99) * 1e3,
                                 "mean_ms": statistics.fmean(v) * 1e3, "total_s": sum(v)}
                             for k, v in sorted(calls.items())},
                "settle_p50_ms": _pct(settle, 0.5) * 1e3, "settle_p99_ms": _pct(settle, 0.99) * 1e3,
                "bare_verify_ms": bare_verify * 1e3, "bundle_bytes": bundle_bytes,
                "bytes_to_nodes_per_task": moved_in / max(done, 1),
                "bytes_from_nodes_per_task": moved_out / max(done, 1),
                "settle_median_ms": statistics.median(settle) * 1e3 if settle else 0.0,
                # CPU per task done, from /proc (Linux): the bench's own polling is in "nodes".
                "cpu_ms_per_task": {k: (cpu1[k] - cpu0[k]) * 1e3 / max(done, 1) for k in cpu0},
                "cpu_cores_busy": sum(cpu1[k] - cpu0[k] for k in cpu0) / elapsed,
            }  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()


CHALLENGE_TARGET = 0.15  # challenge bytes / full bundle bytes at the default policy (issue 16)


def bench_challenges(model: Path, input_file: Path, *, seeds: int = 64) -> dict[str, Any]:
    """Upload bytes per job in challenge mode at each audit level, against the full bundle: the
    commitment plus the answer, for ``seeds`` challenges (median and largest). The default policy
    is the job's own (``samples`` 1) at the level a node in good standing reaches (MAX_LEVEL)."""
    from verimesh.core.packing import pack
    from verimesh.jobs.bundle import read_bundle, write_opening
    from verimesh.jobs.job import new_job
    from verimesh.ledger.reputation import MAX_LEVEL, samples_at
    from verimesh.signing.keys import generate_key
    from verimesh.spot.spotcheck import challenged_members, commitment_members, sample_steps, seeded_rng
    from verimesh.workflows import prove

    with tempfile.TemporaryDirectory(prefix="verimesh-bench-challenge-") as tmp:
        job = new_job(model, input_file, Path(tmp) / "job.json")
        bundle = prove(job, key=generate_key(), out=Path(tmp) / "r.vmb", device="cpu").bundle
        full_bytes = bundle.stat().st_size
        full_packed = len(pack(bundle.read_bytes()))
        full = read_bundle(bundle, version=job.version)
        body = write_opening(full, commitment_members(job))
        commitment, commitment_packed = len(body), len(pack(body))
        answers: dict[tuple[str, ...], tuple[int, int]] = {}  # members -> (bytes, packed bytes)
        levels = []
        for level in range(MAX_LEVEL + 1):
            samples = samples_at(level, job.audit_units, job.policy.samples)
            moved, sent = [], []
            for seed in range(seeds):
                members = tuple(challenged_members(job, sample_steps(job, samples, seeded_rng(seed))))
                if members not in answers:
                    opening = write_opening(full, list(members))
                    answers[members] = (len(opening), len(pack(opening)))
                moved.append(commitment + answers[members][0])
                sent.append(commitment_packed + answers[members][1])
            levels.append({"level": level, "samples": samples, "median_bytes": statistics.median(moved),
                           "max_bytes": max(moved), "median_share": statistics.median(moved) / full_bytes,
                           "max_share": max(moved) / full_bytes, "median_sent": statistics.median(sent),
                           "max_sent": max(sent), "median_sent_share": statistics.median(sent) / full_bytes,
                           "max_sent_share": max(sent) / full_bytes,
                           "median_sent_share_of_packed": statistics.median(sent) / full_packed})  # fmt: skip
    return {"model": model.name, "steps": len(job.steps), "full_bundle_bytes": full_bytes,
            "full_bundle_packed_bytes": full_packed, "input_bytes": input_file.stat().st_size,
            "commitment_bytes": commitment, "commitment_packed_bytes": commitment_packed, "seeds": seeds,
            "levels": levels, "default_level": MAX_LEVEL, "target_share": CHALLENGE_TARGET}  # fmt: skip


def challenge_table(row: dict[str, Any]) -> list[str]:
    lines = [
        f"{row['model']}: {row['steps']} steps, full bundle {row['full_bundle_bytes']} bytes "
        f"({row['full_bundle_packed_bytes']} packed, as a full transfer sends it), commitment "
        f"{row['commitment_bytes']} bytes ({row['commitment_packed_bytes']} packed); {row['seeds']} challenges "
        "per level. Shares are of the full bundle's bytes; the last column, of the full bundle packed.",
        "",
        "| audit level | steps checked beside the last | upload median bytes (share) | largest (share) "
        "| sent packed, median (share) | largest packed (share) | median packed / full packed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in row["levels"]:
        note = " (every step: leased as a full transfer)" if r["level"] == 0 else ""
        lines.append(f"| {r['level']}{note} | {r['samples']} | {r['median_bytes']:.0f} ({r['median_share']:.1%}) | "
                     f"{r['max_bytes']} ({r['max_share']:.1%}) | {r['median_sent']:.0f} "
                     f"({r['median_sent_share']:.1%}) | {r['max_sent']} ({r['max_sent_share']:.1%}) | "
                     f"{r['median_sent_share_of_packed']:.1%} |")  # fmt: skip
    return lines


def mesh_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | nodes | tasks done | tasks/s | lease p50/p99 ms | result p50/p99 ms | verify+settle p50/p99 ms "
        "| bare verify ms | bytes to node / task | bundle bytes | CPU ms / task: coordinator, verifier, nodes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        req = r["requests"]
        lease = req.get("POST /v1/lease", {"p50_ms": 0, "p99_ms": 0})
        result = req.get("POST /v1/tasks/*/result/*", {"p50_ms": 0, "p99_ms": 0})
        lines.append(
            f"| {r['model']} | {r['nodes']} | {r['done']}/{r['tasks']} | {r['tasks_per_s']:.1f} | "
            f"{lease['p50_ms']:.1f} / {lease['p99_ms']:.1f} | {result['p50_ms']:.1f} / {result['p99_ms']:.1f} | "
            f"{r['settle_p50_ms']:.1f} / {r['settle_p99_ms']:.1f} | {r['bare_verify_ms']:.1f} | "
            f"{r['bytes_to_nodes_per_task']:.0f} | {r['bundle_bytes']} | {_cpu_cell(r)} |"
        )
    return lines


def _cpu_cell(row: dict[str, Any]) -> str:
    cpu = row.get("cpu_ms_per_task") or {}
    if not cpu:
        return "-"
    return ", ".join(f"{cpu.get(k, 0.0):.0f}" for k in ("coordinator", "verifier", "nodes"))
