"""``verimesh keys``: node identity (BLS12-381 key pairs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from verimesh.cli.common import (
    EXIT_CODES_HELP,
    ask_passphrase,
    emit,
    force_option,
    json_option,
)
from verimesh.errors import EXIT_REJECTED


@click.group(epilog=EXIT_CODES_HELP)
def keys() -> None:
    """Node identity: BLS12-381 key pairs."""


@keys.command("new", epilog=EXIT_CODES_HELP)
@click.option(
    "-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Secret key file to write."
)
@click.option(
    "--encrypt",
    is_flag=True,
    help="Encrypt the secret (scrypt + AES-256-GCM); passphrase from VERIMESH_PASSPHRASE or a prompt.",
)
@force_option
@json_option
def keys_new(out: Path, encrypt: bool, force: bool, as_json: bool) -> None:
    """Write OUT (secret, mode 0600) and OUT.pub (public key + proof of possession)."""
    from verimesh.signing.keys import generate_key, write_key_pair

    passphrase = ask_passphrase(confirm=True) if encrypt else None
    key = generate_key()
    pub = write_key_pair(out, key, passphrase=passphrase, overwrite=force)
    payload = {"node_id": key.node_id, "secret_key": str(out), "public_key": str(pub), "encrypted": encrypt}
    emit(as_json, payload, f"{key.node_id}\nwrote {out} (secret, 0600) and {pub}")


@keys.command("show", epilog=EXIT_CODES_HELP)
@click.argument("key_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--check-pop", is_flag=True, help="Also verify the proof of possession (about 1 s).")
@json_option
def keys_show(key_file: Path, check_pop: bool, as_json: bool) -> None:
    """Show a key file's node id and public key (never the secret)."""
    from verimesh.signing.keys import SUITE, key_is_encrypted, load_public_key

    public = load_public_key(key_file)
    payload: dict[str, Any] = {"node_id": public.node_id, "public_key": public.key.hex(), "suite": SUITE}
    if key_file.suffix != ".pub":
        payload["secret_encrypted"] = key_is_encrypted(key_file)
    if check_pop:
        payload["proof_of_possession_valid"] = public.check_possession()
    lines = [f"node id     {public.node_id}", f"public key  {public.key.hex()}", f"suite       {SUITE}"]
    if check_pop:
        lines.append(f"possession  {'valid' if payload['proof_of_possession_valid'] else 'INVALID'}")
    emit(as_json, payload, "\n".join(lines))
    if check_pop and not payload["proof_of_possession_valid"]:
        click.get_current_context().exit(EXIT_REJECTED)
