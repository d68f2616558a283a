"""Tensors: the dtypes verimesh accepts, tensor specs, and loading user input files.

Input files: ``.npy`` (single-input models), ``.npz`` (arrays named after the model inputs), or
``.json`` (``{"input_name": nested lists}`` or ezkl's ``{"input_data": [[flat values], ...]}``,
one flat list per model input, in model order). Pickled objects are never loaded.

Every size an untrusted file declares (a shape, a ZIP member's uncompressed size) is checked with
Python integers against the bounds below before anything is allocated: a 192-byte .npy may
declare 10^12 elements, and a shape's product may overflow int64.
"""

from __future__ import annotations

import io
import math
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verimesh.core.canonical import parse_json
from verimesh.core.files import read_user_file
from verimesh.errors import InvalidInputError

# ONNX TensorProto elem types verimesh can commit to, and their numpy names.
ONNX_TO_DTYPE: dict[int, str] = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
}
DTYPES = frozenset(ONNX_TO_DTYPE.values())
FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})
MAX_INPUT_BYTES = 1024**3
# JSON numbers become Python objects (tens of bytes each) before they become an array: larger
# inputs belong in .npy or .npz.
MAX_JSON_INPUT_BYTES = 64 * 1024**2
# One tensor: the container's member limit (verimesh.core.container.Limits.max_member_bytes).
MAX_TENSOR_BYTES = 2 * 1024**3
MAX_TENSOR_ELEMENTS = MAX_TENSOR_BYTES
MAX_DIM = 2**40
MAX_NPZ_MEMBERS = 1024

Dim = int | str | None
MAX_RANK = 16


def element_count(shape: Sequence[object], *, itemsize: int, what: str) -> int:
    """The number of elements of ``shape`` (a Python int, so it cannot overflow), refusing a bad
    dimension, a rank over MAX_RANK, or a tensor over MAX_TENSOR_ELEMENTS or MAX_TENSOR_BYTES."""
    if len(shape) > MAX_RANK:
        raise InvalidInputError(f"{what} has rank {len(shape)}; at most {MAX_RANK}")
    dims: list[int] = []
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < MAX_DIM:
            raise InvalidInputError(f"{what} has a bad dimension {d!r:.40}")
        dims.append(d)
    count = math.prod(dims)
    if count > MAX_TENSOR_ELEMENTS or count * itemsize > MAX_TENSOR_BYTES:
        elements = str(count) if count < 10**18 else f"about 10^{len(str(count)) - 1}"
        raise InvalidInputError(
            f"{what} declares shape {str(dims)[:120]} ({elements} elements of {itemsize} bytes), over the "
            f"{MAX_TENSOR_BYTES}-byte tensor limit",
            code="tensor-too-large",
            hint="a tensor verimesh reads is at most 2 GiB; this one was not written by verimesh",
        )
    return count


