"""Every file type verimesh reads, fuzzed: random bytes, and mutations of a valid file (bit flips,
truncation, splices, insertions, deletions; JSON values swapped for hostile ones; container
members mutated and re-packed with valid CRCs so the member parsers are reached).

Whatever the input, a reader must answer with a verimesh error (a ``VerimeshError``) or a result,
never another exception; within the deadline; and never accept what it should not: a mutated
bundle does not verify as accept, mutated evidence does not prove fraud, a mutated key file does
not yield another key, and a mutated checkpoint or inclusion proof is only good if it still says
exactly what the original said.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rfc8785
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Keys, input_path, model_path, perturbed
from verimesh.core.canonical import canonical_json
from verimesh.core.container import read_container, write_container
from verimesh.core.tensors import DTYPES, TensorSpec, load_input_file
from verimesh.errors import VerimeshError
from verimesh.jobs.job import Job, load_job, new_job
from verimesh.jobs.tolerance import DEFAULT_TOLERANCES, PROFILE_TYPE, load_tolerance_profile
from verimesh.ledger.store import Checkpoint, check_inclusion_document
from verimesh.signing.keys import PublicKey, load_public_key, load_secret_key, write_key_pair
from verimesh.spot.evidence import check_evidence
from verimesh.workflows import prove, verify

PASSPHRASE = "fuzz"
# Each example must finish well within this; hypothesis fails the test if one does not.
DEADLINE = timedelta(seconds=3)


# VERIMESH_FUZZ_SCALE=10 runs ten times the examples (a longer hunt than CI's).
SCALE = float(os.environ.get("VERIMESH_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int) -> Any:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=DEADLINE,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=False,
    )


# -- seed files, made once --------------------------------------------------------------------------


class Seeds:
    """The valid files the mutations start from (a plain class: hypothesis prints a dataclass
    argument field by field, and these fields are kilobytes)."""

    def __init__(
        self, folder: Path, job: Job, node: PublicKey, operator: PublicKey, specs: tuple[TensorSpec, ...],
        files: dict[str, bytes], checkpoint: Checkpoint,
    ) -> None:  # fmt: skip
        self.folder, self.job, self.node, self.operator = folder, job, node, operator
        self.specs, self.files, self.checkpoint = specs, files, checkpoint  # files: kind -> the valid bytes

    def __repr__(self) -> str:
        return f"Seeds({self.folder})"


@pytest.fixture(scope="module")
def seeds(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    from tests.integration.test_tamper import honest_trace, seal
    from verimesh.jobs.plan import load_model, model_io
    from verimesh.ledger.events import sign_request
    from verimesh.ledger.store import Ledger, inclusion_document
    from verimesh.settlement import register_node

    folder = tmp_path_factory.mktemp("fuzz-files")
    job = new_job(model_path("mlp"), input_path("mlp"), folder / "job.json")
    files: dict[str, bytes] = {"job": (folder / "job.json").read_bytes()}
    # A copy of the job whose input file (job.files/input.npz) is replaced by each mutant.
    shutil.copytree(folder / "job.files", folder / "mutant-job" / "job.files")
    shutil.copy(folder / "job.json", folder / "mutant-job" / "job.json")
    files["job-input"] = (folder / "job.files" / "input.npz").read_bytes()
    # A bundle that verifies, and evidence of a forged output that proves fraud.
    prove(job, key=keys.node, out=folder / "honest.vmb", device="cpu")
    assert verify(folder / "honest.vmb", job=job, node_key=keys.node.public, samples="all").status == "accept"
    files["bundle"] = (folder / "honest.vmb").read_bytes()
    trace = honest_trace(job)
    trace[job.output_names[0]] = perturbed(trace[job.output_names[0]])
    seal(job, trace, keys.node, folder / "forged.vmb")
    rejected = verify(folder / "forged.vmb", job=job, node_key=keys.node.public, evidence_out=folder / "fraud.vme")
    assert rejected.status == "reject" and check_evidence(folder / "fraud.vme").proves_fraud
    files["evidence"] = (folder / "fraud.vme").read_bytes()
    # A tolerance profile for the job's steps (what `verimesh calibrate` writes, canonical JSON).
    tolerance = DEFAULT_TOLERANCES["fp32-strict"].to_json()
    profile = {
        "type": PROFILE_TYPE, "version": 1, "model_digest": job.model_digest, "precision": "fp32-strict",
        "steps": [{"index": s.index, "digest": s.digest, "tolerance": tolerance} for s in job.steps],
    }  # fmt: skip
    files["tolerance"] = canonical_json(profile)
    # Key files: public, secret in the clear, secret encrypted.
    write_key_pair(folder / "enc.key", keys.node, passphrase=PASSPHRASE)
    files["public-key"] = keys.node_pub.read_bytes()
    files["secret-key"] = keys.node_file.read_bytes()
    files["encrypted-key"] = (folder / "enc.key").read_bytes()
    # A ledger with one entry, a checkpoint over it, and that entry's inclusion proof.
    ledger = Ledger.create(str(folder / "mesh.db"), keys.other, operator_key_path=keys.other_file)
    request = sign_request(keys.node, action="register", ledger_id=ledger.ledger_id, amount=10)
    seq = register_node(ledger, request, writer=keys.other)
    checkpoint = ledger.checkpoint(keys.other)
    files["checkpoint"] = json.dumps(checkpoint.to_json(), indent=2).encode()
    files["inclusion"] = json.dumps(inclusion_document(ledger, seq), indent=2).encode()
    assert check_inclusion_document(_write(folder / "seed.json", files["inclusion"]), keys.other.public)[0]
    # A regression suite (absolute paths, so that a mutant anywhere resolves them).
    files["suite"] = f"""\
