"""The one exception hierarchy of verimesh.

Every error carries a stable kebab-case ``code``, a ``hint`` saying what to do next, and the
process exit code the CLI maps it to. Library code raises these; only the CLI turns them into
exit codes (see ``verimesh.cli.app``).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_INVALID_INPUT = 3
EXIT_BACKEND_MISSING = 4
EXIT_INTERNAL = 70  # a bug in verimesh (EX_SOFTWARE): never 1, which means a verdict of reject
# A signal ended the run (128 + the signal number, as a shell reports it); partial files are removed.
EXIT_INTERRUPTED = 130  # SIGINT, Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM


class VerimeshError(Exception):
    """Base class. ``code`` is stable and documented; ``hint`` is one sentence."""

    exit_code: int = EXIT_INVALID_INPUT
    default_code: str = "verimesh-error"

    def __init__(self, message: str, *, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.hint = hint

    def one_line(self) -> str:
        text = f"error[{self.code}]: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return " ".join(text.split())


class InvalidInputError(VerimeshError):
    """A file or value given to verimesh is missing, malformed, oversized or inconsistent."""

    exit_code = EXIT_INVALID_INPUT
    default_code = "invalid-input"


class IntegrityError(InvalidInputError):
    """An artefact does not match the digest that pins it (edited job, swapped step file, ...)."""

    default_code = "integrity-broken"


class UnsafeModelError(InvalidInputError):
    """A model verimesh will not execute: external data, an operator outside the allow-list (custom,
    non-deterministic), or over the size bound. Named after the node or tensor at fault."""

    default_code = "unsafe-model"


class StepExecutionError(InvalidInputError):
    """onnxruntime could not load or run a step on the inputs it was given (an out-of-range index,
    an invalid shape, an opset it no longer implements)."""

    default_code = "step-failed"
    # True when the step's inputs made it fail (reproducible on any machine), not the machine.
    data_dependent: bool = False


class VerificationFailedError(VerimeshError):
    """Raised only on request (``Verdict.raise_for_reject``): the work was rejected."""

    exit_code = EXIT_REJECTED
    default_code = "verification-failed"


class BackendUnavailableError(VerimeshError):
    """A backend or optional dependency (CUDA provider, ezkl, ...) is not available here."""

    exit_code = EXIT_BACKEND_MISSING
    default_code = "backend-unavailable"


class ConfigurationError(VerimeshError):
    """Options that contradict each other or a setting that is not usable."""

    exit_code = EXIT_USAGE
    default_code = "bad-configuration"


class TerminatedError(BaseException):
    """SIGTERM arrived. Raised by the CLI's signal handler so that the run unwinds through the same
    cleanup as Ctrl-C (``except BaseException: writer.abort()`` removes partial files).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` or ``except
    VerimeshError`` on the way swallows it."""

    exit_code: int = EXIT_TERMINATED
    code: str = "terminated"
    hint: str = "partial output files were removed; run the command again"

    def __init__(self, signal_number: int = 15) -> None:
        super().__init__(f"terminated by signal {signal_number}")
        self.signal_number = signal_number
