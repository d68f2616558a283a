"""Generate mode: autoregressive token generation from a decoder ONNX model (docs/format.md §15).

A generate job pins a decoder-only model in the layout Hugging Face Optimum and
onnxruntime-genai export (inputs ``input_ids``, ``attention_mask``, optional ``position_ids``,
``past_key_values.{i}.key|value``; outputs ``logits``, ``present.{i}.key|value``; or a model
without a KV cache: ``input_ids`` [and ``attention_mask``, ``position_ids``] -> ``logits``),
a prompt (``input_ids``, the job's input), and how tokens are chosen. The worker prefills the
prompt and decodes with the KV cache; for each generated position t it commits a record:

    tokens[0, t]        the token it chose
    topk_values[t]      the k largest logits, highest first
    topk_indices[t]     their token ids (ties: the lower id first)
    sketch[t]           logits @ R, R a +-1/sqrt(V) matrix derived from the job's nonce

A verifier re-runs the model once on prompt + tokens (one prefill pass: every position's logits)
and checks at the sampled positions: the committed top-k values at their indices, that no other
token beats the k-th by more than the near-tie margin, the sketch, and that the token is what the
sampling rule gives from the recomputed logits wherever the choice is not a near-tie.

Sampling (``sample``) is reproducible: position t uses ``u_t``, the first 8 bytes of
SHA-256("verimesh.generate.sample.v1\\0" || nonce || t as 8 bytes big-endian) over 2^64; the
tokens sorted by (logit descending, id ascending) are cut to the smallest prefix whose softmax
(logits / temperature, float64) mass reaches ``top_p``, renormalized, and the token is the first
whose cumulative mass exceeds ``u_t``. Greedy is the argmax (the lowest id among exact ties).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from verimesh.core.canonical import parse_json
from verimesh.core.digest import sha256_bytes
from verimesh.core.files import read_user_file
from verimesh.errors import InvalidInputError
from verimesh.jobs.tolerance import Tolerance, compare_tensors

TRACE = ("input_ids", "tokens", "topk_values", "topk_indices", "sketch")  # a generate job's trace, in order
RECORDS = TRACE[1:]
MAX_NEW_TOKENS = 8192
MAX_PROMPT = 32768
DEFAULT_TOP_K = 8
DEFAULT_SKETCH = 8
_SAMPLE_TAG = b"verimesh.generate.sample.v1\x00"
_SKETCH_TAG = b"verimesh.generate.sketch.v1\x00"
LAYOUT_HELP = (
    "a decoder-only ONNX export: inputs input_ids, attention_mask, optional position_ids, "
    "past_key_values.{i}.key|value; outputs logits, present.{i}.key|value (or input_ids [attention_mask, "
    "position_ids] -> logits without a KV cache)"
)


@dataclass(frozen=True)
class Sampling:
    kind: str  # "greedy" | "sample"
    temperature: float = 1.0
    top_p: float = 1.0

    def to_json(self) -> dict[str, str]:
        if self.kind == "greedy":
            return {"kind": "greedy"}
        return {"kind": "sample", "temperature": repr(self.temperature), "top_p": repr(self.top_p)}

    @classmethod
    def from_json(cls, doc: Any) -> Sampling:
        if doc == {"kind": "greedy"}:
            return cls("greedy")
        if not isinstance(doc, dict) or set(doc) != {"kind", "temperature", "top_p"} or doc["kind"] != "sample":
            raise InvalidInputError('generate sampling is {"kind": "greedy"} or {"kind": "sample", temperature, top_p}')
        try:
            temperature, top_p = float(doc["temperature"]), float(doc["top_p"])
        except (TypeError, ValueError) as exc:
            raise InvalidInputError("sampling temperature and top_p are decimal strings") from exc
        return _checked(cls("sample", temperature, top_p))


def _checked(sampling: Sampling) -> Sampling:
    if not (np.isfinite(sampling.temperature) and 0.01 <= sampling.temperature <= 100):
        raise InvalidInputError("sampling temperature must be 0.01 .. 100")
    if not (np.isfinite(sampling.top_p) and 0 < sampling.top_p <= 1):
        raise InvalidInputError("sampling top_p must be in (0, 1]")
    return sampling


def parse_sampling(text: str) -> Sampling:
    """``greedy``, or ``temperature=T[,top_p=P]`` (the CLI's --sampling)."""
    if text.strip() == "greedy":
        return Sampling("greedy")
    values: dict[str, float] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("temperature", "top_p") or key.strip() in values:
            raise InvalidInputError(f"--sampling {text!r}: want greedy or temperature=T[,top_p=P]")
        try:
            values[key.strip()] = float(value)
        except ValueError as exc:
            raise InvalidInputError(f"--sampling {text!r}: {key.strip()} is not a number") from exc
    if "temperature" not in values:
        raise InvalidInputError(f"--sampling {text!r}: give temperature=T (or greedy)")
    return _checked(Sampling("sample", values["temperature"], values.get("top_p", 1.0)))


@dataclass(frozen=True)
class Layout:
    """The model's inputs and outputs, discovered from its graph when the job is made."""

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    past: tuple[tuple[str, str], ...]  # (key, value) inputs per layer
    present: tuple[tuple[str, str], ...]  # (key, value) outputs per layer
    logits: str
    kv_heads: int
    head_dim: int
    vocab: int

    def to_json(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "past": [list(p) for p in self.past],
                "present": [list(p) for p in self.present], "logits": self.logits, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "vocab": self.vocab}  # fmt: skip

    @classmethod
    def from_json(cls, doc: Any) -> Layout:
        keys = {"input_ids", "attention_mask", "position_ids", "past", "present", "logits", "kv_heads", "head_dim",
                "vocab"}  # fmt: skip
        if not isinstance(doc, dict) or set(doc) != keys:
            raise InvalidInputError(f"generate layout must have exactly {sorted(keys)}")
        pairs = []
        for field in ("past", "present"):
            value = doc[field]
            if (
                not isinstance(value, list)
                or len(value) > 1024
                or not all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) and n for n in p) for p in value
                )
            ):
                raise InvalidInputError(f"generate layout {field} must be [[key, value], ...] tensor names")
            pairs.append(tuple((str(p[0]), str(p[1])) for p in value))
        names = [doc["input_ids"], doc["logits"]]
        if not all(isinstance(n, str) and n for n in names) or not all(
            n is None or (isinstance(n, str) and n) for n in (doc["attention_mask"], doc["position_ids"])
        ):
            raise InvalidInputError("generate layout names must be tensor names")
        dims = (doc["kv_heads"], doc["head_dim"], doc["vocab"])
        if not all(type(d) is int and 0 <= d <= 1 << 20 for d in dims) or doc["vocab"] < 2:
            raise InvalidInputError("generate layout kv_heads, head_dim and vocab must be small non-negative integers")
        if len(pairs[0]) != len(pairs[1]):
            raise InvalidInputError("generate layout: one present output per past input")
        return cls(doc["input_ids"], doc["attention_mask"], doc["position_ids"], pairs[0], pairs[1], doc["logits"],
                   *dims)  # fmt: skip


