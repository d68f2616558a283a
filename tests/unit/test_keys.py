"""Keys and signatures: the fast backend is byte-identical to the py_ecc reference."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from verimesh.errors import InvalidInputError
from verimesh.signing import _bls
from verimesh.signing.keys import generate_key, load_public_key, load_secret_key, node_id_for, write_key_pair

FAST = ("blspy", "milagro")


def test_both_fast_backends_are_installed_and_the_fastest_is_default() -> None:
    assert _bls.available_backends() == FAST
    assert _bls.backend().name in (os.environ.get("VERIMESH_BLS_BACKEND") or "blspy",)


@pytest.mark.parametrize("name", FAST)
def test_fast_backend_is_byte_identical_to_py_ecc(name: str) -> None:
    ref, fast = _bls.PyEccBackend(), _bls.backend(name)
    keys = [generate_key() for _ in range(3)]
    messages = [b"verimesh", b"", b"\x00" * 100]
    for key in keys:
        assert fast.sk_to_pk(key.secret) == ref.sk_to_pk(key.secret) == key.public.key
    sigs = [fast.sign(k.secret, m) for k, m in zip(keys, messages, strict=True)]
    assert sigs == [ref.sign(k.secret, m) for k, m in zip(keys, messages, strict=True)]
    for k, m, s in zip(keys, messages, sigs, strict=True):
        assert fast.verify(k.public.key, m, s) and ref.verify(k.public.key, m, s)
        assert not fast.verify(k.public.key, m + b"x", s) and not ref.verify(k.public.key, m + b"x", s)
    assert fast.aggregate(sigs) == ref.aggregate(sigs)
    agg = fast.aggregate(sigs)
    pks = [k.public.key for k in keys]
    assert fast.aggregate_verify(pks, messages, agg) and ref.aggregate_verify(pks, messages, agg)
    same = [fast.sign(k.secret, b"one message") for k in keys]
    one = fast.aggregate(same)
    assert fast.fast_aggregate_verify(pks, b"one message", one) and ref.fast_aggregate_verify(pks, b"one message", one)
    assert not fast.fast_aggregate_verify(pks[:2], b"one message", one)
    assert not ref.fast_aggregate_verify(pks[:2], b"one message", one)


@pytest.mark.parametrize("backend", ["py_ecc", *FAST])
def test_malformed_signatures_are_false_not_exceptions(backend: str) -> None:
    b = _bls.backend(backend)
    key = generate_key()
    for sig in (b"", b"\x00" * 96, b"\xff" * 96, b"\xc0" + b"\x00" * 95, b"\x01" * 95):
        assert b.verify(key.public.key, b"m", sig) is False
    identity = b"\xc0" + b"\x00" * 47  # KeyValidate refuses the identity as a public key
    for pk in (b"\x00" * 48, identity, b"\xff" * 48, b"", key.public.key[:47]):
        assert b.verify(pk, b"m", key.sign(b"m")) is False
    assert b.verify(identity, b"m", b"\xc0" + b"\x00" * 95) is False
    assert b.fast_aggregate_verify([], b"m", key.sign(b"m")) is False
    assert b.fast_aggregate_verify([identity], b"m", b"\xc0" + b"\x00" * 95) is False
    assert b.aggregate_verify([key.public.key], [b"m", b"n"], key.sign(b"m")) is False


def test_proof_of_possession() -> None:
    key, other = generate_key(), generate_key()
    assert key.public.check_possession()
    forged = type(key.public)(key.public.key, other.public.proof_of_possession)
    assert not forged.check_possession()


def test_key_files(tmp_path: Path) -> None:
    key = generate_key()
    pub = write_key_pair(tmp_path / "k", key)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert load_public_key(pub) == key.public
    assert load_secret_key(tmp_path / "k").secret == key.secret
    assert key.node_id == node_id_for(key.public.key) and key.node_id.startswith("vm-")
    assert str(key.secret) not in repr(key)
    with pytest.raises(InvalidInputError, match="public key"):
        load_secret_key(pub)
    doc = json.loads(pub.read_text())
    doc["node_id"] = "vm-" + "0" * 20
    (tmp_path / "bad.pub").write_text(json.dumps(doc))
    with pytest.raises(InvalidInputError, match="node_id"):
        load_public_key(tmp_path / "bad.pub")


def test_encrypted_key_files(tmp_path: Path) -> None:
    key = generate_key()
    write_key_pair(tmp_path / "k", key, passphrase="hunter2")
    text = (tmp_path / "k").read_text()
    assert f"{key.secret:064x}" not in text
    with pytest.raises(InvalidInputError, match="encrypted"):
        load_secret_key(tmp_path / "k")
    with pytest.raises(InvalidInputError, match="wrong passphrase"):
        load_secret_key(tmp_path / "k", passphrase="hunter3")
    assert load_secret_key(tmp_path / "k", passphrase="hunter2").secret == key.secret


def test_secret_that_does_not_match_its_public_key(tmp_path: Path) -> None:
    a, b = generate_key(), generate_key()
    write_key_pair(tmp_path / "a", a)
    doc = json.loads((tmp_path / "a").read_text())
    doc["secret"]["key"] = f"{b.secret:064x}"
    (tmp_path / "a").write_text(json.dumps(doc))
    with pytest.raises(InvalidInputError, match="does not match"):
        load_secret_key(tmp_path / "a")


def test_the_fast_proof_of_possession_agrees_with_py_ecc(monkeypatch: pytest.MonkeyPatch) -> None:
    from verimesh.signing import _bls
    from verimesh.signing.keys import generate_key

    key, other = generate_key(), generate_key()
    flipped = bytearray(key.public.proof_of_possession)
    flipped[-1] ^= 1
    cases = [(key.public.key, key.public.proof_of_possession), (key.public.key, other.public.proof_of_possession),
             (key.public.key, bytes(flipped)), (b"\x00" * 48, key.public.proof_of_possession)]  # fmt: skip
    fast = [_bls.pop_verify(pk, pop) for pk, pop in cases]
    monkeypatch.setenv("VERIMESH_BLS_BACKEND", "py_ecc")
    assert fast == [_bls.pop_verify(pk, pop) for pk, pop in cases] == [True, False, False, False]
