"""The verifier fleet: `verimesh verify-many` in process and on a local Ray cluster (loopback only),
actors killed mid-check and verifications past their time limit (never an accept), keys from a
ledger. One Ray cluster per test module (it takes seconds to start on two cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import Keys, input_path, model_path, one_ray_cluster
from tests.integration.test_ledger import join, new_ledger, post
from verimesh.cli.app import cli
from verimesh.errors import InvalidInputError
from verimesh.fleet.cluster import parse_verifiers, ray_cluster
from verimesh.fleet.verifiers import RayVerifiers, VerifyTask, run_task
from verimesh.jobs.job import Job
from verimesh.jobs.runtime import StepRunner
from verimesh.signing.keys import load_public_key
from verimesh.spot.spotcheck import run_steps
from verimesh.workflows import prove, seal_trace


@pytest.fixture(scope="module", autouse=True)
def _ray_turn() -> Iterator[None]:
    """Every test here starts a Ray cluster (or the module's): the module takes its turn whole."""
    with one_ray_cluster():
        yield


def cheat(job: Job, keys: Keys, out: Path) -> Path:
    """A node that shifts one output value and signs it (rejected at the last step's check)."""
    runner = StepRunner(device="cpu", precision=job.policy.precision, optimization=job.policy.optimization)
    trace = run_steps(job, None, job.read_input(), runner)
    name = job.output_names[0]
    forged = np.array(trace[name])
    forged.reshape(-1)[0] += forged.dtype.type(0.5)
    trace[name] = forged
    seal_trace(job, trace, key=keys.node, runner=runner, out=out)
    return out


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory, jobs: dict[str, Job], keys: Keys) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("batch")
    out = {
        "mlp": d / "mlp.vmb", "rescnn": d / "rescnn.vmb", "transformer": d / "transformer.vmb",
        "foreign": d / "foreign.vmb", "cheat": d / "cheat.vmb", "junk": d / "junk.vmb",
    }  # fmt: skip
    for name in ("mlp", "rescnn", "transformer"):
        prove(jobs[name], key=keys.node, out=out[name], device="cpu")
    prove(jobs["mlp"], key=keys.other, out=out["foreign"], device="cpu")
    cheat(jobs["rescnn"], keys, out["cheat"])
    out["junk"].write_bytes(b"not a bundle at all")
    return out


def _folder_of(jobs: dict[str, Job]) -> Path:
    """The session's job files: one folder, <name>.json each (tests/conftest.py)."""
    return jobs["mlp"].base_dir


def job_file(jobs: dict[str, Job], name: str) -> Path:
    return jobs[name].base_dir / f"{name}.json"


def run_cli(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["verify-many", *args, "--json"])
    return result.exit_code, json.loads(result.output)


def verdicts(report: dict) -> dict[str, str]:
    return {Path(r["bundle"]).stem: r["verdict"] for r in report["results"]}


EXPECTED = {"mlp": "accept", "rescnn": "accept", "transformer": "accept", "foreign": "reject", "cheat": "reject",
            "junk": "error"}  # fmt: skip


def test_verify_many_in_process(batch: dict[str, Path], jobs: dict[str, Job], keys: Keys) -> None:
    folder = _folder_of(jobs)
    code, report = run_cli(*map(str, batch.values()), "--jobs-from", str(folder), "--node-key", str(keys.node_pub))
    assert code == 1 and verdicts(report) == EXPECTED
    cheat_row = next(r for r in report["results"] if r["bundle"].endswith("cheat.vmb"))
    assert cheat_row["evidence"] and Path(cheat_row["evidence"]).is_file()
    assert report["summary"] == {**report["summary"], "bundles": 6, "accept": 3, "reject": 2, "error": 1}
    # every bundle accepted: 0; nothing rejected but one not verifiable: 3
    honest = [str(batch[n]) for n in ("mlp", "rescnn")]
    assert run_cli(*honest, "--jobs-from", str(folder), "--node-key", str(keys.node_pub))[0] == 0
    code, report = run_cli(*honest, str(batch["junk"]), "--jobs-from", str(folder), "--node-key", str(keys.node_pub))
    assert code == 3 and verdicts(report)["junk"] == "error"


def test_a_job_that_is_not_in_the_folder_is_not_verified(batch: dict[str, Path], tmp_path: Path, keys: Keys) -> None:
    (tmp_path / "notes.json").write_text('{"not": "a job"}')
    code, report = run_cli(str(batch["mlp"]), "--jobs-from", str(tmp_path), "--node-key", str(keys.node_pub))
    assert code == 3 and report["results"][0]["verdict"] == "error" and "no job" in report["results"][0]["reason"]


