"""Exception types shared across medvol.

Library code raises these (or plain ``ValueError``/``TypeError`` for bad arguments) with a message a user can
act on. Batch commands catch :class:`DataError` per input so one bad file never stops a run; bundle configs
turn :class:`ConfigError` into a one-line message instead of a traceback.
"""

from __future__ import annotations

__all__ = ["MedvolError", "DataError", "ConfigError", "find_error", "one_line", "DEBUG_ENV"]

# set (to anything but "0") to get tracebacks next to the one-line errors, also in worker processes
DEBUG_ENV = "MEDVOL_DEBUG"


class MedvolError(Exception):
    """Base class of medvol's own errors."""


class DataError(MedvolError, ValueError):
    """An input file or folder cannot be used (unreadable, corrupt, wrong dimensionality, NaN voxels, ...).

    The message names the file first, then the problem, on one line, e.g.
    ``"/data/ct/case1.nii.gz: not a valid NIfTI file (unexpected end of data)"``.
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the underlying library printed
        super().__init__(f"{self.path}: {self.problem}")


class ConfigError(MedvolError, ValueError):
    """A bundle configuration or command-line value is wrong (missing folder, unknown backbone, ...)."""


def find_error(exc: BaseException | None, kind: type[BaseException] = DataError) -> BaseException | None:
    """The first exception of type ``kind`` in ``exc``'s cause/context chain, or ``None``.

    MONAI's ``Compose`` re-raises every transform error as ``RuntimeError("applying transform ...")``; this
    recovers the medvol error underneath so its one-line message can be reported.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its type name when it has no message)."""
    return " ".join(str(err).split()) or type(err).__name__
