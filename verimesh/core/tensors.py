"""Tensors: the dtypes verimesh accepts, tensor specs, and loading user input files.

Input files: ``.npy`` (single-input models), ``.npz`` (arrays named after the model inputs), or
``.json`` (``{"input_name": nested lists}`` or ezkl's ``{"input_data": [[flat values], ...]}``,
one flat list per model input, in model order). Pickled objects are never loaded.
"""

from __future__ import annotations

import io
import zipfile
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

Dim = int | str | None
MAX_RANK = 16


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
        if not isinstance(name, str) or not name or dtype not in DTYPES:
            raise InvalidInputError(f"{what} entry has a bad name or an unsupported dtype")
        if not isinstance(shape, list) or len(shape) > MAX_RANK:
            raise InvalidInputError(f"{what} {name!r} has a bad shape")
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape):
            raise InvalidInputError(f"{what} {name!r} has a bad shape")
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
    data = read_user_file(path, what="input file", max_bytes=MAX_INPUT_BYTES)
    if suffix == ".npy":
        if len(specs) != 1:
            raise InvalidInputError(
                f"{path}: a .npy file holds one array but the model has {len(specs)} inputs",
                hint="use a .npz with arrays named " + ", ".join(s.name for s in specs),
            )
        tensors = {specs[0].name: _load_npy(data, path)}
    elif suffix == ".npz":
        tensors = _load_npz(data, path)
    elif suffix == ".json":
        tensors = _load_json(data, path, specs)
    else:
        raise InvalidInputError(f"input file {path} must be .npy, .npz or .json")
    check_tensor_set(tensors, specs, what=f"input {path.name}")
    return tensors


def _load_npy(data: bytes, path: Path) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidInputError(f"{path} is not a readable .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise InvalidInputError(f"{path} is not a single .npy array")
    return array


def _load_npz(data: bytes, path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if len(npz.files) > 1024:
                raise InvalidInputError(f"{path} holds {len(npz.files)} arrays; at most 1024")
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"{path} is not a readable .npz archive: {exc}") from exc


def _json_array(value: Any, spec: TensorSpec, path: Path) -> np.ndarray:
    try:
        raw = np.array(value, dtype=np.float64 if spec.dtype != "bool" else np.bool_)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"{path}: values for {spec.name!r} are not a rectangular array of numbers") from exc
    if spec.dtype in FLOAT_DTYPES or spec.dtype == "bool":
        return raw.astype(spec.dtype)
    if not np.isfinite(raw).all() or not np.array_equal(raw, np.round(raw)):
        raise InvalidInputError(f"{path}: {spec.name!r} expects integers ({spec.dtype})")
    info = np.iinfo(spec.dtype)
    if raw.size and (raw.min() < info.min or raw.max() > info.max):
        raise InvalidInputError(f"{path}: values for {spec.name!r} are out of range for {spec.dtype}")
    return raw.astype(spec.dtype)


def _load_json(data: bytes, path: Path, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    doc = parse_json(data, what=f"input file {path}", max_bytes=MAX_INPUT_BYTES)
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
    known = int(np.prod([d for d in dims if d > 0])) if any(d > 0 for d in dims) else 1
    if dims.count(-1) > 1 or (dims.count(-1) == 0 and known != size) or (known and size % known):
        raise InvalidInputError(f"{path}: {size} values for {spec.name!r} do not fit {spec.describe()}")
    if dims.count(-1) == 1:
        dims[dims.index(-1)] = size // known if known else 0
    return tuple(dims)
