"""Canonical encodings round-trip; Merkle proofs verify exactly when they should."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from verimesh.core import merkle
from verimesh.core.canonical import b64decode_strict, b64encode, canonical_json, parse_canonical_json
from verimesh.core.container import read_container, write_container
from verimesh.core.digest import little_endian_c, tensor_digest
from verimesh.core.tensors import TensorRef
from verimesh.jobs.bundle import decode_tensor

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@given(json_values)
def test_canonical_json_round_trips(value: object) -> None:
    encoded = canonical_json(value)
    assert parse_canonical_json(encoded, what="x") == value
    assert canonical_json(parse_canonical_json(encoded, what="x")) == encoded


@given(st.binary(max_size=200))
def test_base64_round_trips(raw: bytes) -> None:
    assert b64decode_strict(b64encode(raw), what="x") == raw


dtypes = st.sampled_from(["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool"])


@settings(max_examples=60)
@given(data=st.data())
def test_tensor_encoding_round_trips(data: st.DataObject) -> None:
    dtype = data.draw(dtypes)
    array = data.draw(hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)))
    raw = memoryview(little_endian_c(array).reshape(-1)).cast("B")
    entry = TensorRef("t", dtype, tuple(array.shape), tensor_digest("t", array))
    back = decode_tensor(entry, raw, what="test")
    assert back.dtype == array.dtype and back.shape == array.shape
    assert np.array_equal(back, array, equal_nan=array.dtype.kind == "f")
    assert tensor_digest("t", back) == entry.digest
    big = array.astype(array.dtype.newbyteorder(">"))
    assert tensor_digest("t", big) == entry.digest  # digest is over little-endian bytes whatever the input


@settings(max_examples=40)
@given(st.lists(st.binary(max_size=100), min_size=1, max_size=12))
def test_container_round_trips(payloads: list[bytes]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.zip"
        members = [(f"m{i:03d}.bin", p) for i, p in enumerate(payloads)]
        write_container(path, members)
        parsed = read_container(path.read_bytes(), what="c")
        assert [(k, bytes(v)) for k, v in parsed.items()] == members


@given(st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=40), st.data())
def test_inclusion_proofs_verify_exactly_for_their_leaf(leaves: list[bytes], data: st.DataObject) -> None:
    hashes = [merkle.leaf_hash(x) for x in leaves]
    root = merkle.root_from_leaf_hashes(hashes)
    index = data.draw(st.integers(0, len(hashes) - 1))
    proof = merkle.inclusion_proof(hashes, index)
    assert merkle.verify_inclusion(hashes[index], index, len(hashes), proof, root)
    other = data.draw(st.integers(0, len(hashes) - 1))
    if hashes[other] != hashes[index]:
        assert not merkle.verify_inclusion(hashes[other], index, len(hashes), proof, root)
    # (The tree size alone is not bound by a path: for the leftmost leaf, sizes 3 and 4 share one.
    # It is bound by the signed tree head, which carries both.)
    if len(hashes) > 1:
        wrong = (index + 1) % len(hashes)
        if merkle.inclusion_proof(hashes, wrong) != proof:
            assert not merkle.verify_inclusion(hashes[index], wrong, len(hashes), proof, root)
        if proof:
            bad = list(proof)
            bad[0] = bytes([bad[0][0] ^ 1]) + bad[0][1:]
            assert not merkle.verify_inclusion(hashes[index], index, len(hashes), bad, root)


@given(st.lists(st.binary(max_size=8), min_size=2, max_size=40), st.data())
def test_consistency_proofs_verify_exactly_for_prefixes(leaves: list[bytes], data: st.DataObject) -> None:
    hashes = [merkle.leaf_hash(x) for x in leaves]
    m = data.draw(st.integers(1, len(hashes)))
    proof = merkle.consistency_proof(hashes, m)
    old, new = merkle.root_from_leaf_hashes(hashes[:m]), merkle.root_from_leaf_hashes(hashes)
    assert merkle.verify_consistency(m, len(hashes), old, new, proof)
    forked = [*hashes[: m - 1], merkle.leaf_hash(b"fork" + leaves[m - 1]), *hashes[m:]]
    assert not merkle.verify_consistency(m, len(hashes), merkle.root_from_leaf_hashes(forked[:m]), new, proof)
