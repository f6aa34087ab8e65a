"""Every user-facing failure is an :class:`SSFDeployError`, explained in one line.

Exit codes (the CLI maps them, callers can rely on them):

* **1** — a check ran and failed (:class:`VerificationError`): outputs differ, a threshold was
  missed. The input was fine; the result is not.
* **2** — usage or bad input (every other subclass): a corrupt or foreign checkpoint, a base that
  is not the one trained on, a model that cannot be fused exactly, a missing dependency.
* **130** — interrupted (Ctrl-C).

The subclasses let callers tell "unfusable" from "corrupt" without parsing messages.
"""
from __future__ import annotations

__all__ = ["SSFDeployError", "UsageError", "CheckpointError", "BaseMismatchError", "FuseError",
           "VerificationError", "first_line", "EXIT_CHECK_FAILED", "EXIT_BAD_INPUT",
           "EXIT_INTERRUPTED"]

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class SSFDeployError(Exception):
    """A problem with the user's input or environment, explained in one line."""
    exit_code = EXIT_BAD_INPUT


class UsageError(SSFDeployError):
    """Options that contradict each other or are out of range."""


class CheckpointError(SSFDeployError):
    """A checkpoint, pack or weights file that cannot be read or does not fit the model."""


class BaseMismatchError(CheckpointError):
    """The base weights are not the ones the task was trained on (hash or keys differ)."""


class FuseError(SSFDeployError):
    """The tuned model cannot be folded into the base architecture exactly."""


class VerificationError(SSFDeployError):
    """A comparison ran and failed: the artefact does not match its reference."""
    exit_code = EXIT_CHECK_FAILED

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


def first_line(exc: BaseException) -> str:
    """The whole first non-empty line of an exception's message, or its type name if it has none.

    Never cut mid-sentence: a message is only useful whole.
    """
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
