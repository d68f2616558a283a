"""Node identity: BLS12-381 key pairs, node ids, key files.

Secret key file (JSON, written 0600, never printed)::

    {"type": "verimesh/bls-secret-key", "version": 1, "suite": SUITE, "node_id": ..., "public_key": hex,
     "proof_of_possession": hex, "secret": {"encoding": "plain", "key": hex}
                                        | {"encoding": "scrypt-aes-256-gcm", "kdf": {...}, "nonce": hex,
                                           "ciphertext": hex}}

Public key file: the same without ``secret``, type ``verimesh/bls-public-key``. The node id is
``vm-`` followed by the first 20 hex digits of SHA-256(public key).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verimesh.core.canonical import parse_json
from verimesh.core.files import read_user_file
from verimesh.errors import InvalidInputError
from verimesh.signing import _bls

SUITE = "BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_"
SECRET_TYPE = "verimesh/bls-secret-key"
PUBLIC_TYPE = "verimesh/bls-public-key"
_SCRYPT = {"n": 2**15, "r": 8, "p": 1, "dklen": 32}
MAX_KEY_FILE_BYTES = 64 * 1024


def node_id_for(public_key: bytes) -> str:
    return "vm-" + hashlib.sha256(public_key).hexdigest()[:20]


@dataclass(frozen=True)
class PublicKey:
    key: bytes
    proof_of_possession: bytes

    def __post_init__(self) -> None:
        if len(self.key) != _bls.PUBLIC_KEY_BYTES or len(self.proof_of_possession) != _bls.SIGNATURE_BYTES:
            raise InvalidInputError("public key must be 48 bytes and its proof of possession 96 bytes")

    @property
    def node_id(self) -> str:
        return node_id_for(self.key)

    def verify(self, message: bytes, signature: bytes) -> bool:
        return _bls.verify(self.key, message, signature)

    def check_possession(self) -> bool:
        """Proof of possession (needed before this key is aggregated with others); about 1 s."""
        return _bls.pop_verify(self.key, self.proof_of_possession)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": PUBLIC_TYPE,
            "version": 1,
            "suite": SUITE,
            "node_id": self.node_id,
            "public_key": self.key.hex(),
            "proof_of_possession": self.proof_of_possession.hex(),
        }


@dataclass(frozen=True)
class SecretKey:
    secret: int = field(repr=False)
    public: PublicKey

    def sign(self, message: bytes) -> bytes:
        signature = _bls.backend().sign(self.secret, message)
        _bls.signed(self.public.key, message, signature)  # ``public`` is this secret's (both constructors check)
        return signature

    @property
    def node_id(self) -> str:
        return self.public.node_id


def generate_key() -> SecretKey:
    sk = _bls.keygen(secrets.token_bytes(32))
    pk = _bls.backend().sk_to_pk(sk)
    return SecretKey(sk, PublicKey(pk, _bls.pop_prove(sk)))


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise InvalidInputError(f"{path} already exists", hint="pass --force to overwrite it") from exc
    except OSError as exc:
        raise InvalidInputError(f"cannot write {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(data)


def _encrypt(secret: bytes, passphrase: str) -> dict[str, Any]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    key = hashlib.scrypt(passphrase.encode("utf-8"), salt=salt, **_SCRYPT, maxmem=2**26)
    ct = AESGCM(key).encrypt(nonce, secret, SECRET_TYPE.encode())
    kdf = {"function": "scrypt", "salt": salt.hex(), **_SCRYPT}
    return {"encoding": "scrypt-aes-256-gcm", "kdf": kdf, "nonce": nonce.hex(), "ciphertext": ct.hex()}


def _decrypt(blob: dict[str, Any], passphrase: str, path: Path) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        kdf = blob["kdf"]
        if kdf["function"] != "scrypt" or not all(isinstance(kdf[k], int) for k in ("n", "r", "p", "dklen")):
            raise InvalidInputError(f"{path}: unsupported key derivation")
        if kdf["n"] > 2**20 or kdf["r"] > 16 or kdf["p"] > 4 or kdf["dklen"] != 32:
            raise InvalidInputError(f"{path}: scrypt parameters out of bounds")
        key = hashlib.scrypt(
            passphrase.encode("utf-8"),
            salt=bytes.fromhex(kdf["salt"]),
            n=kdf["n"],
            r=kdf["r"],
            p=kdf["p"],
            dklen=32,
            maxmem=2**28,
        )
        return AESGCM(key).decrypt(
            bytes.fromhex(blob["nonce"]), bytes.fromhex(blob["ciphertext"]), SECRET_TYPE.encode()
        )
    except InvalidTag as exc:
        raise InvalidInputError(f"wrong passphrase for {path}", code="bad-passphrase") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{path}: malformed encrypted key ({exc})") from exc


def write_key_pair(path: Path, key: SecretKey, *, passphrase: str | None = None, overwrite: bool = False) -> Path:
    """Write ``path`` (secret, 0600) and ``path.pub`` (public key + proof of possession)."""
    import json

    raw = key.secret.to_bytes(_bls.SECRET_KEY_BYTES, "big")
    secret = _encrypt(raw, passphrase) if passphrase else {"encoding": "plain", "key": raw.hex()}
    doc = {**key.public.to_json(), "type": SECRET_TYPE, "secret": secret}
    pub_path = path.with_name(path.name + ".pub")
    _write_private(path, (json.dumps(doc, indent=2) + "\n").encode(), overwrite=overwrite)
    write_public_key(pub_path, key.public, overwrite=overwrite)
    return pub_path


def write_public_key(path: Path, public: PublicKey, *, overwrite: bool = False) -> None:
    import json

    if path.exists() and not overwrite:
        raise InvalidInputError(f"{path} already exists", hint="pass --force to overwrite it")
    path.write_text(json.dumps(public.to_json(), indent=2) + "\n")


def _read_key_doc(path: Path) -> dict[str, Any]:
    data = read_user_file(path, what="key file", max_bytes=MAX_KEY_FILE_BYTES)
    doc = parse_json(data, what=f"key file {path}", max_bytes=MAX_KEY_FILE_BYTES)
    if not isinstance(doc, dict) or doc.get("type") not in (SECRET_TYPE, PUBLIC_TYPE):
        raise InvalidInputError(f"{path} is not a verimesh key file")
    if doc.get("version") != 1 or doc.get("suite") != SUITE:
        raise InvalidInputError(f"{path}: unsupported key version or suite")
    return doc


def _public_from_doc(doc: dict[str, Any], path: Path) -> PublicKey:
    try:
        public = PublicKey(bytes.fromhex(doc["public_key"]), bytes.fromhex(doc["proof_of_possession"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{path}: malformed public key") from exc
    if doc.get("node_id") != public.node_id:
        raise InvalidInputError(f"{path}: node_id does not match the public key")
    return public


def public_key_from_json(doc: Any, *, what: str = "public key") -> PublicKey:
    """A public key from its JSON form (``PublicKey.to_json``), e.g. one a receipt carries."""
    if not isinstance(doc, dict) or (doc.get("type"), doc.get("version"), doc.get("suite")) != (PUBLIC_TYPE, 1, SUITE):
        raise InvalidInputError(f"{what} is not a verimesh public key")
    return _public_from_doc(doc, Path(what))


def load_public_key(path: Path) -> PublicKey:
    """A public key from a ``.pub`` file (or from a secret key file's public half)."""
    doc = _read_key_doc(path)
    return _public_from_doc(doc, path)


def key_is_encrypted(path: Path) -> bool:
    doc = _read_key_doc(path)
    secret = doc.get("secret")
    return isinstance(secret, dict) and secret.get("encoding") != "plain"


def load_secret_key(path: Path, *, passphrase: str | None = None) -> SecretKey:
    doc = _read_key_doc(path)
    if doc["type"] != SECRET_TYPE:
        raise InvalidInputError(f"{path} is a public key; signing needs the secret key file")
    public = _public_from_doc(doc, path)
    secret = doc.get("secret")
    if not isinstance(secret, dict):
        raise InvalidInputError(f"{path}: no secret in key file")
    if secret.get("encoding") == "plain":
        try:
            raw = bytes.fromhex(secret["key"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"{path}: malformed secret key") from exc
    elif passphrase is None:
        raise InvalidInputError(
            f"{path} is encrypted", code="passphrase-required", hint="set VERIMESH_PASSPHRASE or run interactively"
        )
    else:
        raw = _decrypt(secret, passphrase, path)
    if len(raw) != _bls.SECRET_KEY_BYTES:
        raise InvalidInputError(f"{path}: secret key must be 32 bytes")
    sk = int.from_bytes(raw, "big")
    if not 0 < sk < _bls.CURVE_ORDER:
        raise InvalidInputError(f"{path}: secret key out of range")
    if _bls.backend().sk_to_pk(sk) != public.key:
        raise InvalidInputError(f"{path}: secret key does not match its public key")
    return SecretKey(sk, public)
