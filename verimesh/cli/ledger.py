"""``verimesh ledger``: the tamper-evident reputation ledger.

Every command that writes is signed by the party it speaks for: the operator (``init``,
``settings``, ``verifier``, ``checkpoint``), a writer (``--verifier-key``: the operator or a
registered verifier) for what it appends, and the node or job owner for its own request
(``--key``, or a request file it signed with ``ledger request``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from verimesh.cli.common import (
    EXIT_CODES_HELP,
    ask_passphrase,
    emit,
    json_option,
    ledger_option,
    load_signing_key,
    plural,
    progress_bar,
    write_report,
)
from verimesh.errors import EXIT_REJECTED

if TYPE_CHECKING:
    from verimesh.ledger.events import SignedRequest
    from verimesh.ledger.store import Ledger

F = TypeVar("F", bound=Callable[..., Any])


def verifier_key_option(f: F) -> F:
    return click.option(
        "--verifier-key", type=click.Path(dir_okay=False, path_type=Path), required=True,
        envvar="VERIMESH_VERIFIER_KEY",
        help="Secret key of the writer (the operator, or a verifier the operator registered); signs what is "
        "appended. Env VERIMESH_VERIFIER_KEY.",
    )(f)  # fmt: skip


def operator_secret_option(required: bool) -> Callable[[F], F]:
    def decorate(f: F) -> F:
        return click.option(
            "--operator-key", type=click.Path(dir_okay=False, path_type=Path), required=required,
            help="The operator's secret key file" + ("." if required else " (default: the one given at init)."),
        )(f)  # fmt: skip

    return decorate


def request_options(amount_name: str, amount_help: str) -> Callable[[F], F]:
    """``--request FILE`` (signed earlier by the party), or ``--key KEY`` and the amount (signed now)."""

    def decorate(f: F) -> F:
        f = click.option(f"--{amount_name}", "amount", type=click.IntRange(min=1), help=amount_help)(f)
        f = click.option(
            "--key", "party_key", type=click.Path(dir_okay=False, path_type=Path),
            help="The secret key of the party this speaks for (node or job owner): signs the request now.",
        )(f)  # fmt: skip
        return click.option(
            "--request", "request_file", type=click.Path(dir_okay=False, path_type=Path),
            help="A request the party signed (`verimesh ledger request ...`).",
        )(f)  # fmt: skip

    return decorate


def _open(url: str) -> Ledger:
    from verimesh.ledger.store import Ledger

    return Ledger.open(url)


def _request(
    led: Ledger, action: str, request_file: Path | None, party_key: Path | None, amount: int | None,
    job_id: str | None = None,
) -> SignedRequest:  # fmt: skip
    from verimesh.core.canonical import parse_json
    from verimesh.core.files import read_user_file
    from verimesh.ledger.events import SignedRequest, sign_request

    if (request_file is None) == (party_key is None):
        raise click.UsageError("give exactly one of --request FILE or --key KEY (with the amount)")
    if request_file is not None:
        doc = parse_json(read_user_file(request_file, what="request", max_bytes=65536), what=str(request_file))
        return SignedRequest.from_json(doc, what=f"request {request_file}")
    if amount is None:
        raise click.UsageError("--key needs the amount (--stake, --amount or --deposit)")
    assert party_key is not None
    return sign_request(load_signing_key(party_key), action=action, ledger_id=led.ledger_id, amount=amount,
                        job_id=job_id)  # fmt: skip


@click.group(epilog=EXIT_CODES_HELP)
def ledger() -> None:
    """The tamper-evident reputation ledger."""


@ledger.command("init", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option(
    "--operator-key",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The operator's secret key file (signs the genesis, settings, verifiers and checkpoints); its path is "
    "remembered in the genesis.",
)
@click.option(
    "--fraud-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.5,
    show_default=True,
    help="Share of the slashable stake a proven fraud takes (equivocation takes all).",
)
@click.option("--reward", type=click.IntRange(min=0), default=1, show_default=True, help="Reward per accepted job.")
@click.option(
    "--unbonding-seconds", type=click.IntRange(min=0), default=7 * 24 * 3600, show_default=True,
    help="How long a withdrawal stays slashable before it can be released.",
)  # fmt: skip
@json_option
def ledger_init(
    ledger_url: str, operator_key: Path, fraud_fraction: float, reward: int, unbonding_seconds: int, as_json: bool
) -> None:
    """Create a ledger: its genesis entry holds its id, the operator's public key and the settings."""
    from verimesh.ledger.store import Ledger, display_url

    key = load_signing_key(operator_key)
    settings = {"fraud_fraction": repr(fraud_fraction), "reward": reward, "unbonding_seconds": unbonding_seconds}
    led = Ledger.create(ledger_url, key, operator_key_path=operator_key, settings=settings)
    payload = {"ledger": display_url(ledger_url), "ledger_id": led.ledger_id, "operator": key.node_id}
    emit(as_json, payload, f"created ledger {led.ledger_id} at {payload['ledger']} (operator {key.node_id})")


