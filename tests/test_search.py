"""Similar-case search: ``medvol index`` (exact / IVF / IVF-PQ by size, id map, append, resume, bad files in the
manifest) and ``medvol search`` (embedding-file, scan and text queries, the results page, checked in a headless
chromium when one is installed)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import BUNDLES_DIR, copy_hippo
from monai.bundle import ConfigParser

from medvol.apps.cli import main
from medvol.io.bags import write_bag
from medvol.search import IndexOptions, SimilarityIndex, build_index, choose_kind, pool_rows, recall_at_k
from medvol.search.index import exact_search

pytestmark = pytest.mark.usefixtures("faiss_one_thread")

SHA = "ab" * 32
DIM = 16


def _clustered_bags(folder: Path, n: int, start: int = 0, seed: int = 0, n_clusters: int = 4,
                     sources: list[Path] | None = None) -> dict[str, int]:
    """``n`` bags of 5 slices whose pooled vectors fall in ``n_clusters`` well separated clusters: case -> cluster."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(n_clusters, DIM)) * 3
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(start, start + n):
        c = i % n_clusters
        source = str(sources[i % len(sources)]) if sources else f"/scans/case{i:03d}.nii.gz"
        write_bag(folder / f"case{i:03d}.h5", centres[c] + 0.2 * rng.normal(size=(5, DIM)), source=source,
                  checkpoint_sha256=SHA)
        truth[f"case{i:03d}"] = c
    return truth


def _manifest(index: Path) -> dict[str, dict]:
    with open(index / "manifest.csv", newline="", encoding="utf-8") as f:
        return {Path(r["source"]).name: r for r in csv.DictReader(f)}


def _meta(index: Path) -> dict:
    return json.loads((index / "index.json").read_text(encoding="utf-8"))


def _brute_force(folder: Path, query: np.ndarray, k: int) -> list[str]:
    names = sorted(p.stem for p in folder.glob("*.h5"))
    with_vecs = []
    for name in names:
        with h5py.File(folder / f"{name}.h5", "r") as f:
            v = f["feats"][()].mean(0)
        with_vecs.append(v / np.linalg.norm(v))
    q = query / np.linalg.norm(query)
    order = np.argsort(-(np.stack(with_vecs) @ q), kind="stable")
    return [names[i] for i in order[:k]]


def test_pooling_kind_choice_and_recall():
    assert pool_rows(np.array([[1.0, 4.0], [3.0, 0.0]]), "max").tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="pooling"):
        pool_rows(np.ones((2, 2)), "median")
    assert [choose_kind(n, 256, exact_max=100, ivf_bytes_max=1 << 20, sq_bytes_max=1 << 21)
            for n in (100, 101, 1025, 2049)] == ["flat", "ivf", "ivfsq", "ivfpq"]
    assert recall_at_k(np.array([[1, 2, -1]]), np.array([[2, 1, 5]]), 3) == pytest.approx(2 / 3)
    # exact search over chunks equals one flat search
    rng = np.random.default_rng(0)
    db, q = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(3, 8)).astype(np.float32)
    _, ids = exact_search(q, [db[:20], db[20:35], db[35:]], 5)
    want = np.argsort(((q[:, None] - db[None]) ** 2).sum(-1), axis=1)[:, :5]
    np.testing.assert_array_equal(ids, want)