def test_keys_and_policy_from_a_ledger(batch: dict[str, Path], jobs: dict[str, Job], keys: Keys,
                                       tmp_path: Path) -> None:  # fmt: skip
    """--ledger: the signer must be registered; an unregistered one is not verified (exit 3) and
    nothing is written to the ledger (read only)."""
    led = new_ledger(tmp_path / "l.db")
    join(led, keys.node, 100)
    post(led, jobs["mlp"].job_id)
    size = led.size()
    url = f"sqlite:///{tmp_path / 'l.db'}"
    folder = _folder_of(jobs)
    code, report = run_cli(str(batch["mlp"]), str(batch["cheat"]), "--jobs-from", str(folder), "--ledger", url)
    assert code == 1 and verdicts(report) == {"mlp": "accept", "cheat": "reject"}
    code, report = run_cli(str(batch["foreign"]), "--jobs-from", str(folder), "--ledger", url)
    assert code == 3 and "register" in report["results"][0]["reason"]
    assert led.size() == size


def test_usage_errors(batch: dict[str, Path], jobs: dict[str, Job], keys: Keys) -> None:
    folder = str(_folder_of(jobs))
    both = CliRunner().invoke(cli, ["verify-many", str(batch["mlp"]), "--jobs-from", folder])
    assert both.exit_code == 2
    bad = CliRunner().invoke(cli, ["verify-many", str(batch["mlp"]), "--jobs-from", folder, "--node-key",
                                   str(keys.node_pub), "--verifiers", "spark"])  # fmt: skip
    assert bad.exit_code == 3 and "--verifiers" in bad.output
    assert parse_verifiers("ray://10.0.0.1:10001") == ("ray", "ray://10.0.0.1:10001")
    assert parse_verifiers("local") == ("local", None)
    with pytest.raises(InvalidInputError):
        parse_verifiers("ray:/x")