@dataclass(frozen=True)
class GenerateSpec:
    """What a generate job pins beside the model and the prompt."""

    max_new_tokens: int
    sampling: Sampling
    stop_tokens: tuple[int, ...]
    top_k: int
    sketch: int
    layout: Layout
    tokenizer: tuple[str, str] | None = None  # (path relative to the job, sha256 digest)

    def to_json(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "sampling": self.sampling.to_json(),
                "stop_tokens": list(self.stop_tokens), "top_k": self.top_k, "sketch": self.sketch,
                "layout": self.layout.to_json(),
                "tokenizer": None if self.tokenizer is None else {"path": self.tokenizer[0],
                                                                  "digest": self.tokenizer[1]}}  # fmt: skip

    @classmethod
    def from_json(cls, doc: Any, *, relative_path: Callable[[Any, str], str]) -> GenerateSpec:
        keys = {"max_new_tokens", "sampling", "stop_tokens", "top_k", "sketch", "layout", "tokenizer"}
        if not isinstance(doc, dict) or set(doc) != keys:
            raise InvalidInputError(f"a generate job's generate section has exactly {sorted(keys)}")
        layout = Layout.from_json(doc["layout"])
        new, top_k, sketch, stops = doc["max_new_tokens"], doc["top_k"], doc["sketch"], doc["stop_tokens"]
        if type(new) is not int or not 1 <= new <= MAX_NEW_TOKENS:
            raise InvalidInputError(f"max_new_tokens must be 1 .. {MAX_NEW_TOKENS}")
        if type(top_k) is not int or not 2 <= top_k <= min(64, layout.vocab):
            raise InvalidInputError("top_k must be 2 .. min(64, vocab)")
        if type(sketch) is not int or not 1 <= sketch <= 64:
            raise InvalidInputError("sketch must be 1 .. 64")
        if (
            not isinstance(stops, list)
            or len(stops) > 64
            or not all(type(s) is int and 0 <= s < layout.vocab for s in stops)
        ):
            raise InvalidInputError("stop_tokens must be up to 64 token ids of the vocabulary")
        if stops != sorted(set(stops)):
            raise InvalidInputError("stop_tokens must be sorted and unique")
        tokenizer = doc["tokenizer"]
        if tokenizer is not None:
            if not isinstance(tokenizer, dict) or set(tokenizer) != {"path", "digest"}:
                raise InvalidInputError("generate tokenizer is null or {path, digest}")
            from verimesh.core.digest import parse_digest

            parse_digest(tokenizer["digest"], what="tokenizer digest")
            tokenizer = (relative_path(tokenizer["path"], "tokenizer"), str(tokenizer["digest"]))
        return cls(new, Sampling.from_json(doc["sampling"]), tuple(stops), top_k, sketch, layout, tokenizer)