def test_flat_index_id_map_and_embedding_query(tmp_path, capsys):
    truth = _clustered_bags(tmp_path / "bags", 12)
    index = tmp_path / "index"
    assert main(["index", str(tmp_path / "bags"), str(index)]) == 0
    meta = _meta(index)
    assert (meta["kind"], meta["n"], meta["dim"], meta["metric"], meta["text_encoder"]) == ("flat", 12, DIM, "cosine",
                                                                                             None)
    with open(index / "ids.csv", newline="", encoding="utf-8") as f:
        ids = list(csv.DictReader(f))
    assert [r["case_id"] for r in ids] == sorted(truth) and ids[3]["source"] == "/scans/case003.nii.gz"
    assert all(Path(r["file"]).is_file() for r in ids) and {r["checkpoint_sha256"] for r in ids} == {SHA}
    rows = _manifest(index)
    assert {r["status"] for r in rows.values()} == {"ok"} and rows["case005.h5"]["id"] == "5"
    capsys.readouterr()

    query = tmp_path / "bags" / "case005.h5"
    assert main(["search", str(index), str(query), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "the query itself (id 5) left out" in out
    lines = [ln.split() for ln in out.splitlines() if re.match(r"^\s+\d+\s+\d", ln)]
    found = [ln[3] for ln in lines]
    with h5py.File(query, "r") as f:
        expected = [c for c in _brute_force(tmp_path / "bags", f["feats"][()].mean(0), 4) if c != "case005"][:3]
    assert found == expected and [truth[c] for c in found[:2]] == [truth["case005"]] * 2  # its 2 cluster mates
    distances = [float(ln[1]) for ln in lines]
    assert distances == sorted(distances) and 0 <= distances[0] < 0.05
    assert main(["search", str(index), str(query), "-k", "2", "--keep-self"]) == 0
    assert "case005" in capsys.readouterr().out.splitlines()[2]  # rank 1 is the query itself (distance 0)


def test_ivf_and_ivfpq_chosen_by_size_and_calibrated(tmp_path):
    _clustered_bags(tmp_path / "bags", 64)
    flat = build_index(tmp_path / "bags", tmp_path / "flat", IndexOptions(exact_max=64), log=None)
    ivf = build_index(tmp_path / "bags", tmp_path / "ivf", IndexOptions(exact_max=63), log=None)
    sq = build_index(tmp_path / "bags", tmp_path / "sq", IndexOptions(exact_max=10, ivf_bytes_max=1000), log=None)
    pq = build_index(tmp_path / "bags", tmp_path / "pq", IndexOptions(exact_max=10, ivf_bytes_max=1000,
                                                                      sq_bytes_max=2000, pq_m=4), log=None)
    kinds = [r.meta["kind"] for r in (flat, ivf, sq, pq)]
    assert kinds == ["flat", "ivf", "ivfsq", "ivfpq"]  # 64 vectors x 16 dims x 4 bytes = 4096 bytes
    assert ivf.meta["nlist"] == 8 and pq.meta["pq_m"] == 4  # sqrt(64) lists
    cal = ivf.meta["calibration"]
    assert cal["recall_at_10"] >= 0.95 and cal["nprobe"] == ivf.meta["nprobe"] and cal["queries"] == 64
    assert cal["curve"][-1] == [cal["nprobe"], cal["recall_at_10"]]
    queries = np.random.default_rng(5).normal(size=(6, DIM)).astype(np.float32)
    exact = SimilarityIndex.open(tmp_path / "flat", device="cpu")
    approx = SimilarityIndex.open(tmp_path / "ivf", device="cpu")
    d_exact, i_exact = exact.search(queries, 5)
    d_all, i_all = approx.search(queries, 5, nprobe=8)  # every list: exact again
    np.testing.assert_array_equal(i_all, i_exact)
    np.testing.assert_allclose(d_all, d_exact, atol=1e-5)
    _, i_sq = SimilarityIndex.open(tmp_path / "sq", device="cpu").search(queries, 5, nprobe=8)
    assert recall_at_k(i_sq, i_exact, 5) >= 0.9  # 8-bit codes: almost exact
    _, i_pq = SimilarityIndex.open(tmp_path / "pq", device="cpu").search(queries, 5, nprobe=8)
    assert recall_at_k(i_pq, i_exact, 5) >= 0.6  # compressed distances: close, not exact


def test_append_keeps_ids_and_retrains_only_when_the_kind_changes(tmp_path, capsys):
    bags, index = tmp_path / "bags", tmp_path / "index"
    _clustered_bags(bags, 30)
    assert main(["index", str(bags), str(index), "--exact-max", "40"]) == 0
    first = _meta(index)
    assert first["kind"] == "flat" and first["n"] == 30
    assert main(["index", str(bags), str(index), "--exact-max", "40"]) == 0  # nothing new
    assert "nothing new" in capsys.readouterr().out and _meta(index) == first
    _clustered_bags(bags, 8, start=30, seed=1)
    assert main(["index", str(bags), str(index), "--exact-max", "40"]) == 0
    second = _meta(index)
    rows = _manifest(index)
    assert sum(r["status"] == "skipped" for r in rows.values()) == 30
    assert sum(r["status"] == "ok" for r in rows.values()) == 8
    assert (second["n"], second["kind"], second["retrained"], second["generation"]) == (38, "flat", False, 1)
    assert not (index / first["faiss_file"]).exists()  # the previous generation is gone
    with open(index / "ids.csv", newline="", encoding="utf-8") as f:
        ids = [r["case_id"] for r in csv.DictReader(f)]
    assert ids == [f"case{i:03d}" for i in range(38)]  # old rows keep their ids, new ones come after
    # past exact_max the index becomes IVF, trained on all 45 vectors; appending to it adds without retraining
    _clustered_bags(bags, 7, start=38, seed=2)
    assert main(["index", str(bags), str(index), "--exact-max", "40"]) == 0
    third = _meta(index)
    assert (third["n"], third["kind"], third["retrained"]) == (45, "ivf", True)
    _clustered_bags(tmp_path / "more", 3, start=45, seed=3)  # new scans in another folder
    assert main(["index", str(tmp_path / "more"), str(index), "--exact-max", "40"]) == 0
    fourth = _meta(index)
    assert (fourth["n"], fourth["kind"], fourth["retrained"], fourth["nlist"]) == (48, "ivf", False, third["nlist"])
    assert len(_manifest(index)) == 48  # rows of both folders
    searched = SimilarityIndex.open(index, device="cpu")
    assert searched.items[47]["case_id"] == "case047" and len(searched) == 48
    assert main(["index", str(bags), str(index), "--exact-max", "40", "--rebuild"]) == 0
    assert _meta(index)["retrained"] is True and _meta(index)["n"] == 48


def test_resume_after_a_killed_run_loses_nothing_and_duplicates_nothing(tmp_path):
    bags = tmp_path / "bags"
    _clustered_bags(bags, 25)
    calls = []

    def kill_after_two_chunks(message):
        calls.append(message)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the process were killed after writing two chunks

    opts = IndexOptions(chunk_size=10)
    with pytest.raises(KeyboardInterrupt):
        build_index(bags, tmp_path / "index", opts, log=kill_after_two_chunks)
    assert not (tmp_path / "index" / "index.json").exists()  # nothing committed yet
    assert len(list((tmp_path / "index" / "chunks").glob("chunk-*.npz"))) == 2
    (tmp_path / "index" / "chunks" / ".chunk-000002.npz.999.tmp").write_bytes(b"half a chunk")  # a killed writer
    rows = _manifest(tmp_path / "index")
    assert sum(r["status"] == "ok" for r in rows.values()) == 20  # the manifest says what is done
    resumed = build_index(bags, tmp_path / "index", opts, log=None)
    assert resumed.counts == {"ok": 5, "failed": 0, "skipped": 20}
    assert not list((tmp_path / "index" / "chunks").glob(".*.tmp"))
    build_index(bags, tmp_path / "whole", opts, log=None)
    a = SimilarityIndex.open(tmp_path / "index", device="cpu")
    b = SimilarityIndex.open(tmp_path / "whole", device="cpu")
    assert [it["case_id"] for it in a.items] == [it["case_id"] for it in b.items] == sorted(f"case{i:03d}"
                                                                                             for i in range(25))
    q = np.random.default_rng(1).normal(size=(3, DIM))
    np.testing.assert_array_equal(a.search(q, 5)[1], b.search(q, 5)[1])


def test_bad_and_mismatched_files_fail_alone_in_the_manifest(tmp_path, capsys):
    bags = tmp_path / "bags"
    _clustered_bags(bags, 10)
    (bags / "text.h5").write_text("not hdf5", encoding="utf-8")
    (bags / "empty.npy").write_bytes(b"")
    with h5py.File(bags / "nan.h5", "w") as f:
        f.create_dataset("feats", data=np.full((3, DIM), np.nan, np.float32))
    write_bag(bags / "wrongdim.h5", np.ones((4, DIM + 1)), checkpoint_sha256=SHA)
    write_bag(bags / "otherckpt.h5", np.ones((4, DIM)), checkpoint_sha256="cd" * 32)
    np.save(bags / "zeros.npy", np.zeros(DIM, np.float32))
    np.save(bags / "volume.npy", np.ones(DIM, np.float32))  # a bundle's volume embedding: fine
    (bags / "notes.txt").write_text("ignored: not an embedding file", encoding="utf-8")
    index = tmp_path / "index"
    assert main(["index", str(bags), str(index)]) == 1
    rows = _manifest(index)
    expected = {"text.h5": "not a readable HDF5 bag", "empty.npy": "not a readable .npy", "nan.h5": "non-finite",
                "wrongdim.h5": f"dimension {DIM + 1} does not match the index's {DIM}",
                "otherckpt.h5": "different encoders are not comparable", "zeros.npy": "all-zero embedding"}
    for name, pattern in expected.items():
        assert rows[name]["status"] == "failed", rows[name]
        assert rows[name]["error"].startswith(str(bags / name)) and pattern in rows[name]["error"], rows[name]["error"]
    assert rows["volume.npy"]["status"] == "ok" and "notes.txt" not in rows
    assert _meta(index)["n"] == 11 and "11 added" in capsys.readouterr().out
    # a file changed after it was indexed is not silently trusted
    write_bag(bags / "case003.h5", np.ones((5, DIM)), checkpoint_sha256=SHA)
    assert main(["index", str(bags), str(index)]) == 1
    row = _manifest(index)["case003.h5"]
    assert row["status"] == "failed" and "changed since it was indexed" in row["error"]


def test_usage_errors_are_one_line_exit_2(tmp_path, demo_dir, capsys):
    _clustered_bags(tmp_path / "bags", 5)
    assert main(["index", str(tmp_path / "nope"), str(tmp_path / "i")]) == 2
    assert main(["index", str(tmp_path / "bags"), str(tmp_path / "i"), "--checkpoint", "x.pt"]) == 2
    assert "--checkpoint and --set need --bundle" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "bags"), "x"]) == 2
    assert "not a search index" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "bags"), str(tmp_path / "i")]) == 0
    assert main(["index", str(tmp_path / "bags"), str(tmp_path / "i"), "--metric", "l2"]) == 2
    assert "was built with metric 'cosine'" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "i"), "chest pain with pleural effusion"]) == 2
    assert "this index has no text encoder" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "i"), str(tmp_path / "missing.nii.gz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    np.save(tmp_path / "q.npy", np.ones(DIM + 3, np.float32))
    assert main(["search", str(tmp_path / "i"), str(tmp_path / "q.npy")]) == 2
    assert f"query has dimension {DIM + 3}, the index {DIM}" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "i"), str(tmp_path / "bags" / "case000.h5")]) == 0  # no embedder needed
    capsys.readouterr()
    assert main(["search", str(tmp_path / "i"), str(copy_hippo(demo_dir, tmp_path / "s", 1)[0])]) == 2
    assert "records no bundle" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- scan queries