@ledger.command("settings", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option("--set", "changes", multiple=True, metavar="NAME=VALUE",
              help="Change a setting (fraud_fraction, reward, unbonding_seconds, operator_key_path); needs "
              "--operator-key.")  # fmt: skip
@operator_secret_option(required=False)
@json_option
def ledger_settings(ledger_url: str, changes: tuple[str, ...], operator_key: Path | None, as_json: bool) -> None:
    """Show the settings in force (from the log, checked), or change them with an operator-signed entry."""
    led = _open(ledger_url)
    seq = None
    if changes:
        parsed: dict[str, str] = {}
        for item in changes:
            name, sep, value = item.partition("=")
            if not sep:
                raise click.UsageError(f"--set takes NAME=VALUE, got {item!r}")
            parsed[name.strip()] = value.strip()
        seq = led.change_settings(_operator(led, operator_key), parsed)
    with led.view() as view:
        settings, ledger_id = dict(view.settings), view.ledger_id
    # Fractions are kept as decimal strings (the log's JSON has no floats); shown as the values they are.
    lines = [f"{k:<20} {v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(settings.items())]
    if seq is not None:
        lines.insert(0, f"settings changed (entry {seq}); in force now:")
    emit(as_json, {"ledger_id": ledger_id, "settings": settings, "changed_entry": seq}, "\n".join(lines))


def _operator(led: Ledger, operator_key: Path | None) -> Any:
    from verimesh.signing.keys import key_is_encrypted

    remembered = led.setting("operator_key_path")
    key_path = operator_key or (Path(remembered) if remembered else None)
    passphrase = ask_passphrase(confirm=False) if key_path and key_is_encrypted(key_path) else None
    return led.operator_key(operator_key, passphrase=passphrase)


@ledger.group("verifier", epilog=EXIT_CODES_HELP)
def ledger_verifier() -> None:
    """Keys allowed to write verdicts, settlements and slashes (registered by the operator)."""


@ledger_verifier.command("add", epilog=EXIT_CODES_HELP)
@click.argument("public_key", type=click.Path(dir_okay=False, path_type=Path))
@ledger_option
@operator_secret_option(required=False)
@json_option
def ledger_verifier_add(public_key: Path, ledger_url: str, operator_key: Path | None, as_json: bool) -> None:
    """Let the verifier whose PUBLIC_KEY this is write to the ledger (an operator-signed entry)."""
    from verimesh.signing.keys import load_public_key

    led = _open(ledger_url)
    public = load_public_key(public_key)
    seq = led.add_verifier(_operator(led, operator_key), public)
    emit(as_json, {"verifier": public.node_id, "seq": seq}, f"verifier {public.node_id} added (entry {seq})")


@ledger_verifier.command("remove", epilog=EXIT_CODES_HELP)
@click.argument("node_id")
@ledger_option
@operator_secret_option(required=False)
@json_option
def ledger_verifier_remove(node_id: str, ledger_url: str, operator_key: Path | None, as_json: bool) -> None:
    """Stop NODE_ID writing to the ledger (what it wrote before stays, and stays checked)."""
    led = _open(ledger_url)
    seq = led.remove_verifier(_operator(led, operator_key), node_id)
    emit(as_json, {"verifier": node_id, "seq": seq}, f"verifier {node_id} removed (entry {seq})")


@ledger_verifier.command("list", epilog=EXIT_CODES_HELP)
@ledger_option
@json_option
def ledger_verifier_list(ledger_url: str, as_json: bool) -> None:
    """The operator and the verifiers that may write now."""
    with _open(ledger_url).view() as view:
        rows = {"operator": view.genesis.operator.node_id, "verifiers": sorted(view.verifiers)}
    emit(as_json, rows, "\n".join([f"operator  {rows['operator']}", *(f"verifier  {v}" for v in rows["verifiers"])]))


@ledger.command("request", epilog=EXIT_CODES_HELP)
@click.argument("action", type=click.Choice(["register", "top-up", "withdraw", "job"]))
@click.option("--key", "party_key", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The secret key of the node (or, for job, the job owner) the request speaks for.")  # fmt: skip
@click.option("--amount", type=click.IntRange(min=1), required=True,
              help="The stake (register), the amount (top-up, withdraw) or the deposit (job).")  # fmt: skip
@click.option("--job", "job_file", type=click.Path(dir_okay=False, path_type=Path), help="job: the job file.")
@click.option("--ledger", "ledger_url", envvar="VERIMESH_LEDGER", default=None, help="The ledger (for its id).")
@click.option("--ledger-id", default=None, help="The ledger's id, instead of --ledger.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@json_option
def ledger_request(
    action: str, party_key: Path, amount: int, job_file: Path | None, ledger_url: str | None,
    ledger_id: str | None, out: Path, as_json: bool,
) -> None:  # fmt: skip
    """Sign a request for one ledger: ACTION register (with a stake), top-up, withdraw, or job (post a job with a
    deposit). A writer appends it with `ledger register`, `ledger stake ...` or `ledger job register --request`."""
    from verimesh.ledger.events import sign_request

    if (ledger_url is None) == (ledger_id is None):
        raise click.UsageError("give exactly one of --ledger or --ledger-id")
    the_id = ledger_id if ledger_id is not None else _open(str(ledger_url)).ledger_id
    job_id = None
    if action == "job":
        if job_file is None:
            raise click.UsageError("a job request needs --job")
        from verimesh.jobs.job import load_job

        job_id = load_job(job_file).job_id
    request = sign_request(load_signing_key(party_key), action=action, ledger_id=the_id, amount=amount, job_id=job_id)
    write_report(out, json.dumps(request.to_json(), indent=2, sort_keys=True) + "\n")
    emit(as_json, {"request": str(out), "action": action, "node_id": request.node_id, "digest": request.digest},
         f"wrote {out}: {action} by {request.node_id} for ledger {the_id}")  # fmt: skip


@ledger.command("register", epilog=EXIT_CODES_HELP)
@request_options("stake", "The stake (with --key).")
@ledger_option
@verifier_key_option
@json_option
def ledger_register(
    request_file: Path | None, party_key: Path | None, amount: int | None, ledger_url: str, verifier_key: Path,
    as_json: bool,
) -> None:  # fmt: skip
    """Register a node with the stake its own signed request declares (not just its public proof of possession)."""
    from verimesh.settlement import register_node

    led = _open(ledger_url)
    request = _request(led, "register", request_file, party_key, amount)
    seq = register_node(led, request, writer=load_signing_key(verifier_key))
    emit(as_json, {"node_id": request.node_id, "stake": request.amount, "seq": seq},
         f"registered {request.node_id} with stake {request.amount} (entry {seq})")  # fmt: skip


@ledger.group("stake", epilog=EXIT_CODES_HELP)
def ledger_stake() -> None:
    """Add to a node's stake, withdraw it (unbonding first), release what is due."""


@ledger_stake.command("top-up", epilog=EXIT_CODES_HELP)
@request_options("amount", "The amount to add (with --key).")
@ledger_option
@verifier_key_option
@json_option
def ledger_stake_top_up(
    request_file: Path | None, party_key: Path | None, amount: int | None, ledger_url: str, verifier_key: Path,
    as_json: bool,
) -> None:  # fmt: skip
    """Add stake, on the node's own signed request."""
    from verimesh.settlement import top_up

    led = _open(ledger_url)
    request = _request(led, "top-up", request_file, party_key, amount)
    seq = top_up(led, request, writer=load_signing_key(verifier_key))
    emit(as_json, {"node_id": request.node_id, "amount": request.amount, "seq": seq},
         f"{request.node_id}: stake +{request.amount} (entry {seq})")  # fmt: skip


@ledger_stake.command("withdraw", epilog=EXIT_CODES_HELP)
@request_options("amount", "The amount to withdraw (with --key).")
@ledger_option
@verifier_key_option
@json_option
def ledger_stake_withdraw(
    request_file: Path | None, party_key: Path | None, amount: int | None, ledger_url: str, verifier_key: Path,
    as_json: bool,
) -> None:  # fmt: skip
    """Start withdrawing stake, on the node's own signed request: it unbonds (and can still be slashed) for the
    ledger's unbonding delay, then `ledger stake release` pays out what is left of it."""
    from verimesh.settlement import withdraw

    led = _open(ledger_url)
    request = _request(led, "withdraw", request_file, party_key, amount)
    seq = withdraw(led, request, writer=load_signing_key(verifier_key))
    release_after = led.entry(seq).event["release_after"]
    emit(as_json, {"node_id": request.node_id, "amount": request.amount, "seq": seq, "release_after": release_after},
         f"{request.node_id}: {request.amount} unbonding until {release_after} (entry {seq})")  # fmt: skip


@ledger_stake.command("release", epilog=EXIT_CODES_HELP)
@click.argument("node_id")
@ledger_option
@verifier_key_option
@json_option
def ledger_stake_release(node_id: str, ledger_url: str, verifier_key: Path, as_json: bool) -> None:
    """Release NODE_ID's withdrawals whose unbonding delay has passed (what slashes left of them)."""
    from verimesh.settlement import release

    led = _open(ledger_url)
    seqs = release(led, node_id, writer=load_signing_key(verifier_key))
    emit(as_json, {"node_id": node_id, "seqs": seqs}, f"{node_id}: released (entries {', '.join(map(str, seqs))})")


@ledger.group("job", epilog=EXIT_CODES_HELP)
def ledger_job() -> None:
    """Jobs the ledger knows: only they earn rewards, out of their owner's deposit."""


@ledger_job.command("register", epilog=EXIT_CODES_HELP)
@request_options("deposit", "The deposit rewards are paid from (with --key).")
@click.option("--job", "job_file", type=click.Path(dir_okay=False, path_type=Path), help="The job file (with --key).")
@ledger_option
@verifier_key_option
@json_option
def ledger_job_register(
    request_file: Path | None, party_key: Path | None, amount: int | None, job_file: Path | None, ledger_url: str,
    verifier_key: Path, as_json: bool,
) -> None:  # fmt: skip
    """Post a job with its owner's deposit, on the owner's signed request. A node is never rewarded for a job its
    own key posted."""
    from verimesh.settlement import register_job

    led = _open(ledger_url)
    job_id = None
    if party_key is not None:
        if job_file is None:
            raise click.UsageError("--key needs --job")
        from verimesh.jobs.job import load_job

        job_id = load_job(job_file).job_id
    request = _request(led, "job", request_file, party_key, amount, job_id=job_id)
    seq = register_job(led, request, writer=load_signing_key(verifier_key))
    job = request.request["job_id"]
    payload = {"job_id": job, "owner": request.node_id, "deposit": request.amount, "seq": seq}
    emit(as_json, payload, f"job {job} posted by {request.node_id}, deposit {request.amount} (entry {seq})")


@ledger.command("reputation", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Job size used to show the audit rate in force.",
)
@json_option
def ledger_reputation(ledger_url: str, steps: int, as_json: bool) -> None:
    """Per node: score, checked-valid streak, stake, slashed, audit rate in force (derived from the events,
    every one checked first: a ledger that does not verify is refused)."""
    from verimesh.settlement import all_standings

    table = all_standings(_open(ledger_url))
    rows = []
    for node in sorted(table.values(), key=lambda n: n.node_id):
        row = node.to_json()
        row["audit_rate"] = round(node.audit_rate(steps, 1), 4)
        rows.append(row)
    if as_json:
        emit(True, {"nodes": rows, "steps_assumed": steps}, "")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"reputation ({plural(len(rows), 'node')}; audit rate for {steps}-step jobs)")
    for col in ("node", "score", "streak", "accepted", "rejected", "stake", "unbonding", "slashed", "rewards",
                "audit"):  # fmt: skip
        t.add_column(col)
    for r in rows:
        counts = [str(r[k]) for k in ("streak", "accepted", "rejected", "stake", "unbonding", "slashed", "rewards")]
        t.add_row(r["node_id"], f"{r['score']:.3f}", *counts, f"{r['audit_rate']:.0%} ({r['audit']})")
    Console(width=170).print(t)


@ledger.command("show", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option("--node", "node_id", help="Only this node's entries.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the last N entries.")
@json_option
def ledger_show(ledger_url: str, node_id: str | None, limit: int | None, as_json: bool) -> None:
    """List ledger entries as stored (oldest first); `ledger verify` checks them."""
    from collections import deque

    entries = deque(_open(ledger_url).entries(node_id=node_id), maxlen=limit)
    events = []
    for e in entries:
        event = e.event
        for long in ("envelope", "request", "signature"):  # `ledger prove` shows an entry whole
            event.pop(long, None)
        events.append(event)
    if as_json:
        emit(True, {"entries": events}, "")
        return
    for ev in events:
        detail = {k: v for k, v in ev.items() if k not in ("seq", "kind", "time", "node_id")}
        click.echo(f"{ev['seq']:>8}  {ev['time']}  {ev['kind']:<15} {ev.get('node_id') or '-':<24} "
                   f"{json.dumps(detail, sort_keys=True)[:110]}")  # fmt: skip


@ledger.command("checkpoint", epilog=EXIT_CODES_HELP)
@ledger_option
@operator_secret_option(required=False)
@click.option(
    "-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="Also save the signed tree head here."
)
@json_option
def ledger_checkpoint(ledger_url: str, operator_key: Path | None, out: Path | None, as_json: bool) -> None:
    """Check the log since the last checkpoint, then sign the current tree head (size, root) and log it."""
    led = _open(ledger_url)
    cp = led.checkpoint(_operator(led, operator_key))
    doc = cp.to_json()
    if out:
        write_report(out, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    emit(as_json, doc, f"checkpoint: {cp.tree_size} entries, root {doc['root']}" + (f"; saved to {out}" if out else ""))


@ledger.command("prove", epilog=EXIT_CODES_HELP)
@click.argument("entry", type=click.IntRange(min=0))
@ledger_option
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the proof here.")
def ledger_prove(entry: int, ledger_url: str, out: Path | None) -> None:
    """An inclusion proof of ENTRY under the latest signed checkpoint, verifiable offline: written
    to --out (a one-line summary on stdout), else printed."""
    from verimesh.ledger.store import inclusion_document

    doc = inclusion_document(_open(ledger_url), entry)
    text = json.dumps(doc, indent=2, sort_keys=True)
    if out:
        write_report(out, text + "\n")
        click.echo(f"inclusion proof of entry {entry} written to {out}")
    else:
        click.echo(text)


@ledger.command("check-proof", epilog=EXIT_CODES_HELP)
@click.argument("proof", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--operator-key",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The operator's public key file.",
)
@json_option
@click.pass_context
def ledger_check_proof(ctx: click.Context, proof: Path, operator_key: Path, as_json: bool) -> None:
    """Check an inclusion proof offline: exit 0 when the entry is in the signed log."""
    from verimesh.ledger.store import check_inclusion_document
    from verimesh.signing.keys import load_public_key

    ok, event, reason = check_inclusion_document(proof, load_public_key(operator_key))
    emit(as_json, {"included": ok, "reason": reason, "entry": event},
          f"{'INCLUDED' if ok else 'NOT PROVEN'}: {reason}")  # fmt: skip
    if not ok:
        ctx.exit(EXIT_REJECTED)


@ledger.command("verify", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option(
    "--operator-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The operator's public key file, kept outside the database: the genesis must name it (anchors the check).",
)
@click.option(
    "--checkpoint",
    "checkpoint_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A signed tree head saved earlier: the log must still extend it (anchors the check).",
)
@click.option("--rules", is_flag=True, help="Also replay the protocol's rules over the log (evidence re-checked).")
@json_option
@click.pass_context
def ledger_verify(
    ctx: click.Context, ledger_url: str, operator_key: Path | None, checkpoint_file: Path | None, rules: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Recompute the whole log and check every writer's signature (with --rules, every rule too); exit 0 intact,
    1 tampered or a rule broken (naming the first bad entry). Without --operator-key or --checkpoint the result is
    only as good as the operator key stored in the database itself."""
    from verimesh.ledger.store import Checkpoint
    from verimesh.settlement import audit_ledger
    from verimesh.signing.keys import load_public_key

    cp = Checkpoint.from_file(checkpoint_file) if checkpoint_file else None
    operator = load_public_key(operator_key) if operator_key else None
    bar, update = progress_bar("verifying", not as_json)
    if bar:
        bar.start()
    try:
        report = audit_ledger(_open(ledger_url), operator=operator, checkpoint=cp, rules=rules, progress=update)
    finally:
        if bar:
            bar.stop()
    if as_json:
        emit(True, report.to_json(), "")
    elif report.ok:
        held = "; every rule holds" if rules else ""
        click.echo(f"INTACT: {report.size} entries, {report.commits_checked} signed batches, "
                   f"{report.checkpoints_checked} checkpoints, root {report.to_json()['root']}{held}")  # fmt: skip
        click.echo(f"  trust: {report.trust}")
    else:
        click.echo(f"TAMPERED: first bad entry {report.first_bad_entry}")
        for problem in [*report.problems, *report.violations][:20]:
            click.echo(f"  {problem}")
        click.echo(f"  trust: {report.trust}")
    if not report.ok:
        ctx.exit(EXIT_REJECTED)


@ledger.command("slash", epilog=EXIT_CODES_HELP)
@click.option("--evidence", type=click.Path(dir_okay=False, path_type=Path), required=True)
@ledger_option
@verifier_key_option
@json_option
def ledger_slash(evidence: Path, ledger_url: str, verifier_key: Path, as_json: bool) -> None:
    """Slash a node with evidence, re-checked first (equivocation: the slashable stake; fraud: a fraction), once
    per (node, job, step range) claim. Exit 1: the evidence does not prove fraud; 3: refused (unknown node, no
    stake, or the claim already slashed)."""
    from verimesh.settlement import slash_with_evidence

    result = slash_with_evidence(_open(ledger_url), evidence, writer=load_signing_key(verifier_key))
    emit(as_json, result.to_json(),
          f"slashed {result.node_id} by {result.amount} ({result.reason}), evidence {result.evidence_digest} "
          f"(entry {result.seq})")  # fmt: skip


@ledger.command("bench", epilog=EXIT_CODES_HELP)
@click.option("--entries", type=click.IntRange(min=10), default=100_000, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write results as JSON.")
def ledger_bench(entries: int, batch: int, json_out: Path | None) -> None:
    """Appends per second (signed batches, SQLite), proof times and `verify --rules` at the given size."""
    from verimesh.assurance.bench import bench_ledger, ledger_table

    result = bench_ledger(entries, batch=batch)
    click.echo("\n".join(ledger_table([result])))
    if json_out:
        write_report(json_out, json.dumps(result, indent=2) + "\n")