# -- the model's layout ----------------------------------------------------------------------------

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


def discover_layout(model: Any, vocab: int | None = None) -> Layout:
    """The generate layout of an ONNX ModelProto, or InvalidInputError saying what was expected."""
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    outputs = {o.name: o for o in graph.output}
    past: dict[int, dict[str, Any]] = {}
    for name, value in inputs.items():
        if (m := _PAST.match(name)) is not None:
            past.setdefault(int(m.group(1)), {})[m.group(2)] = value
    present: dict[int, dict[str, str]] = {}
    for name in outputs:
        if (m := _PRESENT.match(name)) is not None:
            present.setdefault(int(m.group(1)), {})[m.group(2)] = name
    known = {"input_ids", "attention_mask", "position_ids", *(f"past_key_values.{i}.{w}" for i in past
                                                                for w in ("key", "value"))}  # fmt: skip
    unknown = sorted(set(inputs) - known)
    if "input_ids" not in inputs or "logits" not in outputs or unknown:
        why = f"it has inputs {sorted(inputs)[:8]} and outputs {sorted(outputs)[:8]}"
        raise InvalidInputError(f"not a decoder model verimesh can generate with: {why}; expected {LAYOUT_HELP}")
    layers = sorted(past)
    if (
        layers != list(range(len(layers)))
        or sorted(present) != layers
        or any(set(past[i]) != {"key", "value"} or set(present[i]) != {"key", "value"} for i in layers)
    ):
        raise InvalidInputError(f"the model's past_key_values inputs and present outputs do not pair up by layer; "
                                f"expected {LAYOUT_HELP}")  # fmt: skip
    kv_heads = head_dim = 0
    for i in layers:
        for value in past[i].values():
            dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            if len(dims) != 4 or dims[1] is None or dims[3] is None:
                raise InvalidInputError(f"past_key_values.{i} must be [batch, kv_heads, past, head_dim] with fixed "
                                        "kv_heads and head_dim")  # fmt: skip
            if (kv_heads, head_dim) not in ((0, 0), (dims[1], dims[3])):
                raise InvalidInputError("every layer's past_key_values must have the same kv_heads and head_dim")
            kv_heads, head_dim = int(dims[1]), int(dims[3])
            if value.type.tensor_type.elem_type != 1:  # float32
                raise InvalidInputError("past_key_values must be float32 (fp16/bf16 KV caches are not supported yet)")
    if vocab is None:
        dims = outputs["logits"].type.tensor_type.shape.dim
        vocab = dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else 0
    return Layout("input_ids", "attention_mask" if "attention_mask" in inputs else None,
                  "position_ids" if "position_ids" in inputs else None,
                  tuple((past[i]["key"].name, past[i]["value"].name) for i in layers),
                  tuple((present[i]["key"], present[i]["value"]) for i in layers), "logits", kv_heads, head_dim,
                  int(vocab))  # fmt: skip