@dataclass(frozen=True)
class TensorRef:
    """A concrete tensor named by content: name, dtype, shape and tensor digest (docs/format.md §2)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> TensorRef:
        from verimesh.core.digest import tensor_digest

        return cls(name, array.dtype.name, tuple(int(d) for d in array.shape), tensor_digest(name, array))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "digest": self.digest}

    @classmethod
    def from_json(cls, doc: Any, *, what: str = "tensor") -> TensorRef:
        from verimesh.core.digest import parse_digest

        if not isinstance(doc, dict) or set(doc) != {"name", "dtype", "shape", "digest"}:
            raise InvalidInputError(f"{what} entry must have exactly name, dtype, shape, digest")
        name, dtype, shape = doc["name"], doc["dtype"], doc["shape"]
        if not isinstance(name, str) or not name or not isinstance(dtype, str) or dtype not in DTYPES:
            raise InvalidInputError(f"{what} entry has a bad name or an unsupported dtype")
        if not isinstance(shape, list):
            raise InvalidInputError(f"{what} {name!r} has a bad shape")
        element_count(shape, itemsize=np.dtype(dtype).itemsize, what=f"{what} {name!r}")
        parse_digest(doc["digest"], what=f"digest of {name!r}")
        return cls(name, dtype, tuple(shape), doc["digest"])


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, numpy dtype name, and dims (int, symbolic name, or None)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None

    def matches_shape(self, shape: tuple[int, ...]) -> bool:
        if self.shape is None:
            return True
        if len(self.shape) != len(shape):
            return False
        return all(not isinstance(d, int) or d <= 0 or d == s for d, s in zip(self.shape, shape, strict=True))

    def describe(self) -> str:
        dims = "?" if self.shape is None else "x".join(str(d) if d is not None else "?" for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def check_tensor(name: str, array: np.ndarray, spec: TensorSpec | None = None, *, what: str = "tensor") -> None:
    """Refuse dtypes outside the allowlist, shape/dtype mismatches, and NaN/Inf values."""
    if not isinstance(array, np.ndarray):  # np.load gives bytes for an .npz member not named *.npy
        raise InvalidInputError(f"{what} {name!r} is not an array")
    if array.dtype.name not in DTYPES:
        raise InvalidInputError(f"{what} {name!r} has dtype {array.dtype}, which verimesh does not support")
    if spec is not None:
        if array.dtype.name != spec.dtype:
            raise InvalidInputError(f"{what} {name!r} has dtype {array.dtype.name}, the model expects {spec.dtype}")
        if not spec.matches_shape(tuple(array.shape)):
            raise InvalidInputError(
                f"{what} {name!r} has shape {list(array.shape)}, the model expects {spec.describe()}"
            )
    if array.dtype.name in FLOAT_DTYPES and not np.isfinite(array).all():
        raise InvalidInputError(f"{what} {name!r} contains NaN or Inf")


def check_tensor_set(tensors: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], *, what: str = "input") -> None:
    expected = {s.name for s in specs}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise InvalidInputError(
            f"{what} names do not match the model: missing {missing or 'none'}, unexpected {extra or 'none'}",
            hint="model inputs are " + ", ".join(s.describe() for s in specs),
        )
    for spec in specs:
        check_tensor(spec.name, tensors[spec.name], spec, what=what)


def load_input_file(path: Path, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Load and validate an input file against the model's input specs."""
    suffix = path.suffix.lower()
    limit = MAX_JSON_INPUT_BYTES if suffix == ".json" else MAX_INPUT_BYTES
    data = read_user_file(path, what="input file", max_bytes=limit)
    if suffix == ".npy":
        if len(specs) != 1:
            raise InvalidInputError(
                f"{path}: a .npy file holds one array but the model has {len(specs)} inputs",
                hint="use a .npz with arrays named " + ", ".join(s.name for s in specs),
            )
        tensors = {specs[0].name: parse_npy(data, what=str(path))}
    elif suffix == ".npz":
        tensors = parse_npz(data, what=str(path))
    elif suffix == ".json":
        tensors = _load_json(data, path, specs)
    else:
        raise InvalidInputError(f"input file {path} must be .npy, .npz or .json")
    check_tensor_set(tensors, specs, what=f"input {path.name}")
    return tensors


# What numpy's header reader raises on a malformed header: it evaluates a Python literal, and
# retries a failed one through the tokenizer (for headers written by Python 2).
_NPY_HEADER_ERRORS = (
    ValueError, SyntaxError, TypeError, EOFError, OverflowError, RecursionError, MemoryError, tokenize.TokenError,
)  # fmt: skip


