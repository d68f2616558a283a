"""``verimesh ledger``: the tamper-evident reputation ledger."""

from __future__ import annotations

import json
from pathlib import Path

import click

from verimesh.cli.common import (
    EXIT_CODES_HELP,
    ask_passphrase,
    emit,
    json_option,
    ledger_option,
    load_signing_key,
    write_report,
)
from verimesh.errors import EXIT_REJECTED


@click.group(epilog=EXIT_CODES_HELP)
def ledger() -> None:
    """The tamper-evident reputation ledger."""


@ledger.command("init", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option(
    "--operator-key",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The operator's secret key file (signs checkpoints); its path is remembered.",
)
@click.option(
    "--fraud-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.5,
    show_default=True,
    help="Share of the stake a proven fraud takes (equivocation takes all).",
)
@click.option("--reward", type=click.IntRange(min=0), default=1, show_default=True, help="Reward per accepted job.")
@json_option
def ledger_init(ledger_url: str, operator_key: Path, fraud_fraction: float, reward: int, as_json: bool) -> None:
    """Create an empty ledger."""
    from verimesh.ledger.store import Ledger, display_url

    key = load_signing_key(operator_key)
    led = Ledger.create(ledger_url, key, operator_key_path=operator_key,
                        settings={"fraud_fraction": repr(fraud_fraction), "reward": str(reward)})  # fmt: skip
    payload = {"ledger": display_url(ledger_url), "ledger_id": led.ledger_id, "operator": key.node_id}
    emit(as_json, payload, f"created ledger {led.ledger_id} at {payload['ledger']} (operator {key.node_id})")


@ledger.command("register", epilog=EXIT_CODES_HELP)
@click.argument("public_key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--stake", type=click.IntRange(min=1), required=True)
@ledger_option
@json_option
def ledger_register(public_key: Path, stake: int, ledger_url: str, as_json: bool) -> None:
    """Register a node with a stake (its proof of possession is checked first)."""
    from verimesh.ledger.store import Ledger
    from verimesh.settlement import register_node
    from verimesh.signing.keys import load_public_key

    public = load_public_key(public_key)
    seq = register_node(Ledger.open(ledger_url), public, stake=stake)
    emit(as_json, {"node_id": public.node_id, "stake": stake, "seq": seq},
          f"registered {public.node_id} with stake {stake} (entry {seq})")  # fmt: skip


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
    """Per node: score, checked-valid streak, stake, slashed, audit rate in force (derived from events)."""
    from verimesh.ledger.store import Ledger
    from verimesh.settlement import all_standings

    table = all_standings(Ledger.open(ledger_url))
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

    t = Table(title=f"reputation ({len(rows)} nodes; audit rate for {steps}-step jobs)")
    for col in ("node", "score", "streak", "accepted", "rejected", "stake", "slashed", "rewards", "audit"):
        t.add_column(col)
    for r in rows:
        counts = [str(r[k]) for k in ("streak", "accepted", "rejected", "stake", "slashed", "rewards")]
        t.add_row(r["node_id"], f"{r['score']:.3f}", *counts, f"{r['audit_rate']:.0%} ({r['audit']})")
    Console(width=160).print(t)


@ledger.command("show", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option("--node", "node_id", help="Only this node's entries.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the last N entries.")
@json_option
def ledger_show(ledger_url: str, node_id: str | None, limit: int | None, as_json: bool) -> None:
    """List ledger entries (oldest first)."""
    from collections import deque

    from verimesh.ledger.store import Ledger

    entries = deque(Ledger.open(ledger_url).entries(node_id=node_id), maxlen=limit)
    events = []
    for e in entries:
        event = e.event
        event.pop("envelope", None)  # the receipt's envelope is long; `ledger prove` shows it whole
        events.append(event)
    if as_json:
        emit(True, {"entries": events}, "")
        return
    for ev in events:
        detail = {k: v for k, v in ev.items() if k not in ("seq", "kind", "time", "node_id")}
        click.echo(f"{ev['seq']:>8}  {ev['time']}  {ev['kind']:<10} {ev.get('node_id') or '-':<24} "
                   f"{json.dumps(detail, sort_keys=True)[:110]}")  # fmt: skip


@ledger.command("checkpoint", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option(
    "--operator-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Operator secret key (default: the one given at init).",
)
@click.option(
    "-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="Also save the signed tree head here."
)
@json_option
def ledger_checkpoint(ledger_url: str, operator_key: Path | None, out: Path | None, as_json: bool) -> None:
    """Sign the current tree head (size, root) and log it."""
    from verimesh.ledger.store import Ledger

    led = Ledger.open(ledger_url)
    key_path = operator_key or (Path(led.meta["operator_key_path"]) if led.meta.get("operator_key_path") else None)
    from verimesh.signing.keys import key_is_encrypted

    passphrase = ask_passphrase(confirm=False) if key_path and key_is_encrypted(key_path) else None
    cp = led.checkpoint(led.operator_key(operator_key, passphrase=passphrase))
    doc = cp.to_json()
    if out:
        out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    emit(as_json, doc, f"checkpoint: {cp.tree_size} entries, root {doc['root']}" + (f"; saved to {out}" if out else ""))


@ledger.command("prove", epilog=EXIT_CODES_HELP)
@click.argument("entry", type=click.IntRange(min=0))
@ledger_option
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the proof here.")
def ledger_prove(entry: int, ledger_url: str, out: Path | None) -> None:
    """An inclusion proof of ENTRY under the latest signed checkpoint, verifiable offline."""
    from verimesh.ledger.store import Ledger, inclusion_document

    doc = inclusion_document(Ledger.open(ledger_url), entry)
    text = json.dumps(doc, indent=2, sort_keys=True)
    if out:
        out.write_text(text + "\n")
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
    "--checkpoint",
    "checkpoint_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A signed tree head saved earlier: the log must still extend it.",
)
@json_option
@click.pass_context
def ledger_verify(ctx: click.Context, ledger_url: str, checkpoint_file: Path | None, as_json: bool) -> None:
    """Recompute the whole log; exit 0 intact, 1 tampered (naming the first bad entry)."""
    from verimesh.ledger.store import Checkpoint, Ledger, verify_ledger

    cp = Checkpoint.from_file(checkpoint_file) if checkpoint_file else None
    report = verify_ledger(Ledger.open(ledger_url), checkpoint=cp)
    if as_json:
        emit(True, report.to_json(), "")
    elif report.ok:
        click.echo(f"INTACT: {report.size} entries, {report.checkpoints_checked} checkpoints, "
                   f"root {report.to_json()['root']}")  # fmt: skip
    else:
        click.echo(f"TAMPERED: first bad entry {report.first_bad_entry}")
        for problem in report.problems[:20]:
            click.echo(f"  {problem}")
    if not report.ok:
        ctx.exit(EXIT_REJECTED)


@ledger.command("slash", epilog=EXIT_CODES_HELP)
@click.option("--evidence", type=click.Path(dir_okay=False, path_type=Path), required=True)
@ledger_option
@json_option
def ledger_slash(evidence: Path, ledger_url: str, as_json: bool) -> None:
    """Slash a node with evidence (equivocation: the whole stake; fraud: a fraction), re-checked first."""
    from verimesh.ledger.store import Ledger
    from verimesh.settlement import slash_with_evidence

    result = slash_with_evidence(Ledger.open(ledger_url), evidence)
    emit(as_json, result.to_json(),
          f"slashed {result.node_id} by {result.amount} ({result.reason}), evidence {result.evidence_digest} "
          f"(entry {result.seq})")  # fmt: skip


@ledger.command("bench", epilog=EXIT_CODES_HELP)
@click.option("--entries", type=click.IntRange(min=10), default=100_000, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write results as JSON.")
def ledger_bench(entries: int, batch: int, json_out: Path | None) -> None:
    """Appends per second (batched, SQLite) and proof times at the given size."""
    from verimesh.assurance.bench import bench_ledger, ledger_table

    result = bench_ledger(entries, batch=batch)
    click.echo("\n".join(ledger_table([result])))
    if json_out:
        write_report(json_out, json.dumps(result, indent=2) + "\n")
