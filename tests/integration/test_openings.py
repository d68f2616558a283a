"""Opened bundles (challenge mode, docs/format.md §14): a sealed bundle's commitment and the members
a challenge names, each proven under the signed root. What an opening proves is what the full
bundle proves about the sampled steps; what it cannot be made to do is accept a sample it does not
cover, or bytes the node did not seal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import Keys, input_path, model_path
from verimesh.cli.app import cli
from verimesh.core.canonical import canonical_json
from verimesh.core.container import container_bytes, read_container
from verimesh.errors import InvalidInputError
from verimesh.jobs.bundle import merge_openings, opened_names, read_bundle, write_opening
from verimesh.jobs.job import Job, new_job
from verimesh.jobs.runtime import StepRunner
from verimesh.spot.evidence import check_evidence
from verimesh.spot.spotcheck import (
    challenged_members,
    commitment_members,
    run_steps,
    sample_steps,
    seeded_rng,
)
from verimesh.workflows import prove, seal_trace, verified_outputs, verify

SAMPLES = 1


@pytest.fixture()
def job(workdir: Path) -> Job:
    return new_job(model_path("rescnn"), input_path("rescnn"), workdir / "job.json")


def opening_for(job: Job, bundle: Path, seed: int, out: Path, samples: int = SAMPLES) -> Path:
    """What an honest node uploads for a challenge drawn with ``seed``: commitment + answer, merged."""
    full = read_bundle(bundle, version=job.version)
    steps = sample_steps(job, samples, seeded_rng(seed))
    commitment = write_opening(full, commitment_members(job))
    answer = write_opening(full, challenged_members(job, steps))
    out.write_bytes(merge_openings(commitment, answer))
    return out


def seed_hitting(job: Job, step: int, samples: int = SAMPLES) -> int:
    return next(s for s in range(10_000) if step in sample_steps(job, samples, seeded_rng(s)))


def test_an_honest_opening_is_accepted_with_its_sample_and_moves_fewer_bytes(job: Job, keys: Keys,
                                                                             workdir: Path) -> None:  # fmt: skip
    bundle = prove(job, key=keys.node, out=workdir / "r.vmb", device="cpu").bundle
    opened = opening_for(job, bundle, 7, workdir / "o.vmb")
    verdict, outputs = verified_outputs(opened, job=job, node_key=keys.node.public, samples=SAMPLES, seed=7)
    assert verdict.status == "accept", verdict.reason
    assert verdict.sampled_steps == sample_steps(job, SAMPLES, seeded_rng(7))
    full_verdict, full_outputs = verified_outputs(bundle, job=job, node_key=keys.node.public, samples=SAMPLES, seed=7)
    assert full_verdict.status == "accept" and full_verdict.sampled_steps == verdict.sampled_steps
    assert set(outputs) == set(full_outputs) and all(np.array_equal(outputs[n], full_outputs[n]) for n in outputs)
    assert opened.stat().st_size < bundle.stat().st_size
    assert sorted(opened_names(opened.read_bytes())) == sorted(
        {*commitment_members(job), *challenged_members(job, verdict.sampled_steps)}
    )
    # The CLI verifies it the same way, with the seed and samples it was challenged with.
    args = ["verify", str(opened), "--job", str(workdir / "job.json"), "--node-key", str(keys.node_pub)]
    result = CliRunner().invoke(cli, [*args, "--samples", str(SAMPLES), "--seed", "7", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["verdict"] == "accept"
    shown = CliRunner().invoke(cli, ["bundle", "show", str(opened), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["opened"]["of"] == len(job.trace_names) + 1


def test_an_opening_never_answers_a_sample_it_does_not_cover(job: Job, keys: Keys, workdir: Path) -> None:
    """A node cannot hand a verifier an opening of the steps it likes: a verifier that draws its own
    sample finds the members missing, and that is an error, never an accept."""
    bundle = prove(job, key=keys.node, out=workdir / "r.vmb", device="cpu").bundle
    opened = opening_for(job, bundle, 7, workdir / "o.vmb")
    drawn = sample_steps(job, SAMPLES, seeded_rng(7))
    other = next(s for s in range(1, 10_000) if set(sample_steps(job, SAMPLES, seeded_rng(s))) - set(drawn)
                 and set(challenged_members(job, sample_steps(job, SAMPLES, seeded_rng(s))))
                 - set(challenged_members(job, drawn)))  # fmt: skip
    with pytest.raises(InvalidInputError) as caught:
        verify(opened, job=job, node_key=keys.node.public, samples=SAMPLES, seed=other)
    assert caught.value.code == "not-opened"
    with pytest.raises(InvalidInputError):
        verify(opened, job=job, node_key=keys.node.public, samples="all", seed=7)
    args = ["verify", str(opened), "--job", str(workdir / "job.json"), "--node-key", str(keys.node_pub)]
    result = CliRunner().invoke(cli, [*args, "--samples", str(SAMPLES), "--seed", str(other)])
    assert result.exit_code == 3, result.output


def cheat_at(job: Job, keys: Keys, step: int, out: Path) -> Path:
    """A node that commits a wrong output of ``step`` (the steps after it run from the wrong value)."""
    runner = StepRunner(device="cpu")
    trace = run_steps(job, None, job.read_input(), runner)
    name = job.steps[step].outputs[0]
    trace[name] = trace[name] + np.asarray(0.5, dtype=trace[name].dtype)
    for later in job.steps[step + 1 :]:
        trace.update(runner.run(later.digest, job.read_step_model(later.index),
                                {n: trace[n] for n in later.inputs}, later.outputs))  # fmt: skip
    seal_trace(job, trace, key=keys.node, runner=runner, out=out)
    return out


def test_a_wrong_step_the_challenge_hits_is_slashable_from_the_opening_alone(job: Job, keys: Keys,
                                                                            workdir: Path) -> None:  # fmt: skip
    step = 1
    bad = cheat_at(job, keys, step, workdir / "cheat.vmb")
    seed = seed_hitting(job, step)
    opened = opening_for(job, bad, seed, workdir / "o.vmb")
    verdict = verify(opened, job=job, node_key=keys.node.public, samples=SAMPLES, seed=seed)
    assert verdict.status == "reject" and verdict.evidence, verdict.reason
    result = check_evidence(Path(verdict.evidence))
    assert result.proves_fraud and result.kind in ("step-mismatch", "window-mismatch"), result.reason


def test_bytes_the_node_did_not_seal_are_rejected_blaming_no_one(job: Job, keys: Keys, workdir: Path) -> None:
    bundle = prove(job, key=keys.node, out=workdir / "r.vmb", device="cpu").bundle
    opened = opening_for(job, bundle, 7, workdir / "o.vmb").read_bytes()
    members = dict(read_container(opened, what="opening"))
    doc = json.loads(bytes(members["opening.json"]))
    # 1. One opened tensor's bytes swapped for others of the same size.
    name = next(r["name"] for r in doc["members"] if r["name"] != "trace.json")
    data = bytearray(members[f"sealed/{name}"])
    data[:4] = bytes(4) if data[:4] != bytes(4) else b"\x01\x02\x03\x04"
    swapped = container_bytes([(n, bytes(data) if n == f"sealed/{name}" else m) for n, m in members.items()])
    (workdir / "swapped.vmb").write_bytes(swapped)
    verdict = verify(workdir / "swapped.vmb", job=job, node_key=keys.node.public, samples=SAMPLES, seed=7)
    assert verdict.status == "reject" and verdict.evidence is None
    assert any(c.name == "seal" and not c.ok for c in verdict.checks)
    # 2. A proof for another position (the record claims another index): refused when read.
    records = [dict(r) for r in doc["members"]]
    records[0]["index"] = records[0]["index"] + 1 if records[0]["index"] + 1 != records[1]["index"] else 0
    relabeled = {**members, "opening.json": canonical_json({**doc, "members": records})}
    (workdir / "relabeled.vmb").write_bytes(container_bytes(list(relabeled.items())))
    verdict = verify(workdir / "relabeled.vmb", job=job, node_key=keys.node.public, samples=SAMPLES, seed=7)
    assert verdict.status != "accept"
    # 3. Another bundle's proof for the same member (a trace with other values): not under this root.
    from verimesh.core.canonical import b64encode

    foreign = read_bundle(cheat_at(job, keys, 0, workdir / "other.vmb"), version=2)
    mine = read_bundle(bundle, version=2)
    name = next(r["name"] for r in doc["members"] if foreign.inclusion(r["name"]) != mine.inclusion(r["name"]))
    records = [dict(r) for r in doc["members"]]
    for r in records:
        if r["name"] == name:
            r["inclusion_proof"] = [b64encode(p) for p in foreign.inclusion(name)[1]]
    grafted = {**members, "opening.json": canonical_json({**doc, "members": records})}
    (workdir / "grafted.vmb").write_bytes(container_bytes(list(grafted.items())))
    verdict = verify(workdir / "grafted.vmb", job=job, node_key=keys.node.public, samples=SAMPLES, seed=7)
    assert verdict.status == "reject" and verdict.evidence is None


def test_a_commitment_without_the_outputs_is_never_accepted(job: Job, keys: Keys, workdir: Path) -> None:
    bundle = prove(job, key=keys.node, out=workdir / "r.vmb", device="cpu").bundle
    full = read_bundle(bundle, version=2)
    steps = sample_steps(job, SAMPLES, seeded_rng(7))
    names = [m for m in (*commitment_members(job), *challenged_members(job, steps)) if m not in
             commitment_members(job)[1:]]  # fmt: skip
    (workdir / "o.vmb").write_bytes(write_opening(full, ["trace.json", *names]))
    verdict = verify(workdir / "o.vmb", job=job, node_key=keys.node.public, samples=SAMPLES, seed=7)
    assert verdict.status == "reject" and verdict.evidence is None


def test_merging_refuses_another_statement_or_other_bytes(job: Job, keys: Keys, workdir: Path) -> None:
    bundle = prove(job, key=keys.node, out=workdir / "r.vmb", device="cpu").bundle
    other = cheat_at(job, keys, 1, workdir / "cheat.vmb")
    mine, theirs = read_bundle(bundle, version=2), read_bundle(other, version=2)
    commitment = write_opening(mine, commitment_members(job))
    with pytest.raises(InvalidInputError, match="another statement"):
        merge_openings(commitment, write_opening(theirs, ["tensors/000001.bin"]))
    # The same envelope, a member both carry with other bytes.
    members = dict(read_container(commitment, what="c"))
    name = commitment_members(job)[1]
    changed = container_bytes([(n, (bytes(m)[:-1] + b"\x00") if n == f"sealed/{name}" else m)
                               for n, m in members.items()])  # fmt: skip
    with pytest.raises(InvalidInputError, match="differs"):
        merge_openings(commitment, changed)


def test_corrupt_or_truncated_openings_are_never_accepted(job: Job, keys: Keys, workdir: Path) -> None:
    bundle = prove(job, key=keys.node, out=workdir / "r.vmb", device="cpu").bundle
    opened = opening_for(job, bundle, 7, workdir / "o.vmb").read_bytes()
    rng = np.random.default_rng(0)
    cases = [opened[:n] for n in (0, 10, len(opened) // 2, len(opened) - 1)]
    for position in rng.integers(0, len(opened), 24):
        data = bytearray(opened)
        data[int(position)] ^= 0x41
        cases.append(bytes(data))
    for i, data in enumerate(cases):
        path = workdir / f"bad{i}.vmb"
        path.write_bytes(data)
        try:
            verdict = verify(path, job=job, node_key=keys.node.public, samples=SAMPLES, seed=7)
        except InvalidInputError:
            continue
        assert verdict.status != "accept", (i, verdict.reason)


def test_the_bench_counts_the_bytes_a_node_uploads() -> None:
    """`bench --only mesh`'s challenge rows are the bodies a node sends: the commitment plus the
    answer, fewer as the audit level rises, every byte at level 0 (and the fixed overheads)."""
    from verimesh.assurance.mesh_bench import bench_challenges, challenge_table

    row = bench_challenges(model_path("rescnn"), input_path("rescnn"), seeds=6)
    shares = [r["median_share"] for r in row["levels"]]
    assert shares == sorted(shares, reverse=True) and shares[0] > 1.0 > shares[-1]
    assert all(r["max_bytes"] >= r["median_bytes"] > row["commitment_bytes"] for r in row["levels"])
    assert row["levels"][0]["samples"] == row["steps"] - 1 and row["levels"][-1]["samples"] == 1
    assert len(challenge_table(row)) == 4 + len(row["levels"])