def parse_npy(data: bytes, *, what: str) -> np.ndarray:
    """One .npy array, header first: the dtype must be one verimesh commits to, and the data must be
    exactly shape x itemsize bytes, checked before any array is made. Returns a native-endian,
    C-ordered array that owns its memory."""
    fh = io.BytesIO(data)
    try:
        # numpy warns (on stderr) about a Python 2 header it had to repair: not the user's concern.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise InvalidInputError(f"{what}: .npy format version {version} is not supported (1.0 and 2.0 are)")
    except _NPY_HEADER_ERRORS as exc:
        raise InvalidInputError(f"{what} is not a readable .npy array: {str(exc)[:200]}") from exc
    if dtype.hasobject or dtype.name not in DTYPES or dtype.shape:
        raise InvalidInputError(f"{what} has dtype {str(dtype)[:80]}, which verimesh does not support")
    count = element_count(shape, itemsize=dtype.itemsize, what=what)
    offset = fh.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise InvalidInputError(
            f"{what} holds {len(data) - offset} data bytes; its header declares "
            f"{list(shape)} x {dtype.itemsize} = {count * dtype.itemsize}",
            code="npy-size-mismatch",
            hint="the file is truncated, or its header was edited",
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset) if count else np.empty(0, dtype=dtype)
    if dtype.name == "bool" and count and np.frombuffer(data, dtype=np.uint8, offset=offset).max() > 1:
        raise InvalidInputError(f"{what}: bool bytes other than 0 and 1")
    array = flat.reshape(shape, order="F" if fortran_order else "C")
    return array.astype(dtype.newbyteorder("="), order="C")  # a copy: writable, owns its memory


def npz_bytes(values: Mapping[str, np.ndarray]) -> bytes:
    """An .npz archive (stored, not compressed) of ``values`` by name: what ``parse_npz`` reads."""
    buf = io.BytesIO()
    np.savez(buf, **values)  # type: ignore[arg-type]
    return buf.getvalue()