[suite]
name = "fuzz"
seed = 3

[profile.quick]
cases = ["mlp-spot"]
detection_trials = 5

[[case]]
name = "mlp-spot"
model = "{model_path("mlp")}"
input = "{input_path("mlp")}"
mode = "spot"
steps = 3
samples = 1
tamper = true
detection_trials = 20
[case.budget]
max_prove_seconds = 0.5
max_proof_bytes = 8192
[case.min_detection]
perturb-final = 1.0
""".encode()
    # Model inputs in each format.
    specs = model_io(load_model(model_path("mlp"))[0])[0]
    array = np.load(input_path("mlp"))
    files["npy"] = input_path("mlp").read_bytes()
    for kind, save in (("npz", np.savez), ("npz-deflated", np.savez_compressed)):
        buffer = io.BytesIO()
        save(buffer, **{specs[0].name: array})
        files[kind] = buffer.getvalue()
    files["json-input"] = json.dumps({specs[0].name: array.tolist()}).encode()
    files["ezkl-input"] = json.dumps({"input_data": [array.reshape(-1).tolist()]}).encode()
    return Seeds(folder, job, keys.node.public, keys.other.public, specs, files, checkpoint)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- what each reader may answer --------------------------------------------------------------------


def _read(kind: str, data: bytes, seeds: Seeds) -> bool:
    """Read ``data`` as ``kind`` with the library's own reader; True where the reader accepts it
    (a bundle accepted, evidence proving fraud, a checkpoint or inclusion proof that verifies, a
    file loaded), after checking that nothing was accepted that the mutation should have cost."""
    suffix = {"npy": ".npy", "npz": ".npz", "npz-deflated": ".npz", "json-input": ".json", "ezkl-input": ".json",
              "bundle": ".vmb", "evidence": ".vme", "suite": ".toml"}.get(kind, ".json")  # fmt: skip
    path = _write(seeds.folder / f"mutant{suffix}", data)
    same = data == seeds.files[kind]
    if kind == "bundle":
        verdict = verify(path, job=seeds.job, node_key=seeds.node, samples="all", evidence_out=seeds.folder / "ev.vme")
        assert verdict.status != "accept" or same, f"a mutated bundle was accepted: {_changes(kind, data, seeds)}"
        return verdict.status == "accept"
    if kind == "evidence":
        result = check_evidence(path)
        assert not result.proves_fraud or same, f"mutated evidence proved fraud: {_changes(kind, data, seeds)}"
        return result.proves_fraud
    if kind == "job":
        load_job(path)
    elif kind == "job-input":
        mutant_job = load_job(seeds.folder / "mutant-job" / "job.json")
        _write(seeds.folder / "mutant-job" / mutant_job.input_path, data)
        tensors = mutant_job.read_input()  # pinned by digest: only the job's own input may come out
        assert all(np.array_equal(t, seeds.job.read_input()[n]) for n, t in tensors.items())
    elif kind == "tolerance":
        load_tolerance_profile(path)
    elif kind == "public-key":
        # The proof of possession is checked where it matters (registration, keys show
        # --check-pop), not on load: a mutated one may load, the key itself may not change.
        assert load_public_key(path).key == seeds.node.key, "a mutated public key file gave another key"
    elif kind in ("secret-key", "encrypted-key"):
        secret = load_secret_key(path, passphrase=PASSPHRASE if kind == "encrypted-key" else None)
        assert secret.public.key == seeds.node.key, "a mutated secret key file gave another key"
    elif kind == "checkpoint":
        cp = Checkpoint.from_file(path)
        assert not cp.verify(seeds.operator) or cp == seeds.checkpoint, "a mutated checkpoint verified"
        return cp.verify(seeds.operator)
    elif kind == "inclusion":
        ok, _, _ = check_inclusion_document(path, seeds.operator)
        assert not ok or json.loads(data) == json.loads(seeds.files[kind]), "a mutated inclusion proof verified"
        return ok
    elif kind == "suite":
        from verimesh.assurance.regress import load_suite

        load_suite(path)
    else:
        tensors = load_input_file(path, seeds.specs)
        assert all(a.dtype.name in DTYPES for a in tensors.values())
    return True


def _check(kind: str, data: bytes, seeds: Seeds) -> None:
    """Any input: a verimesh error or an answer, never another exception (see ``_read``)."""
    try:
        _read(kind, data, seeds)
    except VerimeshError:
        pass  # the expected answer to a broken file: one line, exit 3


def _changes(kind: str, data: bytes, seeds: Seeds) -> str:
    """Which members of a container differ from the seed's (for the failure message)."""
    try:
        got = {k: bytes(v) for k, v in read_container(data, what="mutant").items()}
    except VerimeshError as exc:
        return f"not a container ({exc.message})"
    seed = {k: bytes(v) for k, v in read_container(seeds.files[kind], what="seed").items()}
    out = []
    for name in sorted(set(seed) | set(got)):
        a, b = seed.get(name), got.get(name)
        if a is None or b is None:
            out.append(f"{name}: {'added' if a is None else 'removed'}")
        elif a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            out.append(f"{name}: {a[max(0, at - 40) : at + 40]!r} -> {b[max(0, at - 40) : at + 40]!r}")
    return "; ".join(out)


