"""Report preprocessing (sections, sentences, cleaning) on real reports, and (image, report) datalists.

The IU X-ray reports are CC BY-NC-ND: they are read from $MEDVOL_DATA, never copied into the project.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import pytest

from medvol.errors import DataError
from medvol.io.reports import (
    extract_sections,
    image_report_datalist,
    join_sentences,
    report_sentences,
    split_sentences,
)

DATA = Path(os.environ["MEDVOL_DATA"]) / "image_reports" if os.environ.get("MEDVOL_DATA") else None


def _needs(sub: str) -> Path:
    if DATA is None:
        pytest.skip("MEDVOL_DATA is not set: the real report tests read the shared data folder")
    path = DATA / sub
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


def test_sections_and_sentences_on_written_examples():
    text = "INDICATION: Cough. FINDINGS: Heart size normal.Lungs clear; no effusion. IMPRESSION: 1. No acute " \
           "process. 2. Stable 2.5 cm nodule, e.g. granuloma."
    assert set(extract_sections(text)) == {"indication", "findings", "impression"}
    assert report_sentences(text) == ["Heart size normal.", "Lungs clear", "no effusion.", "No acute process.",
                                      "Stable 2.5 cm nodule, e.g. granuloma."]
    assert report_sentences("Imaging Notes: Bilateral opacities.  Discussion: Typical.") == ["Bilateral opacities."]
    assert report_sentences("No headings here. Just text.") == ["No headings here.", "Just text."]
    assert report_sentences("There are XXXX sternotomy XXXX identified.") == ["There are sternotomy identified."]
    assert split_sentences("Dr. Smith saw it.") == ["Dr. Smith saw it."]


def test_iu_xray_reports_split_like_the_source_statistics():
    path = _needs("iu_xray_reports_text") / "indiana_reports.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3851
    counts = [len(split_sentences(r["findings"])) for r in rows if r["findings"].strip()]
    assert len(counts) == 3337
    # SOURCE.md: findings median 4 sentences, mean 4.6, max 18
    assert statistics.median(counts) == 4 and 4.3 < statistics.mean(counts) < 4.9 and max(counts) <= 20
    empty = 0
    for r in rows:
        text = " ".join(f"{k.upper()}: {r[k]}" for k in ("findings", "impression") if r[k].strip())
        sentences = report_sentences(text)
        empty += not sentences
        assert all("XXXX" not in s and "FINDINGS:" not in s and "IMPRESSION:" not in s for s in sentences)
        assert all(s == s.strip() and "  " not in s for s in sentences)
    assert empty <= 40  # only reports without findings and impression (31) or with a bare "XXXX" are empty


def test_covid_notes_datalist_groups_by_patient(tmp_path):
    root = _needs("covid_cxr_notes")
    items = image_report_datalist(root / "pairs.csv", report_key="clinical_notes", subject_key="patientid")
    assert len(items) == 292 and len({it["subject"] for it in items}) == 146
    assert all(Path(it["image"]).is_file() and it["sentences"] for it in items)
    assert all("\n" not in s for it in items for s in it["sentences"])
    assert items[0]["finding"] == "ARDS"  # other columns kept for evaluation
    assert join_sentences(items[0]["sentences"]).split("\n") == items[0]["sentences"]
    assert items[0]["report"] == join_sentences(items[0]["sentences"]) and items[0]["report_text"].startswith("Severe")
    same = [it["group"] for it in items if it["report_text"] == items[1]["report_text"]]
    assert len(same) > 1 and len(set(same)) == 1  # one note shared by several images: one group


def test_iu_pairs_with_two_report_columns():
    root = _needs("iu_xray_pairs")
    items = image_report_datalist(root / "pairs.csv", report_key=["findings", "impression"], subject_key="uid")
    assert len(items) == 9 and len({it["subject"] for it in items}) == 6
    uid3 = [it for it in items if it["subject"] == "3"][0]
    assert uid3["sentences"] and uid3["report_text"].startswith("IMPRESSION:")  # uid 3: impression only


def test_folder_and_json_sources_and_errors(tmp_path):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("FINDINGS: Clear lungs.", encoding="utf-8")
    Image.new("L", (8, 8)).save(tmp_path / "b.png")  # no report: skipped
    items = image_report_datalist(tmp_path)
    assert [Path(it["image"]).name for it in items] == ["a.png"] and items[0]["sentences"] == ["Clear lungs."]
    table = tmp_path / "list.json"
    table.write_text(json.dumps([{"image": "a.png", "report": "Normal.", "subject": "p1"}]), encoding="utf-8")
    assert image_report_datalist(table)[0]["subject"] == "p1"
    table.write_text(json.dumps([{"image": "missing.png", "report": "Normal."}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"list.json row 1: image file not found"):
        image_report_datalist(table)
    table.write_text(json.dumps([{"image": "a.png", "report": " . "}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1: report has 0 usable sentence"):
        image_report_datalist(table)
    table.write_text(json.dumps([{"img": "a.png"}]), encoding="utf-8")
    with pytest.raises(DataError, match="missing column"):
        image_report_datalist(table)
