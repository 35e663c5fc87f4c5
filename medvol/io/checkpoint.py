"""Reading torch checkpoints safely (``weights_only=True``) with one-line errors that name the file.

``torch.load`` reports a truncated file as a 300-character miniz message, a text file or a pickle of Python
objects as a 600-character advice text, an empty file as a bare ``EOFError``. :func:`read_checkpoint` turns each
into a :class:`~medvol.errors.DataError` that names the file and says what is wrong with it in a few words, so a
bundle run (``--resume true``), ``medvol embed --checkpoint`` and ``load_pretrained`` all report it on one line.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

from medvol.errors import DataError

__all__ = ["read_checkpoint"]

_ZIP_MAGIC = b"PK\x03\x04"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_OPERAND = re.compile(r"Unsupported operand (\d+)")


def _problem(err: BaseException, head: bytes) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, EOFError):
        return "truncated torch checkpoint (unexpected end of file)"
    found = _GLOBAL.search(text)
    if "PytorchStreamReader" in text or "zip archive" in text or "central directory" in text:
        detail = text.split(":", 1)[-1].split(".")[0].strip() if ":" in text else text[:80]
        return f"truncated or corrupt torch checkpoint (damaged zip archive: {detail})"
    if head.startswith(_ZIP_MAGIC) and not found and not isinstance(err, pickle.UnpicklingError):
        # a cut zip fails in many ways (miniz errors, OSError "Invalid argument" when seeking past the end)
        return f"truncated or corrupt torch checkpoint (damaged zip archive: {type(err).__name__}: {text[:80]})"
    if found:
        return (f"refused: the checkpoint holds Python objects, not only tensors (it would call {found.group(1)}); "
                "medvol loads checkpoints with weights_only=True")
    if not head.startswith(_ZIP_MAGIC) and not head[:1] == b"\x80":
        shown = head[:16].decode("ascii", "replace").encode("unicode_escape").decode()
        return f"not a torch checkpoint (the file starts with '{shown}'; expected a file written by torch.save)"
    operand = _OPERAND.search(text)
    if isinstance(err, pickle.UnpicklingError) or operand:
        return ("refused: not a weights-only checkpoint (a pickle of other Python objects"
                f"{', unsupported operand ' + operand.group(1) if operand else ''}); medvol loads checkpoints with "
                "weights_only=True")
    return f"cannot be read as a torch checkpoint ({type(err).__name__}: {text[:120]})"


def read_checkpoint(path: str | os.PathLike, map_location="cpu", mapping: bool = True):
    """``torch.load(path, map_location, weights_only=True)`` with a one-line :class:`DataError` on failure.

    Args:
        path: the checkpoint file.
        map_location: as for ``torch.load``.
        mapping: require a dict-like checkpoint (a state dict or ``{name: state_dict}``).

    Raises:
        DataError: ``"PATH: problem"`` for a missing file, a folder, an empty, truncated or corrupt file, a file
            that is not a torch checkpoint (e.g. text), a pickle of Python objects (refused by
            ``weights_only=True``), or, with ``mapping``, a checkpoint that is not a dict.

    Example:
        >>> state = read_checkpoint("runs/caid/checkpoints/last.pt")  # doctest: +SKIP
    """
    import torch

    path = Path(path)
    if path.is_dir():
        raise DataError(path, "is a folder, not a checkpoint file")
    if not path.is_file():
        raise DataError(path, "checkpoint file not found")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise DataError(path, f"cannot be read ({e.strerror or e})") from e
    if not head:
        raise DataError(path, "empty file (0 bytes), not a checkpoint")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ..." precedes the real error
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and weights-only errors all mean "not usable"
        raise DataError(path, _problem(e, head)) from e
    if mapping and not hasattr(state, "keys"):
        raise DataError(path, f"expected a state dict (a dict of tensors), got {type(state).__name__}")
    return state