KINDS = ("bundle", "evidence", "job", "job-input", "tolerance", "public-key", "secret-key", "encrypted-key",
         "checkpoint", "inclusion", "suite", "npy", "npz", "npz-deflated", "json-input", "ezkl-input")  # fmt: skip
JSON_KINDS = frozenset({"job", "tolerance", "public-key", "secret-key", "encrypted-key", "checkpoint", "inclusion",
                        "json-input", "ezkl-input"})  # fmt: skip
CONTAINER_KINDS = frozenset({"bundle", "evidence", "job-input", "npz", "npz-deflated"})
# Examples per kind, sized so that the file runs in about a minute on two cores (a bundle or an
# evidence check re-runs steps; a key load may run scrypt).
EXAMPLES = {"bundle": 150, "evidence": 150, "encrypted-key": 40}
DEFAULT_EXAMPLES = 150
RANDOM_EXAMPLES = 40


# -- mutations --------------------------------------------------------------------------------------

# Byte strings that make parsers take unusual paths.
TOKENS = (
    b"[" * 200, b"{" * 200, b'"', b"\\", b"\\u", b"\\ud800", b"1e999", b"-1", b"-0", b"0", b"NaN", b"null",
    b"true", b"[]", b"{}", b'""', b"99999999999999999999999999999", b"\x00", b"\xff\xfe", b"\n", b"=",
    b"'''", b'"""', b"[[", b"]]", b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"\x93NUMPY", b"(", b")",
)  # fmt: skip