# -- running the model ------------------------------------------------------------------------------

Run = Callable[[Mapping[str, np.ndarray], Sequence[str]], dict[str, np.ndarray]]


def feeds_for(layout: Layout, ids: np.ndarray, past_len: int, past: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    total = past_len + ids.shape[1]
    feeds: dict[str, Any] = {layout.input_ids: ids.astype(np.int64)}
    if layout.attention_mask is not None:
        feeds[layout.attention_mask] = np.ones((1, total), dtype=np.int64)
    if layout.position_ids is not None:
        feeds[layout.position_ids] = np.arange(past_len, total, dtype=np.int64)[None, :]
    for key, value in layout.past:
        for name in (key, value):
            feeds[name] = (past or {}).get(name, np.zeros((1, layout.kv_heads, 0, layout.head_dim), np.float32))
    return feeds


def sequence_logits(run: Run, layout: Layout, ids: np.ndarray) -> np.ndarray:
    """The logits of every position of ``ids`` ([1, n]) in one prefill pass: [n, vocab] float32."""
    out = run(feeds_for(layout, ids, 0, None), [layout.logits])[layout.logits]
    return _rows(out, ids.shape[1], layout)


def _rows(out: np.ndarray, n: int, layout: Layout) -> np.ndarray:
    if out.ndim != 3 or out.shape[0] != 1 or out.shape[1] != n or out.shape[2] != layout.vocab:
        raise InvalidInputError(f"the model's logits are {list(out.shape)}, not [1, {n}, {layout.vocab}]")
    if out.dtype != np.float32:
        out = out.astype(np.float32)
    return np.ascontiguousarray(out[0])


def generate(
    run: Run,
    spec: GenerateSpec,
    prompt: np.ndarray,
    nonce: str,
    on_row: Callable[[int, np.ndarray], None],
    forced: Sequence[int] | None = None,
) -> list[int]:
    """Prefill, then decode with the KV cache (re-running the whole prefix without one); calls
    ``on_row(t, logits)`` with the logits each generated token was chosen from. ``forced``: feed
    these tokens instead of choosing (calibration compares runs position by position)."""
    layout = spec.layout
    tokens: list[int] = []
    past: dict[str, np.ndarray] | None = None
    past_len = 0
    ids = prompt
    wanted = [layout.logits, *(n for pair in layout.present for n in pair)]
    for t in range(spec.max_new_tokens if forced is None else len(forced)):
        if layout.past:
            out = run(feeds_for(layout, ids, past_len, past), wanted)
            logits = _rows(out[layout.logits], ids.shape[1], layout)[-1]
            past = {p: out[q] for pair_in, pair_out in zip(layout.past, layout.present, strict=True)
                    for p, q in zip(pair_in, pair_out, strict=True)}  # fmt: skip
            past_len += ids.shape[1]
        else:
            full = np.concatenate([prompt, np.array([tokens], dtype=np.int64)], axis=1) if tokens else prompt
            logits = sequence_logits(run, layout, full)[-1]
        problem = logits_problem(t, logits)
        if problem is not None:
            raise InvalidInputError(problem, code="model-inconsistent")
        on_row(t, logits)
        token = choose(logits, spec.sampling, nonce, t) if forced is None else int(forced[t])
        tokens.append(token)
        if token in spec.stop_tokens:
            break
        ids = np.array([[token]], dtype=np.int64)
    return tokens


# -- choosing a token, and the records --------------------------------------------------------------


def sample_u(nonce: str, t: int) -> float:
    digest = hashlib.sha256(_SAMPLE_TAG + nonce.encode() + t.to_bytes(8, "big")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _order(logits: np.ndarray) -> np.ndarray:
    """Token ids by logit descending, ids ascending among exact ties."""
    return np.lexsort((np.arange(logits.size), -logits.astype(np.float64)))


def choose(logits: np.ndarray, sampling: Sampling, nonce: str, t: int, u: float | None = None,
           keep_shift: int = 0) -> int:  # fmt: skip
    """The token the rule picks (``keep_shift``: the top-p cut one token earlier or later, what a
    verifier also allows where the cut's mass is within its margin of ``top_p``)."""
    if sampling.kind == "greedy":
        return int(np.argmax(logits))  # the first maximum: the lowest id among exact ties
    order, cumulative = _cumulative(logits, sampling)
    keep = min(max(_cut(cumulative, sampling.top_p) + keep_shift, 1), cumulative.size)
    kept = cumulative[:keep] / cumulative[keep - 1]
    draw = sample_u(nonce, t) if u is None else u
    return int(order[min(int(np.searchsorted(kept, draw, side="right")), keep - 1)])


def _cumulative(logits: np.ndarray, sampling: Sampling) -> tuple[np.ndarray, np.ndarray]:
    order = _order(logits)
    scaled = logits[order].astype(np.float64) / sampling.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    return order, np.cumsum(probs)


def _cut(cumulative: np.ndarray, top_p: float) -> int:
    return min(int(np.searchsorted(cumulative, top_p - 1e-12)) + 1, cumulative.size)


def logits_problem(t: int, logits: np.ndarray) -> str | None:
    """Logits a token can be chosen from: finite, or -inf for a token the model masks out."""
    if np.isnan(logits).any() or np.isposinf(logits).any() or not np.isfinite(logits).any():
        return f"the model's logits at position {t} hold NaN or +inf, or nothing finite: no token can be chosen"
    return None


def _finite(logits: np.ndarray) -> np.ndarray:
    """The logits with masked (-inf) tokens at 0: what the sketch projects."""
    return np.where(np.isfinite(logits), logits, 0).astype(np.float32)


def sketch_matrix(nonce: str, vocab: int, width: int) -> np.ndarray:
    """R: [vocab, width] of +-1/sqrt(vocab), from the job's nonce (the node cannot pick it)."""
    seed = int.from_bytes(hashlib.sha256(_SKETCH_TAG + nonce.encode()).digest()[:8], "big")
    signs = np.random.default_rng(seed).integers(0, 2, size=(vocab, width), dtype=np.int8)
    return ((signs.astype(np.float32) * 2 - 1) / np.float32(np.sqrt(vocab))).astype(np.float32)


def record(logits: np.ndarray, top_k: int, sketch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-k values, top-k indices, sketch) of one position's logits (masked tokens: -inf)."""
    part = np.argpartition(-logits, top_k - 1)[:top_k]
    idx = part[np.lexsort((part, -logits[part].astype(np.float64)))]
    return logits[idx].astype(np.float32), idx.astype(np.int64), (_finite(logits) @ sketch).astype(np.float32)


def near_tie(tol: Tolerance, logits: np.ndarray) -> float:
    """Two logits closer than this are a near-tie, whose order is no evidence: what the top-k
    comparison lets the committed values deviate in all (atol plus the relative Frobenius bound
    of the k largest logits), for two of them."""
    finite = logits[np.isfinite(logits)].astype(np.float64)
    top = np.partition(finite, max(finite.size - DEFAULT_TOP_K, 0))[-DEFAULT_TOP_K:] if finite.size else finite
    return float(np.sqrt(2) * (tol.atol + tol.max_rel_frobenius * np.linalg.norm(top)))


def sketch_bound(tol: Tolerance, logits: np.ndarray) -> float:
    """How far each sketch entry may be from the verifier's: every column of R has unit norm, so
    an entry moves at most by the logits' own deviation (the relative Frobenius bound of them all)."""
    return float(tol.atol + tol.max_rel_frobenius * np.linalg.norm(_finite(logits).astype(np.float64)))


def position_problem(
    spec: GenerateSpec, tol: Tolerance, nonce: str, t: int, recomputed: np.ndarray, token: int,
    values: np.ndarray, indices: np.ndarray, sketch: np.ndarray, matrix: np.ndarray,
) -> str | None:  # fmt: skip
    """What is wrong with position t's record against the verifier's own logits (None: it holds).
    The logits must be usable (``logits_problem``: the caller raises on that, blaming no node)."""
    tie = near_tie(tol, recomputed)
    if len(set(indices.tolist())) != indices.size or indices.min() < 0 or indices.max() >= recomputed.size:
        return f"position {t}: the committed top-k indices are not {spec.top_k} distinct token ids"
    compared = compare_tensors(f"position {t} top-k", values, recomputed[indices], tol)  # -inf: exact
    if not compared.ok:
        return compared.reason
    others = np.ones(recomputed.size, dtype=bool)
    others[indices] = False
    if others.any() and float(recomputed[others].max()) > float(recomputed[indices].min()) + tie:
        better = int(np.flatnonzero(others)[np.argmax(recomputed[others])])
        return f"position {t}: token {better} beats the committed top-{spec.top_k} (not a near-tie)"
    if not np.isfinite(sketch).all():
        return f"position {t}: the committed sketch is not finite"
    deviation = float(np.max(np.abs(sketch.astype(np.float64) - (_finite(recomputed) @ matrix).astype(np.float64))))
    bound = sketch_bound(tol, recomputed)
    if not deviation <= bound:
        return f"position {t} sketch: an entry is {deviation:.3g} from the recomputed one (bound {bound:.3g})"
    if not np.isfinite(recomputed[token]):
        return f"position {t}: token {token} is one the model masks out (-inf)"
    allowed = allowed_tokens(spec, tol, nonce, t, recomputed)
    if token not in allowed:
        rule = "the argmax" if spec.sampling.kind == "greedy" else "what the sampling rule draws"
        return f"position {t}: token {token} is not {rule} of the recomputed logits ({sorted(allowed)[:4]})"
    return None


def allowed_tokens(spec: GenerateSpec, tol: Tolerance, nonce: str, t: int, logits: np.ndarray) -> set[int]:
    """The tokens position t may hold given these logits: the rule's choice, and near it the
    choices a near-tie allows. Greedy: every token within the margin of the maximum. Sampling:
    the draws at u_t and u_t +- w, w = min(0.05, 2 x margin / temperature) (a logit moved by d
    moves each token's probability by at most a factor e^(2d/T)), each with the top-p cut where
    it is, and one token earlier or later where the mass at the cut is within w of top_p."""
    tie = near_tie(tol, logits)
    if spec.sampling.kind == "greedy":
        return set(np.flatnonzero(logits >= logits.max() - tie).tolist())
    u = sample_u(nonce, t)
    window = min(0.05, 2 * tie / spec.sampling.temperature)
    _, cumulative = _cumulative(logits, spec.sampling)
    keep = _cut(cumulative, spec.sampling.top_p)
    shifts = [0]
    if keep > 1 and spec.sampling.top_p - cumulative[keep - 2] <= window:
        shifts.append(-1)
    if keep < cumulative.size and cumulative[keep - 1] - spec.sampling.top_p <= window:
        shifts.append(1)
    return {choose(logits, spec.sampling, nonce, t, u=min(max(v, 0.0), 1.0 - 1e-12), keep_shift=shift)
            for v in (u - window, u, u + window) for shift in shifts}  # fmt: skip


def stop_problem(spec: GenerateSpec, tokens: Sequence[int]) -> str | None:
    """The answer's length: it ends at max_new_tokens or at its first stop token, never before or after."""
    n = len(tokens)
    if not 1 <= n <= spec.max_new_tokens:
        return f"{n} generated tokens: a generate job asks 1 .. {spec.max_new_tokens}"
    early = [i for i, tok in enumerate(tokens[:-1]) if tok in spec.stop_tokens]
    if early:
        return f"the answer goes on after stop token {tokens[early[0]]} at position {early[0]} (extended)"
    if n < spec.max_new_tokens and tokens[-1] not in spec.stop_tokens:
        return f"the answer ends after {n} of {spec.max_new_tokens} tokens without a stop token (truncated)"
    return None


def shape_problem(spec: GenerateSpec, tensors: Mapping[str, np.ndarray]) -> str | None:
    """The records fit one another: tokens [1, N], top-k [N, k] (float32, int64), sketch [N, m]."""
    tokens = tensors["tokens"]
    if tokens.dtype != np.int64 or tokens.ndim != 2 or tokens.shape[0] != 1:
        return f"tokens are {tokens.dtype}{list(tokens.shape)}, not int64[1, N]"
    n = tokens.shape[1]
    if n and (int(tokens.min()) < 0 or int(tokens.max()) >= spec.layout.vocab):
        return f"a token id is outside the vocabulary of {spec.layout.vocab}"
    expected = {"topk_values": (np.float32, (n, spec.top_k)), "topk_indices": (np.int64, (n, spec.top_k)),
                "sketch": (np.float32, (n, spec.sketch))}  # fmt: skip
    for name, (dtype, shape) in expected.items():
        got = tensors[name]
        if got.dtype != dtype or tuple(got.shape) != shape:
            return f"{name} is {got.dtype}{list(got.shape)}, not {np.dtype(dtype)}{list(shape)}"
    return None


# -- prompts and tokenizers ------------------------------------------------------------------------


def load_prompt(path: Path, tokenizer: Path | None) -> np.ndarray:
    """prompt.json: {"input_ids": [[...]]}, or {"text": "..."} with a tokenizer: int64 [1, P]."""
    doc = parse_json(read_user_file(path, what="prompt", max_bytes=4 << 20), what=f"prompt {path}", max_bytes=4 << 20)
    if isinstance(doc, dict) and set(doc) == {"text"} and isinstance(doc["text"], str):
        if tokenizer is None:
            raise InvalidInputError(f"{path} gives text: pass --tokenizer tokenizer.json to encode it")
        try:
            ids = [load_tokenizer(tokenizer).encode(doc["text"]).ids]
        except Exception as exc:  # the tokenizers library raises its own exception types
            raise InvalidInputError(f"{tokenizer} cannot encode the prompt's text: {str(exc)[:200]}") from exc
    elif isinstance(doc, dict) and set(doc) == {"input_ids"}:
        ids = doc["input_ids"]
    else:
        raise InvalidInputError(f'{path} must be {{"input_ids": [[...]]}} or {{"text": "..."}}')
    row = ids[0] if isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], list) else None
    if row is None or not 1 <= len(row) <= MAX_PROMPT or not all(type(i) is int and 0 <= i < 2**31 for i in row):
        raise InvalidInputError(f"{path}: input_ids must be one row of 1 .. {MAX_PROMPT} token ids")
    return np.array(ids, dtype=np.int64)


def load_tokenizer(path: Path) -> Any:
    """A Hugging Face ``tokenizers`` JSON file."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:  # pragma: no cover - an install without the extra
        raise InvalidInputError("reading a tokenizer needs the tokenizers package (pip install tokenizers)") from exc
    data = read_user_file(path, what="tokenizer", max_bytes=64 << 20)
    try:
        return Tokenizer.from_str(data.decode())
    except Exception as exc:  # the library raises its own exception type
        raise InvalidInputError(f"{path} is not a tokenizers JSON file: {str(exc)[:200]}") from exc


def tokenizer_digest(path: Path) -> str:
    return sha256_bytes(read_user_file(path, what="tokenizer", max_bytes=64 << 20))
