"""onnxruntime sessions for step models: the only module (with zk) that imports onnxruntime.

Sessions are created once per step file and reused. The graph optimization level is pinned
(both sides of a job use the job's level), onnxruntime's log noise is hidden unless verbose, and
under the ``fp32-strict`` precision class the CUDA provider runs with TF32 disabled.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from verimesh.errors import BackendUnavailableError, ConfigurationError, StepExecutionError

PRECISIONS = ("fp32-strict", "tf32")
OPT_LEVELS = ("disable", "basic", "extended", "all")
DEVICES = ("auto", "cpu", "cuda")

_log = logging.getLogger(__name__)
_verbose = False


def set_verbose(flag: bool) -> None:
    global _verbose
    _verbose = flag
    import onnxruntime as ort

    ort.set_default_logger_severity(0 if flag else 3)


def onnxruntime_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when the CUDA provider is available, else cpu. Asking for cuda without it fails."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ConfigurationError(f"unknown device {device!r}", hint="use auto, cpu or cuda")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise BackendUnavailableError(
            "the CUDA execution provider is not available",
            code="cuda-unavailable",
            hint="install onnxruntime-gpu (pip install 'verimesh[gpu]') on a machine with a GPU, or use --device cpu",
        )
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    return device


@dataclass
class StepRunner:
    """Runs step models with a pinned configuration; one session per step digest, reused."""

    device: str = "cpu"
    precision: str = "fp32-strict"
    optimization: str = "extended"
    threads: int = 0
    max_sessions: int = 256  # least recently used sessions beyond this are dropped
    _sessions: OrderedDict[str, Any] = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigurationError(f"unknown precision class {self.precision!r}", hint=f"use one of {PRECISIONS}")
        if self.optimization not in OPT_LEVELS:
            raise ConfigurationError(f"unknown optimization level {self.optimization!r}")
        self.device = resolve_device(self.device)

    @property
    def provider(self) -> str:
        return "CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider"

    def _providers(self) -> list[Any]:
        if self.device == "cuda":
            options = {"use_tf32": "0" if self.precision == "fp32-strict" else "1"}
            return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def has_session(self, digest: str) -> bool:
        return digest in self._sessions

    def session(self, digest: str, model_bytes: bytes | Callable[[], bytes]) -> Any:
        """The session for a step; ``model_bytes`` may be a loader, called only on a cache miss."""
        import onnxruntime as ort

        cached = self._sessions.get(digest)
        if cached is not None:
            self._sessions.move_to_end(digest)
            return cached
        if callable(model_bytes):
            model_bytes = model_bytes()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        opts.log_severity_level = 0 if _verbose else 3
        # Each step has its own session and thread pool; idle pools that spin-wait steal the cores
        # from the step that runs next. Measured on ResNet-50 (8 steps, 2 cores): 185 ms chained
        # with spinning vs 62 ms without, against 59 ms for the whole model in one session.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.threads:
            opts.intra_op_num_threads = self.threads
        failures: tuple[type[BaseException], ...] = (*_ort_errors(), RuntimeError, ValueError, TypeError)
        try:
            sess = ort.InferenceSession(model_bytes, sess_options=opts, providers=self._providers())
        except failures as exc:
            raise StepExecutionError(f"onnxruntime cannot load step {digest[:19]}: {_first_line(exc)}") from exc
        self._sessions[digest] = sess
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return sess

    def run(
        self,
        digest: str,
        model_bytes: bytes | Callable[[], bytes],
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
    ) -> dict[str, np.ndarray]:
        sess = self.session(digest, model_bytes)
        failures: tuple[type[BaseException], ...] = (*_ort_errors(), RuntimeError, ValueError, TypeError, MemoryError)
        try:
            results = sess.run(list(outputs), dict(inputs))
        except failures as exc:
            error = StepExecutionError(f"onnxruntime failed running step {digest[:19]}: {_first_line(exc)}")
            error.data_dependent = _data_dependent(exc, (*inputs, *outputs))
            raise error from exc
        return {name: np.asarray(value) for name, value in zip(outputs, results, strict=True)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


@cache
def _ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception types (Fail, InvalidArgument, InvalidGraph, NotImplemented, ...):
    they derive from Exception, not RuntimeError, so they are named here."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(
        value for name in dir(state) if isinstance(value := getattr(state, name), type) and issubclass(value, Exception)
    )


# What onnxruntime says when the machine, not the inputs, made a step fail.
_RESOURCE_PHRASES = ("alloc", "out of memory", "memory limit", "cuda", "cudnn", "cublas", "device")


def _data_dependent(exc: BaseException, names: Sequence[str] = ()) -> bool:
    """Did the inputs make the step fail (an index out of range, a shape that does not fit), as
    opposed to the machine (memory, a provider)? Only the former is reproducible anywhere.
    onnxruntime's message quotes tensor names, which the job chose: they are taken out before the
    message is read, so that a tensor called ``memory`` does not make a bad shape the machine's."""
    import re

    from onnxruntime.capi import onnxruntime_pybind11_state as state

    text = re.sub(r"Name:'[^']*'", "", str(exc))  # node names, chosen by the job too
    for name in sorted(set(names), key=len, reverse=True):
        if name:
            text = text.replace(name, "")
    text = text.lower()
    if any(phrase in text for phrase in _RESOURCE_PHRASES):
        return False
    return isinstance(exc, (state.InvalidArgument, state.Fail))