@st.composite
def byte_mutation(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4), label="mutations")):
        n = len(data)
        op = draw(st.sampled_from(("flip", "truncate", "splice", "insert", "token", "delete", "duplicate")))
        at = draw(st.integers(0, n), label="offset")
        if op == "flip" and n:
            data[min(at, n - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "splice" and seed:  # a piece of the seed from elsewhere, over this range
            start = draw(st.integers(0, len(seed) - 1))
            piece = seed[start : start + draw(st.integers(1, 256))]
            data[at : at + draw(st.integers(0, 256))] = piece
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "token":
            data[at : at + draw(st.integers(0, 4))] = draw(st.sampled_from(TOKENS))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 256))]
        elif op == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 256))]
    return bytes(data)


JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**32, 2**40, 2**63, 2**64, 10**30])
    | st.just("sha256:" + "0" * 64) | st.just("AAAA") | st.just("00" * 48),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)  # fmt: skip


def _paths(doc: Any) -> list[tuple[Any, ...]]:
    """Every position in a JSON document, as a path of keys and indices (iteratively)."""
    out: list[tuple[Any, ...]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), doc)]
    while stack and len(out) < 2000:
        path, value = stack.pop()
        out.append(path)
        if isinstance(value, dict):
            stack.extend((path + (k,), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((path + (i,), v) for i, v in enumerate(value[:50]))
    return out


BOUNDARY_INTS = (-1, 0, 2**31 - 1, 2**31, 2**32, 2**40 - 1, 2**40, 2**53, 2**63 - 1, 2**63, 2**64, 10**30)


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    _at(doc, path[:-1])[path[-1]] = value


def _dumps(doc: Any, canonical: bool) -> bytes:
    if canonical:
        try:
            return rfc8785.dumps(doc)
        except (rfc8785.CanonicalizationError, ValueError, TypeError):
            pass  # an integer outside what RFC 8785 can write: plain JSON then
    return json.dumps(doc).encode()


@st.composite
def json_mutation(draw: st.DrawFn, seed: bytes) -> bytes:
    """The seed's JSON with one value replaced, one key removed or added (canonical output where the
    seed is canonical, so that the reader gets past that check)."""
    doc = json.loads(seed)
    canonical = rfc8785.dumps(doc) == seed
    paths = _paths(doc)
    numbers = [p for p in paths if isinstance(_at(doc, p), int) and not isinstance(_at(doc, p), bool)]
    if numbers and draw(st.booleans(), label="a number at a boundary"):
        # Sizes, shapes, indices and counts: where overflow and off-by-one bugs live.
        path = draw(st.sampled_from(numbers), label="path")
        _set(doc, path, draw(st.sampled_from(BOUNDARY_INTS), label="value"))
        return _dumps(doc, canonical)
    path = draw(st.sampled_from(paths), label="path")
    op = draw(st.sampled_from(("replace", "remove", "add")))
    if not path:
        return _dumps(draw(JSON_VALUES) if op == "replace" else doc, canonical)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "replace":
        parent[last] = draw(JSON_VALUES, label="value")
    elif op == "remove":
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=8), label="key")] = draw(JSON_VALUES)
    else:
        parent.insert(last, draw(JSON_VALUES))
    return _dumps(doc, canonical)