def parse_npz(data: bytes, *, what: str) -> dict[str, np.ndarray]:
    """Arrays of an .npz archive by name. The ZIP directory is checked first: at most
    MAX_NPZ_MEMBERS ``.npy`` members, stored or deflated (deflate's ratio is bounded and zipfile
    inflates it incrementally), whose declared uncompressed sizes total at most MAX_INPUT_BYTES;
    each member is then read up to its declared size only and parsed with ``parse_npy``."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_NPZ_MEMBERS:
                raise InvalidInputError(f"{what} holds {len(infos)} arrays; at most {MAX_NPZ_MEMBERS}")
            names = [info.filename for info in infos]
            if len(set(names)) != len(names):
                raise InvalidInputError(f"{what} names an array twice")
            total = sum(info.file_size for info in infos)
            if total > MAX_INPUT_BYTES:
                raise InvalidInputError(
                    f"{what} declares {total} bytes uncompressed, over the {MAX_INPUT_BYTES}-byte limit",
                    code="npz-too-large",
                    hint="it would inflate beyond what an input may be (a ZIP bomb?)",
                )
            tensors: dict[str, np.ndarray] = {}
            for info in infos:
                if not info.filename.endswith(".npy") or info.is_dir():
                    raise InvalidInputError(f"{what}: member {info.filename[:80]!r} is not an .npy array")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise InvalidInputError(f"{what}: member {info.filename[:80]!r} uses an unsupported compression")
                with archive.open(info) as member:
                    raw = member.read(info.file_size + 1)
                if len(raw) != info.file_size:
                    raise InvalidInputError(f"{what}: member {info.filename[:80]!r} is not the size it declares")
                name = info.filename[: -len(".npy")]
                tensors[name] = parse_npy(raw, what=f"{what} member {info.filename[:80]!r}")
            return tensors
    # What zipfile raises on a corrupt archive: BadZipFile, zlib.error (bad deflate data), EOFError
    # (truncated member), NotImplementedError (unknown method), RuntimeError (encrypted member),
    # ValueError/OSError/UnicodeDecodeError (bad offsets, names).
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
            ValueError, OSError) as exc:  # fmt: skip
        raise InvalidInputError(f"{what} is not a readable .npz archive: {str(exc)[:200]}") from exc


def _json_array(value: Any, spec: TensorSpec, path: Path) -> np.ndarray:
    try:
        raw = np.array(value, dtype=np.float64 if spec.dtype != "bool" else np.bool_)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInputError(f"{path}: values for {spec.name!r} are not a rectangular array of numbers") from exc
    element_count(raw.shape, itemsize=np.dtype(spec.dtype).itemsize, what=f"{path}: {spec.name!r}")
    if spec.dtype in FLOAT_DTYPES or spec.dtype == "bool":
        with np.errstate(over="ignore", invalid="ignore"):  # out of range becomes Inf, refused by check_tensor
            return raw.astype(spec.dtype)
    if not np.isfinite(raw).all() or not np.array_equal(raw, np.round(raw)):
        raise InvalidInputError(f"{path}: {spec.name!r} expects integers ({spec.dtype})")
    info = np.iinfo(spec.dtype)
    if raw.size and (raw.min() < info.min or raw.max() > info.max):
        raise InvalidInputError(f"{path}: values for {spec.name!r} are out of range for {spec.dtype}")
    return raw.astype(spec.dtype)


def _load_json(data: bytes, path: Path, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    doc = parse_json(data, what=f"input file {path}", max_bytes=MAX_JSON_INPUT_BYTES)
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{path}: expected a JSON object of input arrays")
    by_name = {s.name: s for s in specs}
    if "input_data" in doc and "input_data" not in by_name:
        flat = doc["input_data"]
        if not isinstance(flat, list) or len(flat) != len(specs):
            raise InvalidInputError(f"{path}: input_data must hold one list per model input ({len(specs)})")
        out = {}
        for spec, values in zip(specs, flat, strict=True):
            array = _json_array(values, spec, path).reshape(-1)
            out[spec.name] = array.reshape(_concrete_shape(spec, array.size, path))
        return out
    return {
        name: _json_array(value, by_name[name], path) if name in by_name else np.array(0) for name, value in doc.items()
    }


def _concrete_shape(spec: TensorSpec, size: int, path: Path) -> tuple[int, ...]:
    if spec.shape is None:
        raise InvalidInputError(f"{path}: {spec.name!r} has unknown rank; give it as a nested list")
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in spec.shape]
    known = math.prod(d for d in dims if d > 0)  # a Python int: a model's dims may be huge
    if dims.count(-1) > 1 or (dims.count(-1) == 0 and known != size) or (known and size % known):
        raise InvalidInputError(f"{path}: {size} values for {spec.name!r} do not fit {spec.describe()}")
    if dims.count(-1) == 1:
        dims[dims.index(-1)] = size // known if known else 0
    return tuple(dims)


def tensors_to_json(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``{name: {"dtype", "shape", "values": nested lists}}``; NaN and infinities are refused
    (JSON has no spelling for them: write an .npz)."""
    out: dict[str, Any] = {}
    for name, array in tensors.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidInputError(f"tensor {name!r} holds NaN or Inf, which JSON cannot carry", hint="write an .npz")
        out[name] = {"dtype": array.dtype.name, "shape": list(array.shape), "values": array.tolist()}
    return out


def write_tensor_file(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write tensors as ``.npz`` (arrays named as given) or ``.json`` (``tensors_to_json``),
    through a partial file renamed into place."""
    import json

    suffix = path.suffix.lower()
    if suffix not in (".npz", ".json"):
        raise InvalidInputError(f"{path}: outputs are written as .npz or .json")
    payload = json.dumps(tensors_to_json(tensors), indent=2) + "\n" if suffix == ".json" else None
    partial = path.with_name(path.name + ".partial")
    try:
        if payload is not None:
            partial.write_text(payload)
        else:
            with partial.open("wb") as fh:
                np.savez(fh, **{n: np.asarray(a) for n, a in tensors.items()})  # type: ignore[arg-type]
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
