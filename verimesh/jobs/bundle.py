"""Bundles: the one file a worker hands back (docs/format.md §5-§6).

A canonical verimesh container (see ``container``) with members, in this order::

    tensors/000000.bin ... raw little-endian C-order data of the i-th trace tensor
    proofs/000000.json ... zk mode: the ezkl proof of step i, as ezkl wrote it
    trace.json             canonical JSON: {"version", "tensors": [{name, dtype, shape[, digest]}, ...]},
                           tensors in trace order
    envelope.json          DSSE envelope, canonical JSON

Tensors come first so that a worker can stream each step's outputs to disk while the next step
runs; the envelope comes last.

Format 2 (jobs of version 2) seals the bundle: the signed commitment is an RFC 9162 root over
one leaf per member before the envelope (``member_leaf``: BLAKE3 over the member's name and
bytes), so every byte the node ships is covered by its signature, and nothing in trace.json is a
claim about bytes elsewhere. Format 1 (version 1 jobs, still verified) commits to the tensor
digests trace.json declares.

Parsing is bounded and structural only: it never trusts a digest; the verifier recomputes them.
A format 2 bundle is parsed as far as the seal needs (the container and the envelope); what the
sealed members say is checked after the seal, so that a node is answerable for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verimesh.core import merkle
from verimesh.core.canonical import b64decode_strict, b64encode, canonical_json, parse_canonical_json
from verimesh.core.container import (
    DEFAULT_LIMITS,
    ContainerWriter,
    Limits,
    container_bytes,
    crc32,
    read_container,
    read_container_file,
    write_container,
)
from verimesh.core.digest import member_leaf, member_leaf_and_crc, tensor_bytes
from verimesh.core.tensors import TensorRef
from verimesh.core.threads import map_bytes
from verimesh.errors import InvalidInputError
from verimesh.signing.envelope import Envelope

BUNDLE_VERSIONS = (1, 2)
SEAL_ALGORITHM = "rfc9162-sha256/blake3-member-leaves"


def sealed_root(leaves: Sequence[bytes]) -> bytes:
    """Format 2: the RFC 9162 root over the sealed members' leaves (each a BLAKE3 digest)."""
    return merkle.root_from_leaf_hashes([merkle.leaf_hash(leaf) for leaf in leaves])


@dataclass(frozen=True)
class Bundle:
    envelope: Envelope
    trace: tuple[TensorRef, ...]  # format 2: digest is the member's leaf ("blake3:<hex>"), computed here
    trace_bytes: bytes
    tensors: dict[str, np.ndarray]  # read-only views into a private copy of the file
    proofs: tuple[bytes, ...] = ()
    version: int = 1
    members: tuple[tuple[str, memoryview], ...] = ()  # format 2: every member before envelope.json
    leaves: tuple[bytes, ...] = ()  # format 2: their commitment leaves, in order
    problems: tuple[tuple[str, str], ...] = ()  # format 2: (member, what is wrong) in sealed members
    # An opened bundle (format 2, ``write_opening``): only some members, each with its position
    # and RFC 9162 inclusion proof under the signed root; ``size`` is the sealed member count.
    opened: tuple[tuple[int, tuple[bytes, ...]], ...] | None = None  # one per member, in order
    size: int = 0

    def member(self, name: str) -> memoryview:
        return dict(self.members)[name]

    @property
    def leaf_count(self) -> int:
        """Members the signed root covers."""
        return self.size if self.opened is not None else len(self.members)

    def inclusion(self, name: str) -> tuple[int, list[bytes]]:
        """A sealed member's position and its inclusion proof under the root of every member."""
        return self.inclusions([name])[0]

    def inclusions(self, names: Sequence[str]) -> list[tuple[int, list[bytes]]]:
        """``inclusion`` of each of ``names``, the leaf hashes computed once (full bundle) or the
        carried proofs taken (opened bundle)."""
        position = {n: i for i, (n, _) in enumerate(self.members)}
        if self.opened is not None:
            return [(self.opened[position[n]][0], list(self.opened[position[n]][1])) for n in names]
        hashes = [merkle.leaf_hash(leaf) for leaf in self.leaves]
        return [(position[n], merkle.inclusion_proof(hashes, position[n])) for n in names]


