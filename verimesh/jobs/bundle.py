"""Bundles: the one file a worker hands back (docs/format.md §5).

A canonical verimesh container (see ``container``) with members, in this order::

    tensors/000000.bin ... raw little-endian C-order data of the i-th trace tensor
    proofs/000000.json ... zk mode: the ezkl proof of step i, as ezkl wrote it
    trace.json             {"version": 1, "tensors": [{name, dtype, shape, digest}, ...]} canonical JSON,
                           tensors in trace (leaf) order
    envelope.json          DSSE envelope, canonical JSON

Tensors come first so that a worker can stream each step's outputs to disk while the next step
runs; the envelope, which signs the root over all of them, comes last.

Parsing is bounded and structural only: it never trusts a digest; the verifier recomputes them.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verimesh.core.canonical import canonical_json, parse_canonical_json
from verimesh.core.container import DEFAULT_LIMITS, ContainerWriter, Limits, read_container_file, write_container
from verimesh.core.digest import tensor_bytes
from verimesh.core.tensors import TensorRef
from verimesh.errors import InvalidInputError
from verimesh.signing.envelope import Envelope


@dataclass(frozen=True)
class Bundle:
    envelope: Envelope
    trace: tuple[TensorRef, ...]
    trace_bytes: bytes
    tensors: dict[str, np.ndarray]  # read-only views into the file's bytes
    proofs: tuple[bytes, ...] = ()


def trace_document(entries: tuple[TensorRef, ...]) -> bytes:
    return canonical_json({"version": 1, "tensors": [e.to_json() for e in entries]})


def tensor_member(index: int) -> str:
    return f"tensors/{index:06d}.bin"


def proof_member(index: int) -> str:
    return f"proofs/{index:06d}.json"


class BundleWriter:
    """Streams trace tensors into a bundle from a background thread while the caller computes.

    ``add_tensor`` returns at once; digesting, CRC and writing happen on one worker thread
    (hashlib and the CRC release the GIL, so this overlaps with onnxruntime). ``entries`` waits for
    them; ``finish`` appends trace.json and the envelope and moves the file into place.
    """

    def __init__(self, path: Path) -> None:
        self._writer = ContainerWriter(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verimesh-bundle")
        self._pending: list[Future[TensorRef]] = []

    def add_tensor(self, name: str, array: np.ndarray) -> None:
        self._pending.append(self._pool.submit(self._write_tensor, len(self._pending), name, array))

    def _write_tensor(self, index: int, name: str, array: np.ndarray) -> TensorRef:
        data = tensor_bytes(array)
        entry = TensorRef.of(name, array)
        self._writer.add(tensor_member(index), data)
        return entry

    def entries(self) -> tuple[TensorRef, ...]:
        return tuple(f.result() for f in self._pending)

    def finish(self, envelope: Envelope, proofs: tuple[bytes, ...] = ()) -> int:
        entries = self.entries()
        self._pool.shutdown()
        for i, proof in enumerate(proofs):
            self._writer.add(proof_member(i), proof)
        self._writer.add("trace.json", trace_document(entries))
        self._writer.add("envelope.json", envelope.to_bytes())
        return self._writer.close()

    def abort(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pool.shutdown(wait=True)
        self._writer.abort()


def write_bundle(
    path: Path,
    envelope: Envelope,
    entries: tuple[TensorRef, ...],
    tensors: dict[str, np.ndarray],
    proofs: tuple[bytes, ...] = (),
) -> int:
    """Write a bundle in one go (used for re-packing; ``BundleWriter`` streams)."""
    members: list[tuple[str, bytes | memoryview]] = [
        (tensor_member(i), tensor_bytes(tensors[e.name])) for i, e in enumerate(entries)
    ]
    members += [(proof_member(i), p) for i, p in enumerate(proofs)]
    members += [("trace.json", trace_document(entries)), ("envelope.json", envelope.to_bytes())]
    return write_container(path, members)


def read_bundle(path: Path, *, limits: Limits = DEFAULT_LIMITS) -> Bundle:
    """Parse a bundle within ``limits``; any structural inconsistency rejects the whole file."""
    members = read_container_file(path, what=f"bundle {path}", limits=limits)
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
