"""Radiology reports for image-report alignment (LoVT, ConVIRT, CLIP): sections, sentences, (image, report) datalists.

Report preprocessing, in the order :func:`report_sentences` applies it:

1. :func:`extract_sections` splits a report at headings such as ``FINDINGS:``, ``IMPRESSION:``, ``Imaging
   Notes:``, ``Presentation:`` (a heading is a known section name followed by a colon, at the start of the text,
   of a line or of a sentence, or in capitals anywhere). Text before the first heading is the ``"preamble"``.
2. The wanted sections are kept (default: findings, then impression, where the report has them; a report with
   none of them keeps its whole text, as teaching-case notes without headings do).
3. :func:`split_sentences` cuts the text at sentence ends (``.``, ``?``, ``!``, ``;`` and line breaks) without
   cutting decimals (``2.5 cm``), common abbreviations (``e.g.``, ``Dr.``, ``vs.``) or list numbers
   (``1. Stable``); list numbers are dropped.
4. :func:`clean_sentence` normalises whitespace and punctuation runs and removes the IU X-ray de-identification
   token ``XXXX``; sentences with fewer than ``min_chars`` letters are dropped.

Datalists: :func:`image_report_datalist` reads a CSV or JSON file of (``image``, ``report``) rows (optional
``subject`` for grouping, e.g. patient folds) or pairs every image in a folder with the report file beside it
(``case.png`` + ``case.txt``). Each item has ``image`` (a path), ``report`` (the preprocessed sentences, one
per line), ``report_text`` (raw), ``sentences``, ``subject`` and ``group``. A missing image or an empty report
is a :class:`~medvol.errors.DataError` naming the file and row.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from medvol.errors import DataError

__all__ = [
    "SECTION_NAMES",
    "extract_sections",
    "split_sentences",
    "clean_sentence",
    "report_sentences",
    "join_sentences",
    "image_report_datalist",
    "REPORT_SUFFIXES",
    "IMAGE_SUFFIXES_2D",
    "SENTENCE_SEPARATOR",
]

#: canonical section name -> headings that open it (lower case, without the colon)
SECTION_NAMES: dict[str, tuple[str, ...]] = {
    "findings": ("findings", "finding", "imaging notes", "imaging findings", "chest x-ray", "chest radiograph",
                 "x-ray", "radiograph"),
    "impression": ("impression", "impressions", "conclusion", "conclusions", "opinion"),
    "indication": ("indication", "indications", "clinical indication", "reason for exam", "clinical history"),
    "history": ("history", "presentation", "clinical presentation", "patient history"),
    "comparison": ("comparison", "comparisons"),
    "technique": ("technique", "examination", "exam"),
    "discussion": ("discussion", "case discussion", "notes"),
}
_HEADING_TO_SECTION = {h: s for s, heads in SECTION_NAMES.items() for h in heads}
# longest headings first, so "imaging findings" wins over "findings"
_HEADING_RE = re.compile(
    r"(?:^|(?<=[\n.;!?]))\s*(" + "|".join(re.escape(h) for h in sorted(_HEADING_TO_SECTION, key=len,
                                                                            reverse=True)) + r")\s*:",
    re.IGNORECASE,
)
# an upper-case heading in the middle of a sentence ("... unremarkable IMPRESSION: Negative"): a section start too
_UPPER_HEADING_RE = re.compile(r"\s+(?=(?:" + "|".join(re.escape(h.upper()) for h in sorted(
    _HEADING_TO_SECTION, key=len, reverse=True)) + r")\s*:)")
#: what separates sentences when a report travels through a batch as one string
SENTENCE_SEPARATOR = "\n"
REPORT_SUFFIXES = (".txt",)
IMAGE_SUFFIXES_2D = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_ABBREVIATIONS = {"e.g", "i.e", "dr", "mr", "mrs", "ms", "vs", "approx", "no", "fig", "figs", "cf", "etc", "al",
                  "st", "pt", "pts", "wk", "wks", "yr", "yrs", "hr", "hrs", "min", "max", "ca", "resp", "ref"}
_LIST_NUMBER = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|[-*\u2022])\s+")
_DEID = re.compile(r"-?X{3,}")


def extract_sections(text: str) -> dict[str, str]:
    """Split ``text`` at section headings into ``{section: text}`` (canonical names of :data:`SECTION_NAMES`).

    Text before the first heading is ``"preamble"``; a section that occurs twice is concatenated.

    Example:
        >>> extract_sections("FINDINGS: Heart normal. IMPRESSION: No acute disease.")
        {'findings': 'Heart normal.', 'impression': 'No acute disease.'}
    """
    text = _UPPER_HEADING_RE.sub("\n", str(text or ""))
    sections: dict[str, str] = {}
    matches = list(_HEADING_RE.finditer(text))
    starts = [m.start(1) for m in matches] + [len(text)]
    pre = text[: starts[0]].strip() if matches else text.strip()
    if pre:
        sections["preamble"] = pre
    for m, end in zip(matches, starts[1:]):
        name = _HEADING_TO_SECTION[m.group(1).lower()]
        body = text[m.end():end].strip()
        if body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body
    return sections


def _is_sentence_end(text: str, i: int) -> bool:
    """Whether the punctuation at ``text[i]`` ends a sentence."""
    ch = text[i]
    if ch in "?!;\n":
        return True
    # a period: not inside a number (2.5), not after an abbreviation or a single letter (e.g., R.), and followed
    # by whitespace or the end
    nxt = text[i + 1] if i + 1 < len(text) else " "
    if re.search(r"[a-z]{3}$", text[:i]) and nxt.isupper() and text[i + 2: i + 3].islower():
        return True  # "apex.There are": a missing space after the period
    if not nxt.isspace() and nxt not in "\"')]":
        return False
    word = re.search(r"([A-Za-z.]+)$", text[:i])
    if word:
        w = word.group(1).lower().rstrip(".")
        if w in _ABBREVIATIONS or (len(w) == 1 and w.isalpha() and text[i - 1].isupper()):
            return False
    before = text[:i].rstrip()
    if re.search(r"(?:^|[\n.;:!?])\s*\d{1,2}$", before):  # "1." of a numbered list
        return False
    return True


def split_sentences(text: str) -> list[str]:
    """Cut ``text`` into sentences (see the module docstring); list numbers are removed, empty pieces dropped.

    Example:
        >>> split_sentences("1. No acute process. 2. Stable 2.5 cm nodule, e.g. granuloma.")
        ['No acute process.', 'Stable 2.5 cm nodule, e.g. granuloma.']
    """
    text = str(text or "").replace("\r\n", "\n").replace("\r", "\n")
    out, start = [], 0
    for i, ch in enumerate(text):
        if ch in ".?!;\n" and _is_sentence_end(text, i):
            out.append(text[start: i + 1])
            start = i + 1
    out.append(text[start:])
    sentences = []
    for piece in out:
        piece = _LIST_NUMBER.sub("", piece.strip()).strip()
        if piece.rstrip(";").strip():
            sentences.append(piece.rstrip(";").strip() if piece.endswith(";") else piece)
    return sentences


def clean_sentence(sentence: str) -> str:
    """Whitespace collapsed, ``XXXX`` de-identification tokens removed, repeated punctuation reduced.

    Example:
        >>> clean_sentence("There are XXXX  sternotomy XXXX identified..")
        'There are sternotomy identified.'
    """
    s = _DEID.sub(" ", str(sentence))
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s+([,.;:!?])", r"\1", s)
    s = re.sub(r"([.,;:!?])(?:\s*\1)+", r"\1", s)  # ".." -> ".", ". ." -> "."
    s = re.sub(r"^[,.;:!?\s]+", "", s)
    return s.strip()


def report_sentences(text: str, sections: Sequence[str] | None = ("findings", "impression"),
                     min_chars: int = 3, max_sentences: int | None = None) -> list[str]:
    """The preprocessed sentences of one report (sections, splitting, cleaning; see the module docstring).

    Args:
        text: the raw report.
        sections: sections to keep, in this order; when the report has none of them (or ``sections`` is None)
            the whole text is used, headings removed.
        min_chars: drop sentences with fewer letters than this (``"."``, ``"2."``).
        max_sentences: keep at most this many (the first ones).

    Example:
        >>> report_sentences("INDICATION: cough. FINDINGS: The heart is normal. No effusion. IMPRESSION: Normal.")
        ['The heart is normal.', 'No effusion.', 'Normal.']
    """
    parts = extract_sections(text)
    chosen = [parts[s] for s in (sections or ()) if s in parts]
    if not chosen:
        chosen = list(parts.values())
    sentences = []
    for part in chosen:
        for s in split_sentences(part):
            s = clean_sentence(s)
            if sum(c.isalpha() for c in s) >= min_chars:
                sentences.append(s)
    return sentences[:max_sentences] if max_sentences else sentences


def join_sentences(sentences: Sequence[str]) -> str:
    """Sentences as one string (:data:`SENTENCE_SEPARATOR` between them): how a report travels in a batch."""
    return SENTENCE_SEPARATOR.join(s.replace(SENTENCE_SEPARATOR, " ") for s in sentences)


def _rows_from_table(path: Path) -> list[dict]:
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"training": [...]} or {"pairs": [...]}
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(path, "a JSON datalist must be a list of rows or a dict with one list")
                data = lists[0]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(path, "a JSON datalist must be a list of {image, report, ...} objects")
            return [dict(r) for r in data]
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(path, f"cannot be read as a {path.suffix.lstrip('.').upper()} table ({e})") from e


def image_report_datalist(source: str | os.PathLike, image_key: str = "image", report_key: str = "report",
                          subject_key: str | None = "subject", base_dir: str | os.PathLike | None = None,
                          sections: Sequence[str] | None = ("findings", "impression"), min_sentences: int = 1,
                          max_sentences: int | None = None, keep_columns: bool = True) -> list[dict]:
    """(image, report) items from a CSV/JSON table or from report files beside the images.

    Args:
        source: a ``.csv`` / ``.json`` table with columns ``image_key`` and ``report_key`` (``report_key`` may
            also be a list of columns, joined with section headings, e.g. ``["findings", "impression"]``), or a
            folder: every 2D image (:data:`IMAGE_SUFFIXES_2D`) or volume with a ``.txt`` report of the same
            stem beside it is one pair (images without a report are skipped and counted in the error when
            nothing is paired).
        image_key, report_key, subject_key: column names; without a subject column the subject is the image
            path (every image its own group).
        base_dir: folder that relative image paths are resolved against (default: the table's folder).
        sections, max_sentences: passed to :func:`report_sentences`.
        min_sentences: a row with fewer preprocessed sentences is an error.
        keep_columns: keep the table's other columns in each item (``finding``, ``view``, ... for evaluation).

    Returns:
        Items ``{"image": str, "report": the preprocessed sentences joined by newlines (what a batch carries),
        "report_text": the raw text, "sentences": [...], "subject": str, "group": int, ...}``; ``group`` numbers
        the distinct reports (images sharing one report text share it: they are not each other's negatives).

    Raises:
        DataError: a missing table/folder, missing columns, a missing image file, or a report with fewer than
            ``min_sentences`` sentences (the message names the file and row).
    """
    source = Path(source)
    if not source.exists():
        raise DataError(source, "image-report datalist not found")
    items = []
    if source.is_dir():
        from medvol.io.readers import is_volume_path

        pairs = []
        for img in sorted(p for p in source.rglob("*") if p.is_file()):
            if img.suffix.lower() in REPORT_SUFFIXES:
                continue
            if img.suffix.lower() not in IMAGE_SUFFIXES_2D and not is_volume_path(img):
                continue
            name = img.name
            for suf in (".nii.gz", img.suffix):
                if name.lower().endswith(suf.lower()):
                    name = name[: -len(suf)]
                    break
            report = img.with_name(name + ".txt")
            if report.is_file():
                pairs.append((img, report))
        if not pairs:
            raise DataError(source, "no image with a report beside it (case.png + case.txt) in this folder")
        for img, report in pairs:
            rows = {"image": str(img), "report": report.read_text(encoding="utf-8"), "subject": str(img),
                    "_where": str(report)}
            items.append(rows)
    else:
        rows = _rows_from_table(source)
        base = Path(base_dir) if base_dir is not None else source.parent
        report_keys = [report_key] if isinstance(report_key, str) else list(report_key)
        if rows:
            missing = [k for k in [image_key, *report_keys] if k not in rows[0]]
            if missing:
                raise DataError(source, f"missing column(s) {missing}; found {sorted(rows[0])}")
        for i, row in enumerate(rows):
            where = f"{source} row {i + 1}"
            path = Path(str(row[image_key]))
            path = path if path.is_absolute() else base / path
            if not path.exists():
                raise DataError(where, f"image file not found: {path}")
            if len(report_keys) == 1:
                text = str(row.get(report_keys[0]) or "")
            else:  # e.g. IU X-ray findings + impression columns: put the headings back
                text = " ".join(f"{k.upper()}: {row[k]}" for k in report_keys if str(row.get(k) or "").strip())
            item = {k: ("" if v is None else str(v)) for k, v in row.items()} if keep_columns else {}
            subject = row.get(subject_key) if subject_key else None
            item.update({"image": str(path), "report": text,
                         "subject": str(subject) if subject not in (None, "") else str(path), "_where": where})
            items.append(item)
    groups: dict[tuple, int] = {}
    for item in items:
        where = item.pop("_where")
        item["report_text"] = item["report"]
        item["sentences"] = report_sentences(item["report"], sections=sections, max_sentences=max_sentences)
        if len(item["sentences"]) < min_sentences:
            raise DataError(where, f"report has {len(item['sentences'])} usable sentence(s), "
                                   f"need at least {min_sentences}")
        item["report"] = join_sentences(item["sentences"])
        item["group"] = groups.setdefault(tuple(item["sentences"]), len(groups))
    return items