@st.composite
def member_mutation(draw: st.DrawFn, seed: bytes) -> bytes:
    """One member of a container (bundle, evidence, npz) mutated, then the container re-packed
    with correct CRCs, so that the reader's member parsers see the mutation."""
    import zipfile

    if seed.startswith(b"PK") and not _is_verimesh_container(seed):
        with zipfile.ZipFile(io.BytesIO(seed)) as archive:
            members = {i.filename: archive.read(i) for i in archive.infolist()}
    else:
        members = {name: bytes(view) for name, view in read_container(seed, what="seed").items()}
    documents = sorted(n for n in members if n.endswith(".json"))
    if documents and draw(st.booleans(), label="a JSON member, as JSON"):
        name = draw(st.sampled_from(documents), label="member")
        members[name] = draw(json_mutation(members[name]))
    else:
        name = draw(st.sampled_from(sorted(members)), label="member")
        members[name] = draw(byte_mutation(members[name]))
    if draw(st.booleans(), label="drop or add a member"):
        if draw(st.booleans()):
            del members[name]
        else:
            members[draw(st.sampled_from(("extra.json", "tensors/999999.bin", "x.npy")))] = draw(st.binary(max_size=64))
    if not _is_verimesh_container(seed):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for member, data in members.items():
                archive.writestr(member, data)
        return buffer.getvalue()
    return _pack(list(members.items()))


def _is_verimesh_container(data: bytes) -> bool:
    try:
        read_container(data, what="seed")
    except VerimeshError:
        return False
    return True


_PACK_DIR: list[Path] = []


def _pack(members: list[tuple[str, bytes]]) -> bytes:
    """Write a canonical container (write_container needs a path) and return its bytes; a member name
    the format refuses is refused here too, and the mutant falls back to the raw member bytes."""
    path = _PACK_DIR[0] / "packed.bin"
    try:
        write_container(path, members)
    except VerimeshError:
        return b"".join(data for _, data in members)
    return path.read_bytes()


@st.composite
def toml_mutation(draw: st.DrawFn, seed: bytes) -> bytes:
    """One line's value replaced by a hostile TOML literal."""
    lines = seed.decode().splitlines()
    at = draw(st.integers(0, len(lines) - 1), label="line")
    key = lines[at].split("=", 1)[0].strip() or "x"
    literal = draw(st.sampled_from((
        "-1", "0", "1e999", "nan", "inf", "99999999999999999999999999", "true", "[]", "{}", '"\\u0000"',
        '"../../etc/passwd"', "1979-05-27T07:32:00Z", '["no-such-case"]', "[[1], [2]]", '{ a = { b = 1 } }',
        '"' + "x" * 200 + '"', "-0.0", "0x10",
    )), label="literal")  # fmt: skip
    lines[at] = f"{key} = {literal}"
    return ("\n".join(lines) + "\n").encode()


@st.composite
def mutant(draw: st.DrawFn, kind: str, seed: bytes) -> bytes:
    strategies: list[st.SearchStrategy[bytes]] = [byte_mutation(seed)]
    if kind in JSON_KINDS:
        strategies.append(json_mutation(seed))
    if kind in CONTAINER_KINDS:
        strategies.append(member_mutation(seed))
    if kind == "suite":
        strategies.append(toml_mutation(seed))
    return draw(st.one_of(*strategies))


# -- the properties ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _pack_dir(seeds: Seeds) -> None:
    _PACK_DIR[:] = [seeds.folder]


@pytest.mark.parametrize("kind", KINDS)
def test_seed_files_are_read_as_valid(kind: str, seeds: Seeds) -> None:
    """The seeds themselves are accepted (so that the mutations start from files the readers accept)."""
    assert _read(kind, seeds.files[kind], seeds)


def _mutation_test(kind: str) -> Callable[..., None]:
    @fuzz_settings(EXAMPLES.get(kind, DEFAULT_EXAMPLES))
    @given(data=st.data())
    def test(seeds: Seeds, data: st.DataObject) -> None:
        _check(kind, data.draw(mutant(kind, seeds.files[kind]), label="mutant"), seeds)

    test.__name__ = test.__qualname__ = f"test_mutated_{kind.replace('-', '_')}_never_crashes_or_accepts"
    return test