BUNDLE = BUNDLES_DIR / "lecl_slice_embedding"
TINY = {"encoder_options": {"mambaout": {"dims": [8, 16], "depths": [1, 1]}}, "spatial_size": 32}
SET = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, demo_dir):
    """Four demo MRI volumes embedded by ``medvol embed`` with a tiny freshly initialised encoder, and indexed."""
    root = tmp_path_factory.mktemp("scan_search")
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "inference.json")])
    parser.update({"bundle_root": str(BUNDLE), **TINY})
    torch.manual_seed(0)
    ckpt = root / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    scans = copy_hippo(demo_dir, root / "scans", 4)
    assert main(["embed", str(root / "scans"), str(root / "bags"), "--bundle", str(BUNDLE), "--checkpoint", str(ckpt),
                 *SET]) == 0
    assert main(["index", str(root / "bags"), str(root / "index"), "--bundle", str(BUNDLE), "--checkpoint",
                 str(ckpt), *SET]) == 0
    return root, scans, ckpt


def _results(out: str) -> list[tuple[str, float]]:
    return [(ln.split()[3], float(ln.split()[1])) for ln in out.splitlines() if re.match(r"^\s+\d+\s+\d", ln)]


def test_scan_query_is_embedded_with_the_index_bundle(embedded, tmp_path, capsys):
    root, scans, ckpt = embedded
    meta = _meta(root / "index")
    assert meta["embedder"]["checkpoint"] == str(ckpt.resolve()) and meta["embedder"]["overrides"] == TINY
    capsys.readouterr()
    assert main(["search", str(root / "index"), str(scans[0]), "-k", "3"]) == 0
    by_scan = capsys.readouterr().out
    assert "query: scan hippocampus_004.nii.gz" in by_scan and "the query itself (id 0) left out" in by_scan
    assert main(["search", str(root / "index"), str(root / "bags" / "hippocampus_004.h5"), "-k", "3"]) == 0
    by_bag = capsys.readouterr().out
    scan_hits, bag_hits = _results(by_scan), _results(by_bag)
    assert len(scan_hits) == 3 and [c for c, _ in scan_hits] == [c for c, _ in bag_hits]  # same vector, same answer
    np.testing.assert_allclose([d for _, d in scan_hits], [d for _, d in bag_hits], atol=2e-4)
    # another checkpoint than the index's embeddings: refused
    other = tmp_path / "other.pt"
    state = torch.load(ckpt)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, other)
    assert main(["search", str(root / "index"), str(scans[0]), "--checkpoint", str(other)]) == 2
    assert "is not the one the index's embeddings were made with" in capsys.readouterr().err


