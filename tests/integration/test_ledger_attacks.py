"""Every attack of issue 13, reproduced with the CLI and the library's public API: each failed
(the attack worked) before the ledger authenticated its events and replayed its rules.

The adversaries: anyone holding a node's public key or bundle; a node gaming its own standing;
anyone who can write the database (SQL, or the Transaction API with whatever key they have); a
registered verifier that writes what the rules forbid."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import Keys, input_path, model_path, perturbed, step_evidence
from tests.integration.test_ledger import (
    OWNER,
    fraud_bundle,
    join,
    kinds,
    new_ledger,
    operator,
    post,
    rehash,
    settle,
)
from tests.integration.test_tamper import honest_trace, seal
from verimesh.cli.app import cli
from verimesh.core.canonical import b64encode
from verimesh.core.container import read_container_file, write_container
from verimesh.core.digest import sha256_bytes
from verimesh.errors import IntegrityError, InvalidInputError
from verimesh.jobs.job import Job, new_job
from verimesh.ledger.events import SignedRequest, sign_request
from verimesh.ledger.reputation import NEW_NODE_STREAK
from verimesh.ledger.store import Ledger, verify_ledger
from verimesh.settlement import audit_ledger, node_standing, register_node, slash_with_evidence, top_up
from verimesh.signing.envelope import Envelope, Signature, make_statement, pae, sign_statement
from verimesh.signing.keys import SecretKey, generate_key, write_key_pair
from verimesh.workflows import prove


@pytest.fixture()
def mesh(tmp_path: Path, keys: Keys, jobs: dict[str, Job]) -> Ledger:
    """A ledger with the node registered (stake 1000) and the mlp job posted by its owner."""
    led = new_ledger(tmp_path / "mesh.db", fraud_fraction="0.5", reward=3)
    join(led, keys.node, 1000)
    post(led, jobs["mlp"].job_id, deposit=100)
    return led


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory, keys: Keys, jobs: dict[str, Job]) -> Path:
    return prove(jobs["mlp"], key=keys.node, out=tmp_path_factory.mktemp("b") / "ok.vmb", device="cpu").bundle


def rogue_verifier(led: Ledger) -> SecretKey:
    """A verifier the operator registered, which then writes what the rules forbid."""
    key = generate_key()
    led.add_verifier(operator(led), key.public)
    return key


def with_envelope(bundle: Path, envelope: Envelope, out: Path) -> Path:
    members = read_container_file(bundle, what="bundle")
    write_container(out, [(n, envelope.to_bytes() if n == "envelope.json" else bytes(m)) for n, m in members.items()])
    return out


def cli_run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


# -- anyone can damage an honest node's standing --------------------------------------------------


def test_a_random_signature_under_the_nodes_keyid_changes_no_standing(
    mesh: Ledger, honest: Path, keys: Keys, jobs: dict[str, Job], tmp_path: Path
) -> None:
    genuine = Envelope.from_bytes(read_container_file(honest, what="bundle")["envelope.json"].tobytes())
    forged_sig = keys.other.sign(pae(genuine.payload_type, genuine.payload))
    forged = with_envelope(
        honest,
        Envelope(genuine.payload_type, genuine.payload, (Signature(keys.node.node_id, forged_sig),)),
        tmp_path / "f.vmb",
    )
    settled = settle(forged, jobs["mlp"], mesh)
    assert settled.verdict.status == "reject" and settled.verdict.evidence is None
    assert kinds(settled) == [] and settled.note is not None and "not attributable" in settled.note
    standing = node_standing(mesh, keys.node.node_id)
    assert (standing.rejected, standing.streak, standing.stake) == (0, 0, 1000)


def test_a_genuine_bundle_replayed_to_another_job_changes_no_standing(
    mesh: Ledger, honest: Path, keys: Keys, jobs: dict[str, Job]
) -> None:
    post(mesh, jobs["rescnn"].job_id)
    replay = settle(honest, jobs["rescnn"], mesh)  # the node's mlp bundle, submitted for the rescnn job
    assert replay.verdict.status == "reject" and kinds(replay) == []
    assert node_standing(mesh, keys.node.node_id).rejected == 0
    assert settle(honest, jobs["mlp"], mesh).verdict.status == "accept"  # it still counts where it belongs
    assert node_standing(mesh, keys.node.node_id).accepted == 1


# -- standing cannot be farmed ------------------------------------------------------------------------


def test_reverifying_one_bundle_forty_times_counts_once(
    mesh: Ledger, honest: Path, keys: Keys, jobs: dict[str, Job]
) -> None:
    for _ in range(40):
        assert settle(honest, jobs["mlp"], mesh, samples=0).verdict.status == "accept"
    standing = node_standing(mesh, keys.node.node_id)
    assert (standing.accepted, standing.streak, standing.rewards) == (1, 1, 3)
    assert standing.audit_level == 0 and standing.streak < NEW_NODE_STREAK  # still audited on every step
    report = audit_ledger(mesh)
    assert report.ok, report.violations


# -- rewards cannot be minted -------------------------------------------------------------------------


def test_rewards_come_only_from_a_posted_jobs_deposit(mesh: Ledger, keys: Keys, tmp_path: Path) -> None:
    # A fresh job nobody posted earns nothing: it is refused.
    mine = new_job(model_path("mlp"), input_path("mlp"), tmp_path / "mine.json")
    bundle = prove(mine, key=keys.node, out=tmp_path / "mine.vmb", device="cpu").bundle
    with pytest.raises(InvalidInputError, match="not registered"):
        settle(bundle, mine, mesh)
    # Posted by the node's own key: no reward, and no standing either.
    request = sign_request(keys.node, action="job", ledger_id=mesh.ledger_id, amount=50, job_id=mine.job_id)
    from verimesh.settlement import register_job

    register_job(mesh, request, writer=operator(mesh))
    own = settle(bundle, mine, mesh)
    assert own.verdict.status == "accept" and "reward" not in kinds(own) and "verdict" not in kinds(own)
    assert node_standing(mesh, keys.node.node_id).rewards == 0
    # Posted by a sybil owner: paid, but out of the sybil's deposit, and never more than it.
    sybil = generate_key()
    jobs_paid = []
    for i in range(2):
        job = new_job(model_path("mlp"), input_path("mlp"), tmp_path / f"s{i}.json")
        post(mesh, job.job_id, deposit=2, owner=sybil)  # less than the reward in force (3)
        settled = settle(prove(job, key=keys.node, out=tmp_path / f"s{i}.vmb", device="cpu").bundle, job, mesh)
        jobs_paid.append(next(mesh.entry(s).event["amount"] for s, k in settled.appended if k == "reward"))
    assert jobs_paid == [2, 2]  # each job pays what its owner deposited, never the 3 the setting says
    assert audit_ledger(mesh).ok


def test_a_reward_a_writer_mints_breaks_the_rules(mesh: Ledger, keys: Keys, jobs: dict[str, Job]) -> None:
    rogue = rogue_verifier(mesh)
    claim = {"node_id": keys.node.node_id, "job_id": jobs["mlp"].job_id, "step_range": [0, 3]}
    seq = mesh.append([{"kind": "reward", **claim, "amount": 1000, "verdict": 2}], writer=rogue)[0]
    assert verify_ledger(mesh).ok  # signed by a registered writer: the log itself is intact
    report = audit_ledger(mesh)
    assert not report.ok and report.first_bad_entry == seq
    assert any(f"entry {seq}:" in v and "accepting verdict" in v for v in report.violations)


# -- one fraud slashes once -----------------------------------------------------------------------------


def test_one_fraud_claim_slashes_once_whatever_encodes_it(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], tmp_path: Path
) -> None:
    job = jobs["rescnn"]
    post(mesh, job.job_id)
    trace = honest_trace(job)
    for step in (0, 1):  # two faked steps: two different evidence files for one signed claim
        name = job.steps[step].outputs[0]
        trace[name] = perturbed(trace[name], delta=3.0)
    bad = seal(job, trace, keys.node, tmp_path / "bad.vmb")
    settled = settle(bad, job, mesh, samples="all", evidence_out=tmp_path / "first.vme")
    assert "slash" in kinds(settled)
    assert node_standing(mesh, keys.node.node_id).stake == 500
    others = [step_evidence(job, bad, keys.node.public, tmp_path / f"step{k}.vme", step=k) for k in (0, 1)]
    from verimesh.spot.evidence import check_evidence

    digests = {sha256_bytes(p.read_bytes()) for p in [tmp_path / "first.vme", *others]}
    assert len(digests) >= 2 and all(check_evidence(p).proves_fraud for p in others)
    for path in [tmp_path / "first.vme", *others]:
        with pytest.raises(InvalidInputError, match="already slashed"):
            slash_with_evidence(mesh, path, writer=operator(mesh))
    code, output = cli_run(
        "ledger",
        "slash",
        "--evidence",
        str(others[1]),
        "--ledger",
        str(tmp_path / "mesh.db"),
        "--verifier-key",
        str(tmp_path / "mesh.op.key"),
    )
    assert code == 3 and "already-slashed" in output
    assert node_standing(mesh, keys.node.node_id).stake == 500  # 1000 -> 500, and no further
    assert audit_ledger(mesh).ok


# -- registration squatting -------------------------------------------------------------------------------


def test_nobody_registers_a_victims_key(tmp_path: Path, keys: Keys) -> None:
    led = new_ledger(tmp_path / "mesh.db")
    attacker = generate_key()
    # The victim's public key and proof of possession, in a request the attacker signed.
    mine = sign_request(attacker, action="register", ledger_id=led.ledger_id, amount=1)
    victim = keys.node.public
    squat = {
        **mine.request,
        "node_id": victim.node_id,
        "public_key": victim.key.hex(),
        "proof_of_possession": victim.proof_of_possession.hex(),
    }
    with pytest.raises(InvalidInputError, match="not signed by") as info:
        register_node(led, SignedRequest(squat, mine.signature), writer=operator(led))
    assert info.value.exit_code == 3
    # A rogue writer puts the squat in the log anyway: it registers nobody, and the rules name it.
    rogue = rogue_verifier(led)
    seq = led.append(
        [{"kind": "register", "node_id": victim.node_id, "stake": 1, **SignedRequest(squat, mine.signature).to_json()}],
        writer=rogue,
    )[0]
    join(led, keys.node, 1000)  # the victim still registers with its own request and stake
    assert node_standing(led, keys.node.node_id).stake == 1000
    top_up(led, sign_request(keys.node, action="top-up", ledger_id=led.ledger_id, amount=50), writer=operator(led))
    assert node_standing(led, keys.node.node_id).stake == 1050
    report = audit_ledger(led)
    assert report.first_bad_entry == seq and any("not signed by" in v for v in report.violations)


# -- unauthenticated events ---------------------------------------------------------------------------------


def test_a_key_that_is_no_writer_cannot_append(mesh: Ledger, keys: Keys) -> None:
    with pytest.raises(InvalidInputError, match="may not write") as info:
        mesh.append(
            [{"kind": "release", "node_id": keys.node.node_id, "withdrawal": 1, "amount": 1}], writer=generate_key()
        )
    assert info.value.code == "writer-not-registered"


def _sql_slash(db: Path, node_id: str, job_id: str, size: int) -> None:
    """What a database writer without any key can do: a full-stake slash row, hashes made to match."""
    body = json.dumps(
        {
            "amount": 1000,
            "evidence_digest": "sha256:" + "e" * 64,
            "job_id": job_id,
            "kind": "slash",
            "node_id": node_id,
            "reason": "fraud",
            "seq": size,
            "step_range": [0, 3],
            "time": "2030-01-01T00:00:00Z",
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    with sqlite3.connect(db) as conn:
        claim = f"slash:fraud:{node_id}:{job_id}:0-3"
        conn.execute(
            "INSERT INTO ledger_entries (seq, kind, node_id, job_id, claim, body) VALUES (?, ?, ?, ?, ?, ?)",
            (size, "slash", node_id, job_id, claim, body),
        )


def test_rows_written_behind_the_ledgers_back_are_found_and_refused(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], honest: Path, tmp_path: Path
) -> None:
    db = tmp_path / "mesh.db"
    mesh.checkpoint(operator(mesh))
    _sql_slash(db, keys.node.node_id, jobs["mlp"].job_id, mesh.size())
    rehash(mesh, db)
    report = verify_ledger(mesh)
    assert not report.ok and any("not signed by any writer" in p for p in report.problems)
    for args in (
        ["ledger", "reputation"],
        [
            "verify",
            str(honest),
            "--job",
            str(jobs["mlp"].base_dir / "mlp.json"),
            "--verifier-key",
            str(tmp_path / "mesh.op.key"),
        ],
    ):
        code, output = cli_run(*args, "--ledger", str(db))
        assert code == 3 and "ledger-tampered" in output and len(output.strip().splitlines()) == 1, output
    with pytest.raises(IntegrityError):  # the operator's next checkpoint does not cover it
        mesh.checkpoint(operator(mesh))


def test_a_slash_a_writer_makes_up_breaks_the_rules(mesh: Ledger, keys: Keys, jobs: dict[str, Job]) -> None:
    rogue = rogue_verifier(mesh)
    claim = {"node_id": keys.node.node_id, "job_id": jobs["mlp"].job_id, "step_range": [0, 3]}
    seq = mesh.append(
        [{"kind": "slash", **claim, "amount": 1000, "reason": "fraud", "evidence_digest": "sha256:" + "e" * 64}],
        writer=rogue,
    )[0]
    report = audit_ledger(mesh)
    # Evidence that is not stored is the storage's damage (plain `ledger verify` names it), the
    # amount the writer's breach of the rules.
    assert report.first_bad_entry == seq and any("not stored" in p for p in report.problems)
    assert any("rules take 500" in v for v in report.violations)
    code, output = cli_run("ledger", "verify", "--ledger", mesh.url, "--rules")
    assert code == 1 and f"entry {seq}" in output


# -- history rewritten under in-log checkpoints ----------------------------------------------------------


def test_history_rewritten_under_a_new_key_is_caught_by_an_anchor(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], tmp_path: Path
) -> None:
    job = jobs["mlp"]
    settle(fraud_bundle(job, keys.node, tmp_path / "bad.vmb"), job, mesh)
    assert node_standing(mesh, keys.node.node_id).stake == 500
    cp = mesh.checkpoint(operator(mesh))
    (tmp_path / "head.json").write_text(json.dumps(cp.to_json()))
    # The attacker rebuilds the log without the slash, with its own operator key, and re-signs it all.
    attacker = generate_key()
    fake = Ledger.create(str(tmp_path / "fake.db"), attacker, ledger_id=mesh.ledger_id)
    keep = [e.event for e in mesh.entries(kinds=["register", "job"])]
    fake.append([{k: v for k, v in ev.items() if k not in ("seq", "time")} for ev in keep], writer=attacker)
    fake.checkpoint(attacker)
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp_path / "mesh.db") + suffix).unlink(missing_ok=True)
        if Path(str(tmp_path / "fake.db") + suffix).exists():
            shutil.copy(str(tmp_path / "fake.db") + suffix, str(tmp_path / "mesh.db") + suffix)
    db = ["--ledger", str(tmp_path / "mesh.db")]
    code, output = cli_run("ledger", "verify", *db, "--rules")
    assert code == 0 and "not anchored" in output and "only as good as the database" in output
    code, output = cli_run("ledger", "verify", *db, "--operator-key", str(tmp_path / "mesh.op.key.pub"))
    assert code == 1 and "history rewritten under another key" in output
    code, output = cli_run("ledger", "verify", *db, "--checkpoint", str(tmp_path / "head.json"))
    assert code == 1 and "not signed by this ledger's operator" in output


# -- a planted receipt ----------------------------------------------------------------------------------


def test_a_planted_receipt_cannot_slash_an_honest_node(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], honest: Path
) -> None:
    job = jobs["mlp"]
    genuine = Envelope.from_bytes(read_container_file(honest, what="bundle")["envelope.json"].tobytes())
    pred = genuine.statement()["predicate"]
    other = make_statement({job.output_names[0]: "sha256:" + "1" * 64}, "https://verimesh.dev/spot-check/v2", pred)
    planted = sign_statement(other, keys.other)  # signed by someone else, filed under the victim
    planted = Envelope(
        planted.payload_type, planted.payload, (Signature(keys.node.node_id, planted.signatures[0].sig),)
    )
    raw = planted.to_bytes()
    rogue = rogue_verifier(mesh)
    seq = mesh.append(
        [
            {
                "kind": "receipt",
                "node_id": keys.node.node_id,
                "job_id": job.job_id,
                "step_range": pred["step_range"],
                "subjects": planted.statement()["subject"],
                "envelope_digest": sha256_bytes(raw),
                "envelope": b64encode(raw),
            }
        ],
        writer=rogue,
    )[0]
    settled = settle(honest, job, mesh)
    assert settled.verdict.status == "accept" and settled.equivocation_evidence is None
    assert "slash" not in kinds(settled) and node_standing(mesh, keys.node.node_id).stake == 1000
    report = audit_ledger(mesh)
    assert report.first_bad_entry == seq and any("not signed by" in v for v in report.violations)


# -- configuration outside the log ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE ledger_meta SET value = '\"0.99\"' WHERE key = 'setting.fraud_fraction'",
        "DELETE FROM ledger_meta WHERE key = 'setting.reward'",
        "UPDATE ledger_meta SET value = '\"/tmp/attacker.key\"' WHERE key = 'setting.operator_key_path'",
        "INSERT INTO ledger_meta (key, value) VALUES ('setting.bonus', '1')",
    ],
)
def test_an_edited_setting_is_found_and_refused(
    mesh: Ledger, jobs: dict[str, Job], honest: Path, tmp_path: Path, edit: str
) -> None:
    with sqlite3.connect(tmp_path / "mesh.db") as conn:
        conn.execute(edit)
    report = verify_ledger(Ledger.open(mesh.url))
    assert not report.ok and any("ledger_meta disagrees" in p for p in report.problems)
    code, output = cli_run(
        "verify",
        str(honest),
        "--job",
        str(jobs["mlp"].base_dir / "mlp.json"),
        "--ledger",
        mesh.url,
        "--verifier-key",
        str(tmp_path / "mesh.op.key"),
    )
    assert code == 3 and "ledger_meta" in output


def test_settings_change_only_through_the_log(mesh: Ledger, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="operator"):
        mesh.change_settings(rogue_verifier(mesh), {"fraud_fraction": "0.9"})
    mesh.change_settings(operator(mesh), {"fraud_fraction": "0.9"})
    led = Ledger.open(mesh.url)
    assert led.setting("fraud_fraction") == "0.9" and verify_ledger(led).ok
    with led.view() as view:
        assert view.settings["fraud_fraction"] == "0.9"


@pytest.mark.parametrize("checkpointed", [False, True])
def test_an_edited_stake_is_found_and_no_decision_uses_it(
    mesh: Ledger, keys: Keys, jobs: dict[str, Job], honest: Path, tmp_path: Path, checkpointed: bool
) -> None:
    if checkpointed:
        mesh.checkpoint(operator(mesh))  # the registration now lies before the last checkpoint
    seq = next(e.seq for e in mesh.entries(kinds=["register"]))
    body = mesh.entry(seq).body.replace(b'"stake":1000', b'"stake":9000')
    with sqlite3.connect(tmp_path / "mesh.db") as conn:
        conn.execute("UPDATE ledger_entries SET body = ? WHERE seq = ?", (body, seq))
    assert verify_ledger(mesh).first_bad_entry == seq
    for args in (
        ["ledger", "reputation"],
        [
            "verify",
            str(honest),
            "--job",
            str(jobs["mlp"].base_dir / "mlp.json"),
            "--verifier-key",
            str(tmp_path / "mesh.op.key"),
        ],
    ):
        code, output = cli_run(*args, "--ledger", mesh.url)
        assert code == 3 and "ledger-tampered" in output, output
    with pytest.raises(IntegrityError):  # a process reading the edited row (the CLI above is one too)
        node_standing(Ledger.open(mesh.url), keys.node.node_id)
    if checkpointed:  # before the anchor: read from the store, and proven against the checkpoint
        with pytest.raises(IntegrityError):
            node_standing(mesh, keys.node.node_id)
    else:  # this process walked the row when it was whole: its decisions read what it checked
        assert node_standing(mesh, keys.node.node_id).stake == 1000


def test_an_entry_edited_after_this_process_proved_it_included_is_still_found(
    mesh: Ledger, keys: Keys, tmp_path: Path
) -> None:
    """Inclusion proofs are remembered per (checkpoint root, position, leaf): an edited body is
    another leaf, proven afresh, and fails, though the original was proven a moment before."""
    mesh.checkpoint(operator(mesh))
    assert node_standing(mesh, keys.node.node_id).stake == 1000  # proves the registration included
    seq = next(e.seq for e in mesh.entries(kinds=["register"]))
    body = mesh.entry(seq).body.replace(b'"stake":1000', b'"stake":9000')
    with sqlite3.connect(tmp_path / "mesh.db") as conn:
        conn.execute("UPDATE ledger_entries SET body = ? WHERE seq = ?", (body, seq))
    with pytest.raises(IntegrityError):
        node_standing(mesh, keys.node.node_id)


def test_a_version_1_ledger_is_refused_clearly(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("CREATE TABLE ledger_meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)")
        conn.executemany("INSERT INTO ledger_meta VALUES (?, ?)", [("format", "verimesh/ledger"), ("version", "1")])
    code, output = cli_run("ledger", "verify", "--ledger", str(tmp_path / "old.db"))
    assert code == 3 and "ledger-v1" in output and "version 1 ledger" in output


def test_writer_keys_on_the_command_line(tmp_path: Path, keys: Keys, jobs: dict[str, Job], honest: Path) -> None:
    """`ledger verifier add` lets a verifier write; `verify --ledger` and `ledger slash` sign with
    --verifier-key; a key the operator never added is refused (exit 3)."""
    led = new_ledger(tmp_path / "mesh.db")
    join(led, keys.node, 100)
    post(led, jobs["mlp"].job_id)
    write_key_pair(tmp_path / "v.key", generate_key())
    db = ["--ledger", led.url]
    job_file = str(jobs["mlp"].base_dir / "mlp.json")
    code, output = cli_run("verify", str(honest), "--job", job_file, *db, "--verifier-key", str(tmp_path / "v.key"))
    assert code == 3 and "writer-not-registered" in output
    assert cli_run("ledger", "verifier", "add", str(tmp_path / "v.key.pub"), *db)[0] == 0
    code, output = cli_run("verify", str(honest), "--job", job_file, *db, "--verifier-key", str(tmp_path / "v.key"))
    assert code == 0, output
    code, output = cli_run("ledger", "verifier", "list", *db, "--json")
    assert code == 0 and len(json.loads(output)["verifiers"]) == 1
    assert OWNER.node_id != keys.node.node_id
