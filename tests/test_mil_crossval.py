"""Slice-embedding MIL: bags, targets, losses, metrics, patient-level folds, training and the run's outputs.

Bags are built from real MRIs without a trained encoder: per slice, a fixed 16-bin intensity histogram plus the
slice mean and standard deviation (18 features), written in the ``medvol embed`` HDF5 format.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.metrics import mean_absolute_error, roc_auc_score
from torch.utils.data import DataLoader

from medvol.errors import ConfigError, DataError
from medvol.mil import (
    BagDataset,
    CrossValidator,
    MILPredictor,
    MILTaskLoss,
    TargetSpec,
    collate_bags,
    compute_metrics,
    load_targets,
    make_folds,
    pos_weight,
    read_bag,
    split_validation,
    train_fold,
    write_bag,
)
from medvol.networks.mil import ABMIL, build_mil_network

SMALL_NET = {"pooling": "abmil", "hidden_dim": 16, "attention_dim": 8}


def slice_features(volume: np.ndarray, axis: int = 2) -> np.ndarray:
    """(n_slices, 18): 16-bin histogram of the 1-99 percentile normalised slice, then its mean and std."""
    lo, hi = np.percentile(volume, [1, 99])
    v = np.moveaxis(np.clip((volume - lo) / max(hi - lo, 1e-6), 0, 1), axis, 0)
    return np.asarray([np.concatenate([np.histogram(s, bins=16, range=(0, 1))[0] / s.size, [s.mean(), s.std()]])
                       for s in v], dtype=np.float32)


def embed_volume(path: Path, out: Path, axis: int = 2) -> np.ndarray:
    img = nib.load(path)
    vol = np.asarray(img.dataobj, dtype=np.float32)
    write_bag(out, slice_features(vol, axis), np.arange(vol.shape[axis]), str(path), img.header.get_zooms()[:3],
              "0" * 64, axis)
    return vol


def make_hippocampus_bags(demo_dir: Path, root: Path) -> tuple[Path, Path]:
    """Bags of the 20 demo hippocampus MRIs and targets.csv: id, large (yes/no: labelled hippocampus volume
    above the median), volume_ml, patient (pairs of cases, for group tests)."""
    bag_dir = root / "bags"
    rows = []
    for i, path in enumerate(sorted((demo_dir / "hippocampus" / "imagesTr").glob("*.nii.gz"))):
        case = path.name[: -len(".nii.gz")]
        embed_volume(path, bag_dir / f"{case}.h5")
        label = nib.load(demo_dir / "hippocampus" / "labelsTr" / path.name)
        ml = float((np.asarray(label.dataobj) > 0).sum() * np.prod(label.header.get_zooms()[:3]) / 1000)
        rows.append([case, ml, f"p{i // 2}"])
    median = np.median([r[1] for r in rows])
    csv_path = root / "targets.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "large", "volume_ml", "patient"])
        w.writerows([[c, "yes" if ml > median else "no", ml, p] for c, ml, p in rows])
    return bag_dir, csv_path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def hippo(demo_dir, tmp_path_factory):
    return make_hippocampus_bags(demo_dir, tmp_path_factory.mktemp("hippo_mil"))


@pytest.fixture(scope="module")
def binary_run(hippo, tmp_path_factory):
    """A 4-fold binary run whose factory records every network it builds and its initial weights."""
    built = []

    def factory(**kwargs):
        net = build_mil_network(**SMALL_NET, **kwargs)
        built.append((net, copy.deepcopy(net.state_dict())))
        return net

    out = tmp_path_factory.mktemp("binary_run")
    # A module-scoped fixture runs before the autouse single-thread fixture: pin the thread count here, so the
    # determinism test below compares runs made at the same thread count (its exactness claim).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = CrossValidator(hippo[0], hippo[1], ["large"], "binary", out, network_def=factory, num_folds=4,
                                 max_epochs=3, patience=2, lr=1e-3, batch_size=4, plot_cases=2).run()
    finally:
        torch.set_num_threads(threads)
    return out, summary, built


# --------------------------------------------------------------------------------------------------- bags


def test_bag_roundtrip_and_corrupt_files(hippo, tmp_path):
    bag = read_bag(hippo[0] / "hippocampus_004.h5")
    assert bag.case_id == "hippocampus_004" and bag.feats.shape == (bag.n_slices, 18) and bag.dim == 18
    assert np.array_equal(bag.slice_index, np.arange(bag.n_slices)) and bag.axis == 2
    assert bag.source.endswith("hippocampus_004.nii.gz") and len(bag.spacing) == 3
    np.testing.assert_allclose(bag.feats[:, :16].sum(1), 1.0, atol=1e-5)  # histograms of every voxel

    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes((hippo[0] / "hippocampus_004.h5").read_bytes()[:300])
    with pytest.raises(DataError, match=r"corrupt\.h5: not a readable HDF5 bag"):
        read_bag(corrupt)
    bad = tmp_path / "bad"
    write_bag(bad / "nan.h5", np.array([[np.nan, 1.0]]))
    with pytest.raises(DataError, match=r"nan\.h5: 'feats' has 1 non-finite"):
        read_bag(bad / "nan.h5")
    with pytest.raises(ValueError, match="slice_index must be"):
        write_bag(bad / "x.h5", np.ones((3, 2)), np.arange(4))

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("hippocampus_004", "hippocampus_006"):
        (mixed / f"{name}.h5").write_bytes((hippo[0] / f"{name}.h5").read_bytes())
    write_bag(mixed / "wrong_dim.h5", np.ones((4, 7)))
    with pytest.raises(DataError, match=r"wrong_dim\.h5: 'feats' has D=7 but the other bags .* have D=18"):
        BagDataset(mixed)
    with pytest.raises(DataError, match=r"hippocampus_004\.h5: 'feats' has D=18 .* have D=32"):
        BagDataset(hippo[0], in_dim=32)


def test_dataset_reports_unmatched_ids_and_collates_with_mask(hippo, tmp_path):
    table = load_targets(hippo[1], "large", "binary")
    targets = dict(zip(table.ids, table.y))
    targets.pop("hippocampus_044")
    targets["ghost_1"], targets["ghost_2"] = np.array([0.0]), np.array([1.0])
    with pytest.warns(UserWarning, match=r"2 id\(s\) in the targets have no bag file \(ghost_1, ghost_2\); "
                                         r"1 bag file\(s\) have no target \(hippocampus_044\); using the 19"):
        ds = BagDataset(hippo[0], targets, cache=False)
    assert len(ds) == 19 and ds.missing_bags == ["ghost_1", "ghost_2"] and ds.missing_targets == ["hippocampus_044"]

    batch = collate_bags([ds[0], ds[1], ds[2]])
    lengths = [read_bag(hippo[0] / f"{c}.h5").n_slices for c in batch["id"]]
    assert batch["feats"].shape == (3, max(lengths), 18) and batch["target"].shape == (3, 1)
    assert batch["mask"].sum(1).tolist() == lengths
    for b, n in enumerate(lengths):
        assert torch.equal(batch["feats"][b, :n], torch.from_numpy(read_bag(hippo[0] / f"{batch['id'][b]}.h5").feats))
        assert not batch["feats"][b, n:].any() and (batch["slice_index"][b, n:] == -1).all()


# ------------------------------------------------------------------------------------------------ targets


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_target_encodings_and_missing_values(tmp_path):
    csv_path = _write(tmp_path / "t.csv", "id,sex,flag,grade,age,bad\na,M,1,low,30.5,x\nb,F,0,high,41,2\n"
                                          "c,F,,mid,NA,3\nd,M,1,low,22,4\n")
    sex = load_targets(csv_path, ["sex"], "binary")
    assert sex.spec.mappings == {"sex": {"F": 0, "M": 1}} and sex.y[:, 0].tolist() == [1, 0, 0, 1]
    with pytest.warns(UserWarning, match=r"1 row\(s\) with a missing target in \['flag'\] dropped \(e\.g\. c\)"):
        flag = load_targets(csv_path, "flag", "binary")
    assert flag.ids == ["a", "b", "d"] and flag.y[:, 0].tolist() == [1, 0, 1]
    yes = load_targets(_write(tmp_path / "y.csv", "id,r\na,No\nb,yes\n"), "r", "binary")
    assert yes.spec.mappings["r"] == {"No": 0, "yes": 1}
    grade = load_targets(csv_path, "grade", "multiclass")
    assert grade.spec.classes == ("high", "low", "mid") and grade.y[:, 0].tolist() == [1, 0, 2, 1]
    assert grade.spec.n_outputs == 3
    with pytest.warns(UserWarning, match="dropped"):
        age = load_targets(csv_path, "age", "regression")
    assert age.y[:, 0].tolist() == [30.5, 41.0, 22.0]
    with pytest.raises(DataError, match=r"t\.csv: column 'grade' has 3 distinct values"):
        load_targets(csv_path, "grade", "binary")
    with pytest.raises(DataError, match=r"column 'bad' has non-numeric values \['x'\]"):
        load_targets(csv_path, "bad", "regression")
    with pytest.raises(ConfigError, match="takes one target column"):
        load_targets(csv_path, ["sex", "flag"], "binary")
    with pytest.raises(DataError, match=r"missing column\(s\) \['nope'\]"):
        load_targets(csv_path, "nope", "binary")
    with pytest.raises(DataError, match=r"duplicate ids in column 'id': \['a'\]"):
        load_targets(_write(tmp_path / "d.csv", "id,s\na,M\na,F\n"), "s", "binary")
    with pytest.raises(ConfigError, match="task='survival'"):
        load_targets(csv_path, "sex", "survival")


def test_loss_uses_pos_weight_from_training_targets():
    y_train = np.array([[1.0], [0.0], [0.0], [0.0]])
    assert pos_weight(y_train).tolist() == [3.0]
    assert pos_weight(np.array([[1, 0], [1, 1], [0, 0]])).tolist() == [0.5, 2.0]
    loss = MILTaskLoss(TargetSpec("binary", ("y",)), y_train)
    logits, target = torch.tensor([[0.3], [-1.2]]), torch.tensor([[1.0], [0.0]])
    p = torch.sigmoid(logits)
    by_hand = -(3.0 * target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    torch.testing.assert_close(loss(logits, target), by_hand)
    as_weight = torch.nn.BCEWithLogitsLoss(weight=torch.tensor([3.0]))(logits, target)  # CLEAR's mistake
    assert not torch.allclose(loss(logits, target), as_weight)
    assert loss.state() == {"pos_weight": [3.0]}


def test_regression_loss_standardises_with_training_statistics():
    spec = TargetSpec("regression", ("age",))
    y_train = np.array([[20.0], [40.0], [60.0]])
    loss = MILTaskLoss(spec, y_train)
    mean, std = 40.0, np.std([20.0, 40.0, 60.0])
    logits = torch.tensor([[0.5], [-1.0]])
    target = torch.tensor([[50.0], [30.0]])
    torch.testing.assert_close(loss(logits, target), torch.mean((logits - (target - mean) / std) ** 2))
    torch.testing.assert_close(loss.outputs(logits), logits * std + mean)
    restored = MILTaskLoss(spec, state=loss.state())
    torch.testing.assert_close(restored.outputs(logits), loss.outputs(logits))


def test_metrics_come_from_probabilities():
    spec = TargetSpec
    y = np.array([[0], [1], [0], [1], [1]])
    prob = np.array([[0.6], [0.7], [0.8], [0.9], [0.95]])
    m = compute_metrics(spec("binary", ("y",)), y, prob)
    assert m["auroc"] == pytest.approx(roc_auc_score(y[:, 0], prob[:, 0])) == pytest.approx(5 / 6)
    assert m["auroc"] != pytest.approx(roc_auc_score(y[:, 0], prob[:, 0] >= 0.5))  # thresholded would be 0.5
    assert m["accuracy"] == pytest.approx(0.6) and m["balanced_accuracy"] == pytest.approx(0.5)
    yc = np.array([[0], [1], [2], [1], [0], [2]])
    pc = np.random.default_rng(0).dirichlet(np.ones(3), size=6)
    mc = compute_metrics(spec("multiclass", ("g",), classes=("a", "b", "c")), yc, pc)
    assert mc["auroc"] == pytest.approx(roc_auc_score(yc[:, 0], pc, multi_class="ovr", average="macro"))
    ml = compute_metrics(spec("multilabel", ("u", "v")), np.array([[0, 1], [1, 1], [1, 0], [0, 0]]),
                         np.array([[0.2, 0.9], [0.8, 0.4], [0.6, 0.5], [0.1, 0.3]]))
    assert ml["auroc_u"] == 1.0 and ml["auroc_v"] == 0.75 and ml["auroc"] == pytest.approx(0.875)
    yr, pr = np.array([[1.0], [2.0], [4.0]]), np.array([[1.5], [2.0], [3.0]])
    mr = compute_metrics(spec("regression", ("a",)), yr, pr)
    assert mr["mae"] == pytest.approx(0.5) and mr["rmse"] == pytest.approx(np.sqrt(1.25 / 3))
    assert mr["pearson_r"] == pytest.approx(np.corrcoef(yr[:, 0], pr[:, 0])[0, 1])


# ------------------------------------------------------------------------------------------------- splits


def test_folds_cover_every_case_once_and_keep_groups_together():
    labels = np.array([0, 1] * 15)
    folds = make_folds(30, 5, 1337, labels)
    assert sorted(np.concatenate(folds).tolist()) == list(range(30))
    assert all(labels[f].sum() == 3 for f in folds)  # stratified: 3 positives in each fold of 6
    assert [f.tolist() for f in folds] == [f.tolist() for f in make_folds(30, 5, 1337, labels)]
    groups = [f"p{i // 3}" for i in range(30)]  # 10 patients with 3 volumes each
    for lab in (labels, None):
        folds = make_folds(30, 5, 7, lab, groups)
        assert sorted(np.concatenate(folds).tolist()) == list(range(30))
        fold_of = {i: k for k, f in enumerate(folds) for i in f}
        for g in set(groups):
            assert len({fold_of[i] for i in range(30) if groups[i] == g}) == 1
    with pytest.raises(ConfigError, match="num_folds=5 needs"):
        make_folds(30, 5, 0, None, [f"p{i % 4}" for i in range(30)])
    tr, va = split_validation(np.arange(10, 30), 0.2, 0, labels[10:30], groups[10:30])
    assert set(tr).isdisjoint(va) and sorted([*tr, *va]) == list(range(10, 30)) and len(va) >= 3
    assert {groups[i] for i in tr}.isdisjoint({groups[i] for i in va})
    tr, va = split_validation(np.arange(20), 0.2, 0, labels[:20])
    assert len(va) == 4 and labels[va].sum() == 2
    assert len(split_validation(np.arange(20), 0.0, 0)[1]) == 0


# ------------------------------------------------------------------------------------------------ training


def test_best_weights_are_a_deep_copy_from_the_best_epoch(hippo):
    """Validation = the training bags with flipped labels: val loss rises as training fits, so epoch 0 is best."""
    table = load_targets(hippo[1], "large", "binary")
    train = BagDataset(hippo[0], dict(zip(table.ids, table.y)))
    val = BagDataset(hippo[0], dict(zip(table.ids, 1.0 - table.y)))
    torch.manual_seed(0)
    model = build_mil_network(**SMALL_NET, in_dim=18)
    loss = MILTaskLoss(table.spec, table.y)
    snapshots, val_losses = [], []

    def record(epoch, net, train_loss, val_loss):
        snapshots.append(copy.deepcopy(net.state_dict()))
        val_losses.append(val_loss)

    result = train_fold(model, loss, DataLoader(train, 20, collate_fn=collate_bags),
                        DataLoader(val, 20, collate_fn=collate_bags), max_epochs=6, lr=3e-2, patience=10,
                        on_epoch_end=record)
    assert result.best_epoch == int(np.argmin(val_losses)) < len(val_losses) - 1
    assert val_losses[-1] > result.best_val_loss == min(val_losses)
    for name, tensor in result.best_state.items():
        assert torch.equal(tensor, snapshots[result.best_epoch][name])
    live = model.state_dict()
    assert any(not torch.equal(result.best_state[k], live[k]) for k in live)  # last weights moved on
    assert all(result.best_state[k].data_ptr() != live[k].data_ptr() for k in live)  # no shared storage
    assert [h["epoch"] for h in result.history] == list(range(6))


# ------------------------------------------------------------------------------------------------- the run


def test_crossval_outputs_and_patient_level_folds(binary_run, hippo):
    out, summary, built = binary_run
    ids = sorted(r["id"] for r in read_csv(hippo[1]))
    for name in ("run.json", "metrics.json", "metrics_per_fold.csv", "predictions.csv", "attention_top_slices.png"):
        assert (out / name).is_file(), name
    preds = read_csv(out / "predictions.csv")
    assert list(preds[0]) == ["id", "fold", "large", "prob_large", "pred_large"]
    assert [r["id"] for r in preds] == ids  # every case exactly once
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert sorted(sum(run["folds"], [])) == ids
    truth = {r["id"]: int(r["large"] == "yes") for r in read_csv(hippo[1])}
    per_fold = read_csv(out / "metrics_per_fold.csv")
    assert [r["fold"] for r in per_fold] == ["0", "1", "2", "3", "mean", "std"]
    for k, test_ids in enumerate(run["folds"]):
        rows = [r for r in preds if r["fold"] == str(k)]
        assert sorted(r["id"] for r in rows) == sorted(test_ids)
        assert all(int(r["large"]) == truth[r["id"]] for r in rows)
        auroc = roc_auc_score([int(r["large"]) for r in rows], [float(r["prob_large"]) for r in rows])
        assert float(per_fold[k]["auroc"]) == pytest.approx(auroc, abs=1e-6)
        fold = json.loads((out / "folds" / f"fold_{k}" / "fold.json").read_text(encoding="utf-8"))
        assert set(fold["train_ids"]).isdisjoint(fold["val_ids"]) and set(fold["test_ids"]) == set(test_ids)
        assert not set(fold["train_ids"] + fold["val_ids"]) & set(test_ids)
        y = np.array([truth[c] for c in fold["train_ids"]])
        assert fold["loss_state"]["pos_weight"] == [pytest.approx((y == 0).sum() / (y == 1).sum())]
        # the saved model is the evaluated one: it reproduces this fold's probabilities
        state = torch.load(out / "folds" / f"fold_{k}" / "model.pt", weights_only=True)
        train_feats = np.concatenate([read_bag(hippo[0] / f"{c}.h5").feats for c in fold["train_ids"]])
        np.testing.assert_allclose(state["input_mean"], train_feats.mean(0), rtol=1e-5, atol=1e-6)  # train only
        np.testing.assert_allclose(state["input_std"], train_feats.std(0), rtol=1e-4, atol=1e-6)
        net = build_mil_network(**SMALL_NET, in_dim=18).eval()
        net.load_state_dict(state)
        batch = collate_bags(list(BagDataset([hippo[0] / f"{c}.h5" for c in sorted(test_ids)])))
        with torch.no_grad():
            prob = torch.sigmoid(net(batch["feats"], batch["mask"]))[:, 0]
        np.testing.assert_allclose(prob.numpy(), [float(r["prob_large"]) for r in sorted(rows, key=lambda r: r["id"])],
                                   rtol=1e-6)
    pooled = roc_auc_score([int(r["large"]) for r in preds], [float(r["prob_large"]) for r in preds])
    assert summary["pooled"]["auroc"] == pytest.approx(pooled, abs=1e-6)
    assert summary["mean"]["auroc"] == pytest.approx(np.nanmean([float(r["auroc"]) for r in per_fold[:4]]))
    assert summary["target_spec"]["mappings"] == {"large": {"no": 0, "yes": 1}}

    # a fresh network per fold: 4 distinct objects, different initial weights, nothing carried over
    assert len(built) == 4 and len({id(net) for net, _ in built}) == 4
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(built[a][1]["embed.0.weight"], built[b][1]["embed.0.weight"])
        if a:
            previous = torch.load(out / "folds" / f"fold_{a - 1}" / "model.pt", weights_only=True)
            assert not torch.equal(built[a][1]["embed.0.weight"], previous["embed.0.weight"])

    for case in ids:
        att = read_csv(out / "attention" / f"{case}.csv")
        assert list(att[0]) == ["slice_index", "attention"]
        assert len(att) == read_bag(hippo[0] / f"{case}.h5").n_slices
        assert sum(float(r["attention"]) for r in att) == pytest.approx(1.0, abs=1e-5)


def test_crossval_is_deterministic_and_predictor_reuses_fold_models(binary_run, hippo, tmp_path):
    """What is guaranteed: bit-identical outputs for the same seed *at the same thread count*; at another
    thread count, float32 reductions are summed in another order, so predictions agree to a tolerance only."""
    out, _, _ = binary_run
    again = tmp_path / "again"
    CrossValidator(hippo[0], hippo[1], ["large"], "binary", again, network_def=SMALL_NET, num_folds=4,
                   max_epochs=3, patience=2, lr=1e-3, batch_size=4, plot_cases=0).run()
    assert (again / "predictions.csv").read_bytes() == (out / "predictions.csv").read_bytes()
    torch.set_num_threads(2)  # the autouse fixture restores the count afterwards
    two = tmp_path / "two_threads"
    CrossValidator(hippo[0], hippo[1], ["large"], "binary", two, network_def=SMALL_NET, num_folds=4,
                   max_epochs=3, patience=2, lr=1e-3, batch_size=4, plot_cases=0).run()
    torch.set_num_threads(1)
    one = {r["id"]: float(r["prob_large"]) for r in read_csv(out / "predictions.csv")}
    other = {r["id"]: float(r["prob_large"]) for r in read_csv(two / "predictions.csv")}
    assert one.keys() == other.keys()
    assert all(other[c] == pytest.approx(p, rel=1e-4, abs=1e-6) for c, p in one.items())
    run = json.loads((again / "run.json").read_text(encoding="utf-8"))
    assert run["network"] == {"_target_": "medvol.networks.mil.build_mil_network", **SMALL_NET}

    pred_dir = tmp_path / "pred"
    MILPredictor(again, hippo[0], pred_dir, folds=[1]).run()
    fold1 = {r["id"]: r["prob_large"] for r in read_csv(again / "predictions.csv") if r["fold"] == "1"}
    got = {r["id"]: r for r in read_csv(pred_dir / "predictions.csv")}
    assert len(got) == 20 and list(next(iter(got.values()))) == ["id", "n_models", "prob_large", "pred_large"]
    assert all(float(got[c]["prob_large"]) == pytest.approx(float(p), rel=1e-6) for c, p in fold1.items())
    assert (pred_dir / "attention" / "hippocampus_004.csv").is_file()
    ens = tmp_path / "ens"
    summary = MILPredictor(again, hippo[0], ens).run()
    assert summary["folds"] == [0, 1, 2, 3] and (ens / "attention_top_slices.png").is_file()

    wrong = tmp_path / "wrong"
    write_bag(wrong / "case.h5", np.ones((3, 5)))
    with pytest.raises(DataError, match=r"case\.h5: 'feats' has D=5 .* have D=18"):
        MILPredictor(again, wrong, tmp_path / "x").run()


def test_crossval_regression_with_groups(hippo, tmp_path):
    out = tmp_path / "reg"
    summary = CrossValidator(hippo[0], hippo[1], "volume_ml", "regression", out, group_column="patient",
                             network_def={**SMALL_NET, "pooling": "pma", "num_heads": 2}, num_folds=5,
                             max_epochs=2, lr=1e-3, batch_size=8, plot_cases=0).run()
    preds = read_csv(out / "predictions.csv")
    assert list(preds[0]) == ["id", "fold", "group", "volume_ml", "pred_volume_ml"]
    fold_of_group = {}
    for r in preds:
        assert fold_of_group.setdefault(r["group"], r["fold"]) == r["fold"]  # a patient never straddles folds
    truth = {r["id"]: float(r["volume_ml"]) for r in read_csv(hippo[1])}
    y, p = [float(r["volume_ml"]) for r in preds], [float(r["pred_volume_ml"]) for r in preds]
    assert summary["pooled"]["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-6)
    fold = json.loads((out / "folds" / "fold_0" / "fold.json").read_text(encoding="utf-8"))
    train_y = [truth[c] for c in fold["train_ids"]]
    assert fold["loss_state"]["mean"] == [pytest.approx(np.mean(train_y))]
    assert fold["loss_state"]["std"] == [pytest.approx(np.std(train_y))]
    assert abs(np.mean(p) - np.mean(y)) < 2 * np.std(y)  # outputs are back in millilitres
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["network"]["pooling"] == "pma"
    with pytest.raises(ConfigError, match="fresh network per fold"):  # a network without build_kwargs
        CrossValidator(hippo[0], hippo[1], "large", "binary", out, network_def=ABMIL(18))


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_crossval_multiclass_and_multilabel_predictions(hippo, tmp_path, task):
    rows = read_csv(hippo[1])
    ml = np.array([float(r["volume_ml"]) for r in rows])
    cuts = np.quantile(ml, [1 / 3, 2 / 3])
    csv_path = tmp_path / "t.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "size", "large", "left_half"])
        for i, r in enumerate(rows):
            w.writerow([r["id"], ["small", "medium", "big"][int((ml[i] > cuts).sum())], r["large"], int(i < 10)])
    cols = ["size"] if task == "multiclass" else ["large", "left_half"]
    summary = CrossValidator(hippo[0], csv_path, cols, task, tmp_path / "out", network_def=SMALL_NET, num_folds=3,
                             max_epochs=1, batch_size=8, plot_cases=0).run()
    preds = read_csv(tmp_path / "out" / "predictions.csv")
    if task == "multiclass":
        assert summary["target_spec"]["classes"] == ["big", "medium", "small"]
        prob_cols = ["prob_size_big", "prob_size_medium", "prob_size_small"]
        assert list(preds[0]) == ["id", "fold", "size", *prob_cols, "pred_size"]
        prob = np.array([[float(r[c]) for c in prob_cols] for r in preds])
        np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-6)
        auroc = roc_auc_score([int(r["size"]) for r in preds], prob, multi_class="ovr")
    else:
        assert list(preds[0]) == ["id", "fold", "large", "left_half", "prob_large", "prob_left_half", "pred_large",
                                  "pred_left_half"]
        auroc = np.mean([roc_auc_score([int(r[c]) for r in preds], [float(r[f"prob_{c}"]) for r in preds])
                         for c in cols])
        assert len(json.loads((tmp_path / "out" / "folds" / "fold_0" / "fold.json").read_text(encoding="utf-8"))
                   ["loss_state"]["pos_weight"]) == 2
    assert summary["pooled"]["auroc"] == pytest.approx(auroc, abs=1e-6)


# ----------------------------------------------------------------------------------------- IXI (shared data)


@pytest.mark.shared_data
@pytest.mark.slow
def test_ixi_sex_and_age_from_slice_histograms(shared_data, tmp_path):
    ixi = shared_data / "ixi_t1"
    paths = sorted((ixi / "t1").glob("*_T1.nii.gz"))[:40]
    bag_dir = tmp_path / "bags"
    for path in paths:
        embed_volume(path, bag_dir / f"{path.name[: -len('.nii.gz')]}.h5")
    participants = read_csv(ixi / "participants.csv")
    n_rows = len(participants)
    with pytest.warns(UserWarning, match=rf"{n_rows - 40} id\(s\) in the targets have no bag file.*"
                                         r"0 bag file\(s\) have no target; using the 40 cases"):
        sex = CrossValidator(bag_dir, ixi / "participants.csv", ["Sex"], "binary", tmp_path / "sex",
                             id_column="MRID", id_regex=r"^(.*)_T1$", network_def={**SMALL_NET, "hidden_dim": 32},
                             num_folds=5, max_epochs=6, lr=1e-3, batch_size=8, plot_cases=2).run()
    preds = read_csv(tmp_path / "sex" / "predictions.csv")
    assert len(preds) == 40 and {re.sub("_T1$", "", p.name[:-7]) for p in paths} == {r["id"] for r in preds}
    assert sex["target_spec"]["mappings"] == {"Sex": {"F": 0, "M": 1}}
    assert sex["pooled"]["auroc"] == pytest.approx(
        roc_auc_score([int(r["Sex"]) for r in preds], [float(r["prob_Sex"]) for r in preds]), abs=1e-6)
    assert (tmp_path / "sex" / "attention_top_slices.png").stat().st_size > 10_000  # curves and IXI slices

    with pytest.warns(UserWarning, match="no bag file"):
        age = CrossValidator(bag_dir, ixi / "participants.csv", "Age", "regression", tmp_path / "age",
                             id_column="MRID", id_regex=r"^(.*)_T1$", network_def=SMALL_NET, num_folds=5,
                             max_epochs=4, lr=1e-3, batch_size=8, plot_cases=0).run()
    ages = [float(r["Age"]) for r in read_csv(tmp_path / "age" / "predictions.csv")]
    pred = [float(r["pred_Age"]) for r in read_csv(tmp_path / "age" / "predictions.csv")]
    assert 15 < np.mean(pred) < 90 and abs(np.mean(pred) - np.mean(ages)) < np.std(ages)  # years, not z-scores
    assert age["pooled"]["mae"] == pytest.approx(mean_absolute_error(ages, pred), rel=1e-6)