def test_results_page_is_self_contained(embedded, tmp_path, capsys):
    root, scans, _ = embedded
    page = tmp_path / "page.html"
    assert main(["search", str(root / "index"), str(scans[1]), "-k", "2", "--html", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert text.count('<img class="view"') == 3 * 3  # query + 2 neighbours, 3 planes each
    assert text.count('data-plane="axial"') == 3 and text.count('class="case neighbour"') == 2
    assert not re.search(r"""(src|href)=["'](?!data:)""", text)  # everything inlined
    assert "query: scan hippocampus_006.nii.gz" in text and str(scans[0]) in text


# ---------------------------------------------------------------------------------------------- the browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args], capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_results_page_renders_in_headless_chromium(tmp_path, demo_dir, capsys):
    from PIL import Image

    from medvol.apps.search import NEIGHBOUR_COLOUR, QUERY_COLOUR

    # real volumes as the sources of synthetic embeddings: the page shows their slices, no model needed
    sources = copy_hippo(demo_dir, tmp_path / "scans", 5)  # one volume per case (a shared one counts as the query)
    _clustered_bags(tmp_path / "bags", 6, sources=sources, n_clusters=2)
    (tmp_path / "bags" / "case005.h5").unlink()
    write_bag(tmp_path / "bags" / "case005.h5", np.ones((3, DIM)), source=str(tmp_path / "gone.nii.gz"),
              checkpoint_sha256=SHA)  # its volume was moved away: a grey box instead of slices
    assert main(["index", str(tmp_path / "bags"), str(tmp_path / "index")]) == 0
    page = tmp_path / "page.html"
    assert main(["search", str(tmp_path / "index"), str(tmp_path / "bags" / "case000.h5"), "-k", "5", "--html",
                 str(page)]) == 0
    capsys.readouterr()
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    # every slice picture decoded in the browser (counted by the page's script after the load event)
    assert 'data-images-total="15"' in body and 'data-images-decoded="15"' in body, body
    assert dom.stdout.count('class="case neighbour"') == 5 and dom.stdout.count('class="missing"') == 1
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1000,2400", page.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    column = pixels[:, 20]  # left of the bar text: the pure bar colour

    def runs(colour: str) -> list[tuple[int, int]]:
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        hit = np.abs(column - rgb).sum(1) < 12
        edges = np.flatnonzero(np.diff(np.r_[0, hit.astype(int), 0]))
        return list(zip(edges[::2], edges[1::2]))

    red, blue = runs(QUERY_COLOUR), runs(NEIGHBOUR_COLOUR)
    assert len(red) == 1 and len(blue) == 5, (red, blue)  # the query's bar, then one per neighbour
    assert all(20 <= b - a <= 28 for a, b in red + blue)  # 24 CSS pixels high
    assert red[0][1] < blue[0][0]  # the query comes first
    # under each bar with slices: three pictures with real image content (not blank, not one flat colour)
    gaps = [red[0]] + blue
    textured = 0
    for (_, bar_end), (next_bar, _) in zip(gaps, gaps[1:] + [(pixels.shape[0], 0)]):
        # below the (up to 2-line) text of a grey "not shown" box, across the axial and coronal pictures
        region = pixels[bar_end + 50:min(next_bar - 8, bar_end + 120), 16:480].mean(-1)
        if region.size and np.abs(np.diff(region, axis=1)).mean() > 3:  # image texture, not flat boxes
            textured += 1
    assert textured == 5, textured  # the five cases with a volume; the moved one is a flat grey box
