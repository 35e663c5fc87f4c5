"""Batch manifests: one CSV row per input with its status, outputs, error and timing, written atomically.

The manifest is rewritten (atomically) as results come in, so a killed run leaves a valid manifest of what
finished; a resumed run reads the previous rows to carry over what it skips.

Every output is recorded with its size and SHA-256 (columns ``<output column>_bytes`` and
``<output column>_sha256``, e.g. ``output_bytes``, ``output_sha256``): :func:`check_outputs` compares an existing
output with them, so a resumed run never trusts a file that was truncated or replaced since it was written.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path

from medvol.io.atomic import atomic_write_text
from medvol.io.bags import file_sha256

__all__ = ["MANIFEST_COLUMNS", "STATUSES", "Manifest", "read_manifest", "output_checksums", "check_outputs"]

MANIFEST_COLUMNS = ("source", "status", "output", "error", "shape", "spacing", "seconds")
STATUSES = ("ok", "failed", "skipped")


class Manifest:
    """Rows keyed by ``source``, written to ``path`` as CSV in input order.

    Args:
        path: CSV destination.
        columns: column order; the standard columns come first, extra ones (e.g. ``label_output``) after.
        order: the sources in the order rows should appear (inputs not yet processed are left out).
    """

    def __init__(self, path: str | os.PathLike, columns: Iterable[str] = MANIFEST_COLUMNS,
                 order: Iterable[str] | None = None):
        self.path = Path(path)
        self.columns = list(dict.fromkeys([*MANIFEST_COLUMNS, *columns]))
        self.rows: dict[str, dict] = {}
        self._order = {s: i for i, s in enumerate(order or [])}

    def add(self, row: dict) -> None:
        """Add or replace the row of ``row["source"]``; ``status`` must be one of ok/failed/skipped."""
        if row.get("status") not in STATUSES:
            raise ValueError(f"manifest status must be one of {STATUSES}, got {row.get('status')!r}")
        for key in row:
            if key not in self.columns:
                self.columns.append(key)
        self.rows[str(row["source"])] = {k: _cell(v) for k, v in row.items()}

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for row in self.rows.values():
            out[row["status"]] += 1
        return out

    def sorted_rows(self) -> list[dict]:
        last = len(self._order)
        return sorted(self.rows.values(), key=lambda r: (self._order.get(r["source"], last), r["source"]))

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.sorted_rows():
            writer.writerow({c: row.get(c, "") for c in self.columns})
        return buf.getvalue()

    def write(self) -> Path:
        return atomic_write_text(self.path, self.to_csv())


def read_manifest(path: str | os.PathLike) -> dict[str, dict]:
    """Rows of an existing manifest keyed by source (empty when the file does not exist or is unreadable)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with open(path, newline="") as f:
            return {row["source"]: row for row in csv.DictReader(f) if row.get("source")}
    except (OSError, csv.Error, KeyError, UnicodeDecodeError):
        return {}


def output_checksums(outputs: dict[str, str | os.PathLike]) -> dict[str, str | int]:
    """``{column_bytes: size, column_sha256: hex digest}`` of every output file (manifest fields)."""
    fields: dict[str, str | int] = {}
    for column, path in outputs.items():
        fields[f"{column}_bytes"] = Path(path).stat().st_size
        fields[f"{column}_sha256"] = file_sha256(path)
    return fields


def check_outputs(outputs: dict[str, str | os.PathLike], row: dict | None) -> str | None:
    """Why the existing ``outputs`` do not match what manifest ``row`` recorded, or None when they all match.

    Returns ``"unrecorded"`` when the row has no size/hash for some output (a manifest of an older medvol, or
    a run killed between writing an output and the manifest): the caller then has to check the file itself.
    """
    if not row or row.get("status") not in ("ok", "skipped"):
        return "unrecorded"
    for column, path in outputs.items():
        size, digest = row.get(f"{column}_bytes"), row.get(f"{column}_sha256")
        if not size or not digest:
            return "unrecorded"
        actual = Path(path).stat().st_size
        if str(actual) != str(size):
            return f"{path}: {actual} bytes, the manifest recorded {size}"
        if file_sha256(path) != digest:
            return f"{path}: content differs from the manifest's sha256"
    return None


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return "x".join(_cell(v) if not isinstance(v, float) else f"{v:.4g}" for v in value)
    return " ".join(str(value).split())  # one line per cell