def _random_bytes_test(kind: str) -> Callable[..., None]:
    @fuzz_settings(RANDOM_EXAMPLES)
    @given(data=st.binary(max_size=2048))
    def test(seeds: Seeds, data: bytes) -> None:
        _check(kind, data, seeds)

    test.__name__ = test.__qualname__ = f"test_random_{kind.replace('-', '_')}_never_crashes"
    return test


for _kind in KINDS:
    for _make in (_mutation_test, _random_bytes_test):
        _test = _make(_kind)
        globals()[_test.__name__] = _test


def test_reencoded_evidence_does_not_prove_fraud(seeds: Seeds) -> None:
    """Each JSON member of a fraud-proving evidence file re-encoded (same values, other bytes) and the
    container re-packed with valid CRCs: the file digest changes, so if it still proved fraud the
    same fraud could be slashed twice (the ledger refuses evidence by file digest)."""
    members = {name: bytes(view) for name, view in read_container(seeds.files["evidence"], what="seed").items()}
    still_proving = []
    for name in (n for n in members if n.endswith(".json")):
        reencoded = dict(members)
        reencoded[name] = json.dumps(json.loads(members[name]), indent=1).encode()
        path = _write(seeds.folder / "reencoded.vme", _pack(list(reencoded.items())))
        try:
            if check_evidence(path).proves_fraud:
                still_proving.append(name)
        except VerimeshError:
            pass
    # The same key with another (unchecked) proof of possession: other bytes, the same node.
    pub = json.loads(members["node.pub.json"])
    pop = pub["proof_of_possession"]
    pub["proof_of_possession"] = ("c" if pop[0] != "c" else "d") + pop[1:]
    altered = {**members, "node.pub.json": rfc8785.dumps(pub)}
    try:
        if check_evidence(_write(seeds.folder / "reencoded.vme", _pack(list(altered.items())))).proves_fraud:
            still_proving.append("node.pub.json proof_of_possession")
    except VerimeshError:
        pass
    assert not still_proving, f"evidence re-encoded in {still_proving} still proves fraud"


# 16 * (2**20 + 1) * (2**40 - 2**20 + 1) = 2**64 + 16: in int64 arithmetic, 16 elements.
WRAPPING_SHAPE = [16, 2**20 + 1, 2**40 - 2**20 + 1]


def test_a_shape_whose_product_wraps_int64_is_refused(seeds: Seeds) -> None:
    """A trace entry declaring WRAPPING_SHAPE over the 64 bytes of a 16-element float32 tensor:
    counted in int64 the sizes agree, and the reshape that follows used to raise a traceback."""
    from verimesh.core.tensors import TensorRef

    with pytest.raises(VerimeshError, match="tensor limit"):
        TensorRef.from_json({"name": "x", "dtype": "float32", "shape": WRAPPING_SHAPE, "digest": "sha256:" + "0" * 64})
    members = {name: bytes(view) for name, view in read_container(seeds.files["bundle"], what="seed").items()}
    trace = json.loads(members["trace.json"])
    sixteen = next(t for t in trace["tensors"] if int(np.prod(t["shape"])) == 16 and t["dtype"] == "float32")
    sixteen["shape"] = WRAPPING_SHAPE
    members["trace.json"] = rfc8785.dumps(trace)
    _check("bundle", _pack(list(members.items())), seeds)  # a verdict or a verimesh error, no traceback


NESTED: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.integers() | st.text(alphabet=st.sampled_from('[]{}"\\\\ab\n\u00e9'), max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=30,
)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@fuzz_settings(300)
@given(value=NESTED, ascii_only=st.booleans(), indent=st.sampled_from([None, 1]))
def test_json_depth_is_the_nesting_of_any_document(value: Any, ascii_only: bool, indent: int | None) -> None:
    """The pre-parse scan counts brackets outside strings exactly, whatever the strings hold."""
    from verimesh.core.canonical import json_depth

    data = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()
    assert json_depth(data) == _depth(value)