def trace_document(entries: tuple[TensorRef, ...], version: int = 1) -> bytes:
    if version == 1:
        return canonical_json({"version": 1, "tensors": [e.to_json() for e in entries]})
    rows = [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape)} for e in entries]
    return canonical_json({"version": version, "tensors": rows})


def tensor_member(index: int) -> str:
    return f"tensors/{index:06d}.bin"


def proof_member(index: int) -> str:
    return f"proofs/{index:06d}.json"


def leaf_digest(leaf: bytes) -> str:
    return "blake3:" + leaf.hex()


class BundleWriter:
    """Streams trace tensors into a bundle from a background thread while the caller computes.

    ``add_tensor`` returns at once; digesting, CRC and writing happen on one worker thread
    (the hashes and the CRC release the GIL, so this overlaps with onnxruntime). ``entries``
    waits for them. Format 1: ``finish`` appends trace.json and the envelope. Format 2: ``seal``
    appends the proofs and trace.json and returns every member's leaf (what the statement signs),
    then ``finish`` appends the envelope and moves the file into place.
    """

    def __init__(self, path: Path, *, version: int = 1) -> None:
        if version not in BUNDLE_VERSIONS:
            raise InvalidInputError(f"bundle format {version} is unknown")
        self.version = version
        self._writer = ContainerWriter(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verimesh-bundle")
        self._pending: list[Future[tuple[TensorRef, bytes]]] = []
        self._leaves: list[bytes] = []
        self._sealed = False

    def add_tensor(self, name: str, array: np.ndarray) -> None:
        self._pending.append(self._pool.submit(self._write_tensor, len(self._pending), name, array))

    def _write_tensor(self, index: int, name: str, array: np.ndarray) -> tuple[TensorRef, bytes]:
        data = tensor_bytes(array)
        member = tensor_member(index)
        if self.version == 1:
            entry, leaf = TensorRef.of(name, array), b""
        else:
            leaf = member_leaf(member, data)
            entry = TensorRef(name, array.dtype.name, tuple(int(d) for d in array.shape), leaf_digest(leaf))
        self._writer.add(member, data)
        return entry, leaf

    def entries(self) -> tuple[TensorRef, ...]:
        return tuple(f.result()[0] for f in self._pending)

    def seal(self, proofs: tuple[bytes, ...] = ()) -> tuple[bytes, ...]:
        """Format 2: write the proofs and trace.json; the leaves of every member so far."""
        if self.version != 2 or self._sealed:
            raise InvalidInputError("seal() is for an unsealed format 2 bundle")
        done = [f.result() for f in self._pending]
        leaves = [leaf for _, leaf in done]
        for i, proof in enumerate(proofs):
            self._writer.add(proof_member(i), proof)
            leaves.append(member_leaf(proof_member(i), proof))
        trace = trace_document(tuple(e for e, _ in done), 2)
        self._writer.add("trace.json", trace)
        leaves.append(member_leaf("trace.json", trace))
        self._leaves, self._sealed = leaves, True
        return tuple(leaves)

    def finish(self, envelope: Envelope, proofs: tuple[bytes, ...] = ()) -> int:
        entries = self.entries()
        self._pool.shutdown()
        if self.version == 1:
            for i, proof in enumerate(proofs):
                self._writer.add(proof_member(i), proof)
            self._writer.add("trace.json", trace_document(entries))
        elif not self._sealed:
            raise InvalidInputError("a format 2 bundle is sealed before its envelope is added")
        self._writer.add("envelope.json", envelope.to_bytes())
        return self._writer.close()

    def abort(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pool.shutdown(wait=True)
        self._writer.abort()


def bundle_members(
    entries: tuple[TensorRef, ...], tensors: dict[str, np.ndarray], proofs: tuple[bytes, ...] = (), *, version: int
) -> list[tuple[str, bytes | memoryview]]:
    """The members before the envelope, in order (for re-packing and for tests)."""
    members: list[tuple[str, bytes | memoryview]] = [
        (tensor_member(i), tensor_bytes(tensors[e.name])) for i, e in enumerate(entries)
    ]
    members += [(proof_member(i), p) for i, p in enumerate(proofs)]
    members.append(("trace.json", trace_document(entries, version)))
    return members


def write_bundle(
    path: Path,
    envelope: Envelope,
    entries: tuple[TensorRef, ...],
    tensors: dict[str, np.ndarray],
    proofs: tuple[bytes, ...] = (),
    *,
    version: int = 1,
) -> int:
    """Write a bundle in one go (used for re-packing; ``BundleWriter`` streams)."""
    members = bundle_members(entries, tensors, proofs, version=version)
    return write_container(path, [*members, ("envelope.json", envelope.to_bytes())])


def read_bundle(path: Path, *, limits: Limits = DEFAULT_LIMITS, version: int | None = None) -> Bundle:
    """Parse a bundle of the given format within ``limits`` (from a private copy of its bytes).

    ``version``: the format the job pins (a verifier always passes it, so a bundle cannot choose
    an older format for itself); None reads the format the bundle's trace.json names (tools).
    Format 1: any structural inconsistency refuses the whole file. Format 2: only the container
    and the envelope must parse; the sealed members are interpreted here but what is wrong with
    them is reported in ``problems`` (the node answers for sealed bytes)."""
    crcs: dict[str, int] = {}
    members = read_container_file(path, what="bundle", limits=limits, crcs=crcs)
    if version is None:
        version = _declared_version(members)
    if version == 2 and next(iter(members), None) == OPENING_NAME:
        _check_crcs(path, members, crcs)
        return _read_opened(members, what=f"opened bundle {path}")
    if version == 2:
        return _read_sealed(path, members, crcs)
    _check_crcs(path, members, crcs)
    if version != 1:
        raise InvalidInputError(f"bundle format {version} is unknown")
    names = list(members)
    if names[-2:] != ["trace.json", "envelope.json"]:
        raise InvalidInputError(f"bundle {path} must end with trace.json and envelope.json")
    envelope = Envelope.from_bytes(bytes(members["envelope.json"]), what="bundle envelope")
    trace_bytes = bytes(members["trace.json"])
    doc = parse_canonical_json(trace_bytes, what="bundle trace.json")
    if not isinstance(doc, dict) or set(doc) != {"version", "tensors"} or doc["version"] != 1:
        raise InvalidInputError("bundle trace.json must be {version: 1, tensors: [...]}")
    if not isinstance(doc["tensors"], list):
        raise InvalidInputError("bundle trace.json tensors must be a list")
    entries = tuple(TensorRef.from_json(e, what="bundle trace") for e in doc["tensors"])
    if len({e.name for e in entries}) != len(entries):
        raise InvalidInputError("bundle trace names a tensor twice")
    n_proofs = len(names) - 2 - len(entries)
    expected = [tensor_member(i) for i in range(len(entries))] + [proof_member(i) for i in range(max(n_proofs, 0))]
    if names[:-2] != expected:
        raise InvalidInputError("bundle members are not the tensors of trace.json one for one, then proofs")
    tensors = {e.name: decode_tensor(e, members[tensor_member(i)], what="bundle") for i, e in enumerate(entries)}
    proofs = tuple(bytes(members[proof_member(i)]) for i in range(n_proofs))
    return Bundle(envelope, entries, trace_bytes, tensors, proofs)


def _declared_version(members: dict[str, memoryview]) -> int:
    try:
        doc = parse_canonical_json(bytes(members.get("trace.json", b"")), what="bundle trace.json")
    except InvalidInputError:
        return 2
    version = doc.get("version") if isinstance(doc, dict) else None
    return version if version in BUNDLE_VERSIONS else 2


def _check_crcs(path: Path, members: dict[str, memoryview], crcs: dict[str, int]) -> None:
    total = sum(m.nbytes for m in members.values())
    for name, ok in zip(members, map_bytes(lambda n: crc32(members[n]) == crcs[n], list(members), total_bytes=total),
                        strict=True):  # fmt: skip
        if not ok:
            raise InvalidInputError(f"bundle {path} is corrupt or not a verimesh container: CRC mismatch in {name!r}")


def _read_sealed(path: Path, members: dict[str, memoryview], crcs: dict[str, int]) -> Bundle:
    names = list(members)
    if not names or names[-1] != "envelope.json":
        raise InvalidInputError(f"bundle {path} must end with envelope.json")
    sealed = tuple((name, members[name]) for name in names[:-1])
    leaves, seen_crcs = _leaves(sealed)
    for (name, _), crc in zip(sealed, seen_crcs, strict=True):
        if crc != crcs[name]:
            raise InvalidInputError(f"bundle {path} is corrupt or not a verimesh container: CRC mismatch in {name!r}")
    _check_crcs(path, {"envelope.json": members["envelope.json"]}, crcs)
    envelope = Envelope.from_bytes(bytes(members["envelope.json"]), what="bundle envelope")
    problems: list[tuple[str, str]] = []
    entries: tuple[TensorRef, ...] = ()
    tensors: dict[str, np.ndarray] = {}
    proofs: tuple[bytes, ...] = ()
    trace_bytes = bytes(members["trace.json"]) if "trace.json" in members else b""
    try:
        specs = trace_specs(trace_bytes) if names[-2:-1] == ["trace.json"] else None
        if specs is None:
            raise InvalidInputError("the last member before the envelope must be trace.json")
        n_proofs = len(names) - 2 - len(specs)
        expected = [tensor_member(i) for i in range(len(specs))] + [proof_member(i) for i in range(max(n_proofs, 0))]
        if names[:-2] != expected:
            raise InvalidInputError("members are not the tensors of trace.json one for one, then proofs")
        leaf_of = dict(zip((n for n, _ in sealed), leaves, strict=True))
        entries = tuple(
            TensorRef(name, dtype, shape, leaf_digest(leaf_of[tensor_member(i)]))
            for i, (name, dtype, shape) in enumerate(specs)
        )
        proofs = tuple(bytes(members[proof_member(i)]) for i in range(n_proofs))
    except InvalidInputError as exc:
        problems.append(("trace.json", exc.message))
    for i, entry in enumerate(entries):
        try:
            tensors[entry.name] = decode_tensor(entry, members[tensor_member(i)], what="bundle")
        except InvalidInputError as exc:
            problems.append((tensor_member(i), exc.message))
    return Bundle(envelope, entries, trace_bytes, tensors, proofs, 2, sealed, leaves, tuple(problems))


def _leaves(sealed: tuple[tuple[str, memoryview], ...]) -> tuple[tuple[bytes, ...], tuple[int, ...]]:
    """Every member's leaf and CRC-32, in one pass over its bytes (chunks stay in cache between
    the two); a large bundle's members run on every core (both release the GIL; one member per
    thread measured faster here than BLAKE3's own threads within a member)."""
    total = sum(data.nbytes for _, data in sealed)
    done = map_bytes(lambda member: member_leaf_and_crc(*member), sealed, total_bytes=total)
    return tuple(leaf for leaf, _ in done), tuple(crc for _, crc in done)


def trace_specs(data: bytes) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    doc = parse_canonical_json(data, what="bundle trace.json")
    if not isinstance(doc, dict) or set(doc) != {"version", "tensors"} or doc["version"] != 2:
        raise InvalidInputError("trace.json must be {version: 2, tensors: [...]}")
    if not isinstance(doc["tensors"], list):
        raise InvalidInputError("trace.json tensors must be a list")
    specs = []
    for row in doc["tensors"]:
        if not isinstance(row, dict) or set(row) != {"name", "dtype", "shape"}:
            raise InvalidInputError("a trace.json entry must have exactly name, dtype, shape")
        ref = TensorRef.from_json({**row, "digest": "sha256:" + "0" * 64}, what="trace.json")
        specs.append((ref.name, ref.dtype, ref.shape))
    if len({name for name, _, _ in specs}) != len(specs):
        raise InvalidInputError("trace.json names a tensor twice")
    return tuple(specs)


def decode_tensor(entry: TensorRef, data: memoryview, *, what: str) -> np.ndarray:
    """A read-only array over ``data`` (no copy); the byte count must match dtype and shape exactly."""
    dtype = np.dtype(entry.dtype).newbyteorder("<")
    count = int(np.prod(entry.shape, dtype=np.int64)) if entry.shape else 1
    if count * dtype.itemsize != data.nbytes:
        raise InvalidInputError(
            f"{what} tensor {entry.name!r}: {data.nbytes} bytes for {entry.dtype}{list(entry.shape)}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count).reshape(entry.shape)
    if entry.dtype == "bool" and arr.size and np.frombuffer(data, dtype=np.uint8).max() > 1:
        raise InvalidInputError(f"{what} tensor {entry.name!r}: bool bytes other than 0 and 1")
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


# -- opened bundles: some members of a sealed bundle, each proven under its signed root ------------

OPENING_NAME = "opening.json"
OPENING_TYPE = "verimesh/opening"


def write_opening(bundle: Bundle, names: Sequence[str]) -> bytes:
    """The opened form of a sealed (format 2) bundle with only ``names`` (docs/format.md §14)::

        opening.json        canonical JSON {type, version 1, members: [{name, index, inclusion_proof}]}
        sealed/<name>       each member's bytes, in sealed order
        envelope.json       the node's signed envelope, byte for byte

    Each member is attributable like the full bundle: its leaf sits at its position under the root
    the node signed. From a full bundle the proofs are computed; from an opened one, carried."""
    if bundle.version != 2:
        raise InvalidInputError("only a sealed (format 2) bundle has an opened form")
    have = [n for n, _ in bundle.members]
    wanted = dict.fromkeys(names)
    missing = [n for n in wanted if n not in have]
    if missing:
        raise InvalidInputError(f"the bundle has no member {missing[0]!r} to open")
    records, parts = [], []
    for name, (index, proof) in sorted(zip(wanted, bundle.inclusions(list(wanted)), strict=True),
                                       key=lambda item: item[1][0]):  # fmt: skip
        records.append({"name": name, "index": index, "inclusion_proof": [b64encode(p) for p in proof]})
        parts.append((f"sealed/{name}", bundle.member(name)))
    doc = {"type": OPENING_TYPE, "version": 1, "members": records}
    return container_bytes([(OPENING_NAME, canonical_json(doc)), *parts, ("envelope.json", bundle.envelope.to_bytes())])


def merge_openings(first: bytes, second: bytes, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """One opened bundle from two of the same envelope (a node's commitment and its answer to the
    challenge): every member of either, each once, in sealed order. A member both carry must be
    the same bytes with the same proof; the envelopes must be the same bytes."""
    parsed = []
    for blob, what in ((first, "commitment"), (second, "opening")):
        members = read_container(blob, what=what, limits=limits)
        parsed.append((members, _opening_records(members, what=what)))
    if bytes(parsed[0][0]["envelope.json"]) != bytes(parsed[1][0]["envelope.json"]):
        raise InvalidInputError("the opening is for another statement than the commitment", code="foreign-opening")
    merged: dict[str, tuple[dict[str, Any], memoryview]] = {}
    for members, records in parsed:
        for record in records:
            view = members[f"sealed/{record['name']}"]
            seen = merged.get(record["name"])
            if seen is not None and (seen[0] != record or bytes(seen[1]) != bytes(view)):
                raise InvalidInputError(f"the opening's {record['name']!r} differs from the commitment's")
            merged[record["name"]] = (record, view)
    ordered = sorted(merged.values(), key=lambda rd: int(rd[0]["index"]))
    doc = {"type": OPENING_TYPE, "version": 1, "members": [r for r, _ in ordered]}
    parts = [(f"sealed/{r['name']}", d) for r, d in ordered]
    envelope = parsed[0][0]["envelope.json"]
    return container_bytes([(OPENING_NAME, canonical_json(doc)), *parts, ("envelope.json", envelope)])


def opened_names(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> tuple[str, ...]:
    """The member names an opened bundle carries (structure only: nothing is proven here)."""
    return tuple(r["name"] for r in _opening_records(read_container(data, what="opening", limits=limits),
                                                     what="opening"))  # fmt: skip


def _opening_records(members: dict[str, memoryview], *, what: str) -> list[dict[str, Any]]:
    """opening.json's records, checked against the container's members (names, order, shape)."""
    names = list(members)
    if not names or names[0] != OPENING_NAME or names[-1] != "envelope.json":
        raise InvalidInputError(f"{what} must start with {OPENING_NAME} and end with envelope.json")
    doc = parse_canonical_json(bytes(members[OPENING_NAME]), what=f"{what} {OPENING_NAME}")
    if not isinstance(doc, dict) or doc.get("type") != OPENING_TYPE or doc.get("version") != 1 or set(doc) != {
        "type", "version", "members"
    }:  # fmt: skip
        raise InvalidInputError(f"{what} {OPENING_NAME} must be {{type: {OPENING_TYPE}, version: 1, members}}")
    records = doc["members"]
    if not isinstance(records, list) or len(records) > MAX_OPENED:
        raise InvalidInputError(f"{what} members must be a list of at most {MAX_OPENED}")
    last = -1
    for record in records:
        if not _record_ok(record) or not last < record["index"]:
            raise InvalidInputError(f"{what}: a member record is malformed or out of order")
        last = record["index"]
    if names[1:-1] != [f"sealed/{r['name']}" for r in records]:
        raise InvalidInputError(f"{what}: the members are not the ones {OPENING_NAME} names, in its order")
    return records


MAX_OPENED = 100_000


def _record_ok(record: Any) -> bool:
    if not isinstance(record, dict) or set(record) != {"name", "index", "inclusion_proof"}:
        return False
    proof = record["inclusion_proof"]
    return (
        isinstance(record["name"], str) and type(record["index"]) is int and isinstance(proof, list)
        and len(proof) <= 64 and all(isinstance(p, str) for p in proof)
    )  # fmt: skip


def _read_opened(members: dict[str, memoryview], *, what: str) -> Bundle:
    """Parse an opened bundle: trace.json must be among its members (it says what each tensor
    member is and how many members the root covers); each member's position must be the one its
    name has in a sealed bundle. Nothing is proven here: ``workflows`` checks each member's
    inclusion under the signed root, and reports what is wrong in ``problems`` only after."""
    records = _opening_records(members, what=what)
    envelope = Envelope.from_bytes(bytes(members["envelope.json"]), what=f"{what} envelope")
    by_name = {r["name"]: r for r in records}
    if "trace.json" not in by_name:
        raise InvalidInputError(f"{what} does not open trace.json")
    trace_bytes = bytes(members["sealed/trace.json"])
    specs = trace_specs(trace_bytes)
    size = len(specs) + 1  # tensors, then trace.json (a spot bundle has no proof members)
    expected = {tensor_member(i): i for i in range(len(specs))} | {"trace.json": len(specs)}
    for record in records:
        if expected.get(record["name"]) != record["index"]:
            raise InvalidInputError(f"{what}: {record['name']!r} is not a member at position {record['index']}")
    sealed = tuple((r["name"], members[f"sealed/{r['name']}"]) for r in records)
    leaves = tuple(member_leaf(name, data) for name, data in sealed)
    opened = tuple(
        (int(r["index"]), tuple(b64decode_strict(p, what=f"{what} inclusion proof") for p in r["inclusion_proof"]))
        for r in records
    )
    entries = tuple(TensorRef(name, dtype, shape, "") for name, dtype, shape in specs)
    tensors: dict[str, np.ndarray] = {}
    problems: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        member = tensor_member(i)
        if member in by_name:
            try:
                tensors[entry.name] = decode_tensor(entry, members[f"sealed/{member}"], what="bundle")
            except InvalidInputError as exc:
                problems.append((member, exc.message))
    return Bundle(envelope, entries, trace_bytes, tensors, (), 2, sealed, leaves, tuple(problems), opened, size)
