"""``medvol.evaluation.probe`` and ``medvol probe``: cross-validated k-NN / linear probes of frozen embeddings, with
the hyperparameters chosen inside the folds and subjects never split between train and test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_DIR

from medvol.apps.cli import main
from medvol.apps.probe import auto_task
from medvol.errors import ConfigError
from medvol.evaluation import probe, voxel_features
from medvol.mil.targets import TargetSpec, TargetTable


def _table(y, task="binary", groups=None, classes=()):
    y = np.asarray(y, dtype=np.float64).reshape(len(y), 1)
    return TargetTable([f"c{i:03d}" for i in range(len(y))], y, TargetSpec(task, ("t",), classes=tuple(classes)),
                       groups)


def test_separable_classes_score_high_and_noise_scores_chance():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    signal = probe(rng.normal(size=(60, 16)) + 1.5 * y[:, None], _table(y), num_folds=5, inner_folds=3)
    noise = probe(rng.normal(size=(60, 16)), _table(y), num_folds=5, inner_folds=3)
    for name in ("knn", "linear"):
        assert signal[name]["mean"]["auroc"] > 0.9, name
        assert abs(noise[name]["pooled"]["auroc"] - 0.5) < 0.2, name
        assert len(signal[name]["folds"]) == 5 and sum(f["n_test"] for f in signal[name]["folds"]) == 60


def test_regression_beats_the_mean_predictor_and_multiclass_runs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 6))
    age = 50 + 10 * x[:, 0] + rng.normal(scale=1.0, size=80)
    result = probe(x, _table(age, "regression"), probes=("linear",), num_folds=4)
    assert result["linear"]["pooled"]["mae"] < 0.5 * np.mean(np.abs(age - age.mean()))
    assert result["linear"]["folds"][0]["chosen"]["alpha"] in result["linear"]["params"]["alpha"]
    cls = np.repeat([0, 1, 2], 20)
    multi = probe(rng.normal(size=(60, 4)) + 3 * np.eye(4)[cls],  # one class centre per axis
                  _table(cls, "multiclass", classes=("a", "b", "c")), probes=("knn",), num_folds=3)
    assert multi["knn"]["mean"]["auroc"] > 0.8


def test_subjects_never_straddle_folds():
    """Two identical volumes per subject and one random label per subject: grouped folds give chance, ungrouped
    folds let 1-NN find the twin in the training part (the leak the grouping prevents)."""
    rng = np.random.default_rng(2)
    subjects = rng.normal(size=(40, 8))
    labels = rng.integers(0, 2, 40)
    x, y, groups = np.repeat(subjects, 2, axis=0), np.repeat(labels, 2), [f"s{i}" for i in np.repeat(range(40), 2)]
    leaky = probe(x, _table(y), probes=("knn",), num_folds=5)
    grouped = probe(x, _table(y, groups=groups), probes=("knn",), num_folds=5)
    assert leaky["knn"]["pooled"]["auroc"] > 0.9
    assert grouped["knn"]["pooled"]["auroc"] < 0.75 and grouped["info"]["grouped"]


def test_hyperparameters_are_chosen_without_the_test_cases(monkeypatch):
    from sklearn.model_selection import GridSearchCV

    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 5))
    seen = []
    fit = GridSearchCV.fit

    def spy(self, X, y=None, **kw):
        seen.append({tuple(r) for r in np.round(X, 12)})
        return fit(self, X, y, **kw)

    monkeypatch.setattr(GridSearchCV, "fit", spy)
    result = probe(x, _table(np.tile([0, 1], 15)), probes=("linear",), num_folds=3)
    assert len(seen) == 3
    rows = [tuple(r) for r in np.round(x, 12)]
    n_test = [f["n_test"] for f in result["linear"]["folds"]]
    for fitted, nt in zip(seen, n_test):
        assert len(fitted) == 30 - nt  # the grid search saw exactly the outer training part
    assert set().union(*seen) == set(rows) and all(len(s & t) < len(s) for s, t in zip(seen, seen[1:]))


def test_pca_sizes_are_chosen_inside_and_must_fit():
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 20)
    result = probe(rng.normal(size=(40, 50)) + y[:, None], _table(y), probes=("linear",), num_folds=4,
                   pca_components=(4, 8, 1000))
    assert result["linear"]["params"]["n_components"] == [4, 8]  # 1000 is more than any training part holds
    with pytest.raises(ConfigError, match="pca_components"):
        probe(rng.normal(size=(40, 50)), _table(y), probes=("linear",), num_folds=4, pca_components=(500,))


def test_bad_arguments_are_clear_errors():
    x = np.zeros((10, 3))
    with pytest.raises(ConfigError, match="do not match the 12 cases"):
        probe(x, _table(np.tile([0, 1], 6)))
    with pytest.raises(ConfigError, match="subset of"):
        probe(x, _table(np.tile([0, 1], 5)), probes=("svm",))
    with pytest.raises(ConfigError, match="one column"):
        probe(x, TargetTable([str(i) for i in range(10)], np.zeros((10, 2)), TargetSpec("multilabel", ("a", "b"))))


def test_auto_task(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("id,sex,age,site\n" + "".join(f"c{i},{'MF'[i % 2]},{20 + i * 1.5},{'ABC'[i % 3]}\n"
                                                  for i in range(12)) + "c99,,,\n", encoding="utf-8")
    assert [auto_task(csv, c) for c in ("sex", "age", "site")] == ["binary", "regression", "multiclass"]


def test_voxel_features_of_demo_volumes():
    ids, x, failures = voxel_features(DEMO_DIR / "hippocampus" / "imagesTr", size=8)
    assert x.shape == (len(ids), 512) and failures == {} and ids[0] == "hippocampus_004"
    np.testing.assert_allclose(x.mean(axis=1), 0, atol=1e-5)
    assert len({tuple(r[:8]) for r in x}) == len(ids)  # real, different volumes


def _embedding_folder(tmp_path: Path, n: int = 40) -> tuple[Path, Path]:
    rng = np.random.default_rng(5)
    folder, y = tmp_path / "emb", np.tile([0, 1], n // 2)
    folder.mkdir()
    for i in range(n):
        np.save(folder / f"case{i:03d}.npy", (rng.normal(size=12) + 2 * y[i]).astype(np.float32))
    rows = ["id,label,subject"] + [f"case{i:03d},{'yes' if y[i] else 'no'},s{i // 2}" for i in range(n)]
    (tmp_path / "targets.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder, tmp_path / "targets.csv"


def test_cli_writes_json_and_table_and_reports_bad_files(tmp_path, capsys):
    folder, targets = _embedding_folder(tmp_path)
    np.save(folder / "case900.npy", np.full(12, np.nan, dtype=np.float32))  # a broken embedding
    out = tmp_path / "out"
    rc = main(["probe", str(folder), str(out), "--targets", str(targets), "--target", "label", "--group-column",
               "subject", "--folds", "4"])
    captured = capsys.readouterr()
    assert rc == 1 and "case900.npy: 12 non-finite values" in captured.err  # the others are still probed
    result = json.loads((out / "probe.json").read_text(encoding="utf-8"))
    assert result["info"]["matched"] == 40 and result["info"]["task"] == "binary" and result["info"]["grouped"]
    assert result["linear"]["mean"]["auroc"] > 0.9 and "| linear |" in (out / "probe.md").read_text(encoding="utf-8")
    assert "| knn |" in captured.out


def test_cli_id_mismatch_is_a_usage_error(tmp_path, capsys):
    folder, _ = _embedding_folder(tmp_path)
    other = tmp_path / "other.csv"
    other.write_text("id,label\n" + "".join(f"IXI{i:03d},{i % 2}\n" for i in range(40)), encoding="utf-8")
    rc = main(["probe", str(folder), str(tmp_path / "o"), "--targets", str(other), "--target", "label"])
    err = capsys.readouterr().err
    assert rc == 2 and "no case id matches the targets' 'id' column (features e.g. ['case000'" in err


@pytest.mark.slow
def test_cli_voxel_baseline_on_ixi_sex(tmp_path, capsys):
    """The PCA-of-voxels baseline on real IXI T1 (40 volumes): sex is visible in head size and shape."""
    if not os.environ.get("MEDVOL_DATA"):
        pytest.skip("MEDVOL_DATA is not set: this test reads IXI T1 volumes")
    ixi = Path(os.environ["MEDVOL_DATA"]) / "ixi_t1"
    images = tmp_path / "t1"
    images.mkdir()
    for p in sorted((ixi / "t1").glob("*.nii.gz"))[:40]:
        (images / p.name).symlink_to(p)
    rc = main(["probe", str(images), str(tmp_path / "o"), "--voxels", "--size", "8", "--targets",
               str(ixi / "participants.csv"), "--target", "Sex", "--id-column", "MRID", "--id-regex",
               r"^(IXI\d+-\w+-\d+)", "--folds", "4", "--probes", "linear", "--pca", "4", "8"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "o" / "probe.json").read_text(encoding="utf-8"))
    assert result["info"]["matched"] >= 38 and result["linear"]["pooled"]["auroc"] > 0.6