def test_verify_many_on_ray_matches_in_process(batch: dict[str, Path], jobs: dict[str, Job], keys: Keys) -> None:
    """A real CLI process starting its own loopback cluster: the same verdicts and, with one seed, the
    same sampled steps as in process."""
    folder = str(_folder_of(jobs))
    args = [*map(str, batch.values()), "--jobs-from", folder, "--node-key", str(keys.node_pub), "--seed", "7"]
    local = run_cli(*args)[1]
    proc = subprocess.run([sys.executable, "-m", "verimesh", "verify-many", *args, "--verifiers", "ray",
                           "--actors", "2", "--json"], capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    remote = json.loads(proc.stdout)
    assert verdicts(remote) == EXPECTED
    steps = {r["bundle"]: r["sampled_steps"] for r in local["results"]}
    assert {r["bundle"]: r["sampled_steps"] for r in remote["results"]} == steps
    assert "Ray verifier actors on a local loopback Ray cluster" in remote["summary"]["verifiers"]
    assert {r["verifier"] for r in remote["results"] if r["verdict"] != "error"} <= {"ray:0", "ray:1"}


def test_bench_fleet_section(tmp_path: Path) -> None:
    """`bench --only fleet`: in process vs 1 and 2 Ray actors, a table and JSON (before the module's
    cluster starts: one Ray connection per process)."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        cli, ["bench", str(model_path("mlp")), "--quick", "--only", "fleet", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())["fleet"][0]
    assert row["bundles"] == 20 and row["in_process"]["bundles_per_s"] > 0 and row["cluster_start_s"] > 0
    assert row["ray_1"]["over_in_process"] > 0 and row["ray_2"]["bundles_per_s"] > 0
    assert "2 Ray actors bundles/s" in result.output


# -- the fleet in process: one loopback cluster for the rest of the module ----------------------------


def _listening() -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket on this machine (/proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address, port = fields[1].rsplit(":", 1)
            found.add((address, int(port, 16)))
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[set[tuple[str, int]]]:
    before = _listening()
    with ray_cluster(num_cpus=2) as info:
        assert info.local and info.address.startswith("127.0.0.1:")
        yield _listening() - before


def test_a_local_cluster_listens_on_loopback_only(cluster: set[tuple[str, int]]) -> None:
    assert cluster, "the cluster opened no listening sockets?"
    assert {address for address, _ in cluster} <= LOOPBACK, cluster


def test_an_actor_killed_mid_check_never_yields_an_accept(cluster: object, batch: dict[str, Path],
                                                          jobs: dict[str, Job], keys: Keys) -> None:  # fmt: skip
    """Ray restarts the actor and runs the task again: the verdict is the one a finished run gives
    (a reject stays a reject), or an error once the retries are spent. The kill lands while the
    one actor works through 400 checks (one is always in flight but for the gaps between them)."""
    fleet = RayVerifiers(1)
    try:
        before = fleet.pids()
        public = load_public_key(keys.node_pub)
        tasks = [task for i in range(200) for task in (
            VerifyTask(f"cheat-{i}", batch["cheat"], job_file(jobs, "rescnn"), public, "all"),
            VerifyTask(f"honest-{i}", batch["transformer"], job_file(jobs, "transformer"), public, "all"))]  # fmt: skip
        got: dict[str, str] = {}
        consumer = threading.Thread(target=lambda: got.update((o.label, o.verdict.status)
                                                              for o in fleet.run(tasks, timeout=120)))  # fmt: skip
        consumer.start()
        deadline = time.monotonic() + 120
        while len(got) < 10 and time.monotonic() < deadline:  # at work, its sessions warm
            time.sleep(0.01)
        assert 10 <= len(got) < len(tasks) - 50
        os.kill(before[0], 9)
        consumer.join(timeout=180)
        assert len(got) == len(tasks)
        for label, status in got.items():
            assert status in (("reject", "error") if label.startswith("cheat") else ("accept", "error")), (label, got)
        assert fleet.pids() != before  # it was killed, and a fresh one answers
        finished = {o.label: o.verdict.status for o in fleet.run(tasks[:2], timeout=120)}
        assert finished == {"cheat-0": "reject", "honest-0": "accept"}
    finally:
        fleet.close()


def test_a_verification_past_its_time_is_an_error_and_the_fleet_goes_on(
    cluster: object, batch: dict[str, Path], jobs: dict[str, Job], keys: Keys
) -> None:
    fleet = RayVerifiers(1)
    try:
        public = load_public_key(keys.node_pub)
        slow = VerifyTask("slow", batch["transformer"], job_file(jobs, "transformer"), public, "all")
        first = next(iter(fleet.run([slow], timeout=0.001)))
        assert first.verdict.status == "error" and "ran past" in first.verdict.reason
        again = next(iter(fleet.run([slow], timeout=120)))
        assert again.verdict.status == "accept"
    finally:
        fleet.close()


def test_run_task_turns_bad_input_into_an_error(batch: dict[str, Path], tmp_path: Path, keys: Keys) -> None:
    (tmp_path / "job.json").write_text("{}")
    outcome = run_task(VerifyTask("x", batch["mlp"], tmp_path / "job.json", load_public_key(keys.node_pub)))
    assert outcome.verdict.status == "error" and not outcome.verdict


def test_a_broken_copy_of_a_job_does_not_hide_the_good_one(keys: Keys, tmp_path: Path) -> None:
    """Review finding: two files of one job id, the one sorting first with a step file edited: the
    intact copy is used, so a cheat is still rejected (exit 1), not left unverified (exit 3)."""
    from verimesh.jobs.job import new_job

    good = tmp_path / "jobs"
    job = new_job(model_path("rescnn"), input_path("rescnn"), good / "job.json")
    honest, cheated = tmp_path / "b.vmb", cheat(job, keys, tmp_path / "cheat.vmb")
    prove(job, key=keys.node, out=honest, device="cpu")
    broken = good / "a"
    broken.mkdir()
    for item in good.iterdir():
        if item.name != "a":
            target = broken / item.name
            subprocess.run(["cp", "-r", str(item), str(target)], check=True)
    step = sorted((broken / "job.files").glob("*.onnx"))[-1]
    step.write_bytes(step.read_bytes() + b"x")
    code, report = run_cli(str(honest), str(cheated), "--jobs-from", str(good), "--node-key", str(keys.node_pub))
    assert code == 1 and verdicts(report) == {"b": "accept", "cheat": "reject"}, report


def test_a_job_file_changed_after_routing_is_not_verified(batch: dict[str, Path], jobs: dict[str, Job],
                                                         keys: Keys) -> None:  # fmt: skip
    public = load_public_key(keys.node_pub)
    task = VerifyTask("x", batch["mlp"], job_file(jobs, "rescnn"), public, job_id=jobs["mlp"].job_id)
    outcome = run_task(task)
    assert outcome.verdict.status == "error" and "changed" in outcome.verdict.reason
