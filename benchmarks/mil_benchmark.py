r"""Slice-embedding MIL benchmark (issue 5): LeCL vs random-init encoders vs a PCA baseline on IXI, and
AdrenalMNIST3D on its official splits.

Everything goes through the bundles and the command line a user would type:

* LeCL pretraining: ``python -m monai.bundle run`` of ``bundles/lecl_slice_embedding/configs/train.json``;
* embeddings: ``python -m medvol embed`` (one HDF5 bag per volume) with the pretrained encoder, and with a
  randomly initialised encoder of the same architecture (``torch.manual_seed(0)``, the weights saved untrained);
* IXI patient-level models: ``python -m monai.bundle run`` of ``bundles/slice_mil/configs/train.json``
  (5-fold CV, ABMIL, the bundle's defaults): sex (binary, AUROC) and age (regression, MAE in years);
* IXI baseline: PCA of downsampled voxels + logistic regression (sex) / ridge regression (age), fitted inside each
  training fold on exactly the held-out folds the MIL runs used (read from their ``run.json``);
* AdrenalMNIST3D: the 28^3 volumes written as NIfTI, LeCL pretrained on the official train split only, embedded,
  then ABMIL (slice_mil defaults) trained on train, early-stopped on val, evaluated on test with the
  ``medvol.mil`` functions the bundle uses (``train_fold``, ``predict_bags``, ``compute_metrics``), for a few seeds.

The default sizes are small so that the whole run fits in about 40 minutes on a shared 2-core CPU: a reduced
MambaOut-style encoder (dims 24-48-96-128, depths 1-1-2-1, D = 128 instead of the bundle's Femto size),
96 x 96 slices for IXI (64 x 64 for the 28^3 AdrenalMNIST3D volumes), every 2nd axial IXI slice embedded, few
pretraining epochs. IXI has no lesion masks or boxes, and AdrenalMNIST3D neither: LeCL runs without lesion pairs,
which is exactly plain MoCo v3 on 2.5D slices.

``--mil-extra-lr LR`` repeats the IXI MIL cross-validations with another MIL learning rate (same folds), as a
sensitivity check of the bundle's default (1e-4, 32 epochs), which is short for ~90 training bags per fold.

Every stage writes its result under ``--out`` (``<stage>.json`` next to its files); a re-run skips finished
stages, so an interrupted run resumes (delete a stage's JSON to redo it). The summary is ``OUT/results.json``,
the tables ``OUT/results.md``. On a shared 2-core CPU the defaults took about 35 minutes.

    MEDVOL_DATA=../shared/data OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/mil_benchmark.py \
        --out runs/mil_bench --mil-extra-lr 1e-3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine_info import machine_info

REPO = Path(__file__).resolve().parents[1]
LECL = REPO / "bundles" / "lecl_slice_embedding"
MIL = REPO / "bundles" / "slice_mil"


# ----------------------------------------------------------------------------------------------------------- utils

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY", "PASSIVE"),
                "PYTHONPATH": str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")})
    return env


def run_cmd(cmd: list[str], log_path: Path, threads: int) -> float:
    """Run ``cmd`` from the repository root with its output in ``log_path``; returns wall seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(threads), stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-30:])
        raise RuntimeError(f"command failed (exit {proc.returncode}), see {log_path}:\n{tail}")
    return wall


def stage(out: Path, name: str, fn):
    """Run ``fn()`` once: its JSON result is cached in ``out/<name>.json``."""
    marker = out / f"{name}.json"
    if marker.is_file():
        log(f"stage {name}: cached")
        return json.loads(marker.read_text(encoding="utf-8"))
    log(f"stage {name}: running")
    t0 = time.perf_counter()
    result = fn()
    result = {**result, "stage_seconds": round(time.perf_counter() - t0, 1), "loadavg_after": os.getloadavg()}
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float))
    tmp.replace(marker)
    log(f"stage {name}: done in {result['stage_seconds']} s")
    return result


def machine() -> dict:
    return machine_info()


def set_args(overrides: dict) -> list[str]:
    """``monai.bundle run`` arguments (``--key value``, JSON values)."""
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return args


def embed_sets(overrides: dict) -> list[str]:
    """``medvol embed`` arguments (``--set key=value``)."""
    args = []
    for k, v in overrides.items():
        args += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    return args


# ------------------------------------------------------------------------------------------------------- encoders

def encoder_overrides(args, spatial_size: int, preprocessing: str | None = None) -> dict:
    """Settings shared by pretraining and embedding (must be identical on both sides)."""
    o = {"encoder": "mambaout", "encoder_options#mambaout": {"dims": args.dims, "depths": args.depths},
         "spatial_size": spatial_size, "context": 1, "preset": "mri"}
    if preprocessing is not None:
        o["preprocessing"] = preprocessing
    return o


def pretrain(args, out: Path, dataset_dir: Path, enc: dict, epochs: int, samples_per_volume: int) -> dict:
    """LeCL pretraining with the bundle's train.json; returns the model path and the loss history."""
    train_overrides = dict(enc)
    if "preprocessing" in train_overrides:  # train.json's preprocessing is a list: replace its first step
        train_overrides["preprocessing#0"] = train_overrides.pop("preprocessing").replace("keys=['image']",
                                                                                           "keys=['image', 'label']")
    overrides = {**train_overrides, "dataset_dir": str(dataset_dir), "output_dir": str(out),
                 "max_epochs": epochs, "warmup_epochs": max(1, epochs // 10), "samples_per_volume": samples_per_volume,
                 "batch_size": 64, "base_learning_rate": args.base_lr, "num_workers": 0, "seed": 0}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(LECL / "configs" / "train.json"),
           "--bundle_root", str(LECL)] + set_args(overrides)
    wall = run_cmd(cmd, out / "train.log", args.threads)
    model = out / "models" / "model.pt"
    if not model.is_file():
        raise RuntimeError(f"pretraining wrote no {model}")
    return {"model": str(model), "wall_s": round(wall, 1), "epochs": epochs, "overrides": overrides,
            "losses": losses_from_log(out / "train.log")}


def losses_from_log(path: Path) -> list[str]:
    """The per-epoch metric lines that ignite's StatsHandler logged (for the record)."""
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        if ("train_loss" in line or "val_loss" in line) and "Epoch" in line and "Key metric" not in line:
            keep.append(line.strip()[-160:])
    return keep[-2 * 200:]


def random_checkpoint(out: Path, enc: dict) -> dict:
    """The same encoder, initialised with seed 0 and saved untrained."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(LECL / "configs" / "train.json"), str(LECL / "configs" / "inference.json")])
    parser.update({"bundle_root": str(LECL), **{k: v for k, v in enc.items() if k != "preprocessing"}})
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    path = out / "random_init.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return {"model": str(path), "n_params": int(sum(p.numel() for p in net.parameters()))}


def embed(args, inputs: Path, output: Path, checkpoint: str, enc: dict, stride: int) -> dict:
    overrides = {**enc, "slicing#transforms#1#stride": stride}
    cmd = [sys.executable, "-m", "medvol", "embed", str(inputs), str(output), "--bundle", str(LECL),
           "--checkpoint", checkpoint, "--batch-size", "64"] + embed_sets(overrides)
    wall = run_cmd(cmd, output.parent / f"{output.name}.log", args.threads)
    with open(output / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r["status"] in ("ok", "skipped")]
    if len(ok) != len(rows):
        bad = [r for r in rows if r not in ok][:3]
        raise RuntimeError(f"medvol embed failed on {len(rows) - len(ok)} volumes, e.g. {bad}")
    secs = [float(r["seconds"]) for r in rows if r.get("seconds") not in (None, "")]
    slices = [int(r["n_slices"]) for r in rows if r.get("n_slices") not in (None, "")]
    return {"output": str(output), "volumes": len(rows), "wall_s": round(wall, 1),
            "volumes_per_s": round(len(rows) / wall, 3),
            "mean_s_per_volume_in_worker": round(float(np.mean(secs)), 3) if secs else None,
            "slices_per_volume": int(np.median(slices)) if slices else None,
            "dim": int(rows[0]["dim"]) if rows and rows[0].get("dim") else None}


# ------------------------------------------------------------------------------------------------------------ IXI

IXI_TASKS = {"sex": {"column": "Sex", "task": "binary"}, "age": {"column": "Age", "task": "regression"}}


def mil_crossval(args, bags: Path, targets: Path, task: str, column: str, out: Path, lr: float | None = None) -> dict:
    overrides = {"dataset_dir": str(bags), "targets_csv": str(targets), "id_column": "MRID", "id_regex": "^(.*)_T1$",
                 "target_columns": [column], "task": task, "output_dir": str(out), "num_workers": 0,
                 "device": "cpu"}
    if lr is not None:
        overrides["learning_rate"] = lr
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(MIL / "configs" / "train.json"),
           "--bundle_root", str(MIL)] + set_args(overrides)
    wall = run_cmd(cmd, out.parent / f"{out.name}.log", args.threads)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    return {"wall_s": round(wall, 1), "mean": metrics["mean"], "std": metrics["std"], "pooled": metrics["pooled"],
            "per_fold": metrics["per_fold"], "folds": run["folds"], "n_cases": run["n_cases"]}


def ixi_voxel_features(image_dir: Path, size: int) -> tuple[list[str], np.ndarray]:
    """Every volume: the LeCL/MRI preprocessing (RAS, percentiles to [0, 1]), resized to size^3, flattened."""
    import torch
    import torch.nn.functional as F

    from medvol.io.datalist import case_name
    from medvol.transforms import slice_preset

    pre = slice_preset("mri", keys=["image"])
    files = sorted(p for p in image_dir.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    ids, feats = [], []
    for path in files:
        img = torch.as_tensor(np.asarray(pre({"image": str(path)})["image"]), dtype=torch.float32)[None]
        small = F.interpolate(img, size=(size,) * 3, mode="area")
        ids.append(case_name(str(path)))
        feats.append(small.reshape(-1).numpy())
    return ids, np.stack(feats)


def pca_baseline(ids: list[str], x: np.ndarray, targets: Path, task: str, column: str, folds: list[list[str]],
                 n_components: int) -> dict:
    """PCA (fitted on the training fold) + logistic / ridge regression, on the MIL runs' held-out folds."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from medvol.mil import compute_metrics, load_targets, summarise_folds

    table = load_targets(targets, [column], task, "MRID")
    row = {c: i for i, c in enumerate(table.ids)}
    case_ids = [i[:-3] if i.endswith("_T1") else i for i in ids]
    index = {c: i for i, c in enumerate(case_ids)}
    per_fold, pooled_y, pooled_out = [], [], []
    for k, test_ids in enumerate(folds):
        test = np.array([index[c] for c in test_ids])
        train = np.array([index[c] for c in case_ids if c in row and c not in set(test_ids)])
        y_tr = table.y[[row[case_ids[i]] for i in train]]
        y_te = table.y[[row[case_ids[i]] for i in test]]
        n_comp = min(n_components, len(train) - 1)
        if task == "binary":
            model = make_pipeline(StandardScaler(), PCA(n_comp, random_state=0), StandardScaler(),
                                  LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), cv=5, max_iter=5000))
            model.fit(x[train], y_tr[:, 0].astype(int))
            out = model.predict_proba(x[test])[:, 1:2]
        else:
            model = make_pipeline(StandardScaler(), PCA(n_comp, random_state=0), StandardScaler(),
                                  RidgeCV(alphas=np.logspace(-2, 4, 25)))
            model.fit(x[train], y_tr[:, 0])
            out = model.predict(x[test])[:, None]
        metrics = {"fold": k, "n_test": len(test), **compute_metrics(table.spec, y_te, out)}
        per_fold.append(metrics)
        pooled_y.append(y_te)
        pooled_out.append(out)
    mean, std = summarise_folds(per_fold)
    pooled = compute_metrics(table.spec, np.concatenate(pooled_y), np.concatenate(pooled_out))
    return {"mean": mean, "std": std, "pooled": pooled, "per_fold": per_fold}


def run_ixi(args, out: Path) -> dict:
    data = Path(args.data) / "ixi_t1"
    images, targets = data / "t1", data / "participants.csv"
    enc = encoder_overrides(args, args.ixi_size)
    res = {"settings": {"encoder": enc, "stride": args.ixi_stride, "lecl_epochs": args.ixi_epochs,
                        "samples_per_volume": args.ixi_samples, "base_learning_rate": args.base_lr}}
    res["pretrain"] = stage(out, "ixi_pretrain",
                            lambda: pretrain(args, out / "lecl", images, enc, args.ixi_epochs, args.ixi_samples))
    res["random"] = stage(out, "ixi_random_ckpt", lambda: random_checkpoint(out, enc))
    ckpts = {"lecl": res["pretrain"]["model"], "random": res["random"]["model"]}
    for name, ckpt in ckpts.items():
        res[f"embed_{name}"] = stage(out, f"ixi_embed_{name}",
                                     lambda c=ckpt, n=name: embed(args, images, out / f"bags_{n}", c, enc,
                                                                  args.ixi_stride))
    for name in ckpts:
        for task, t in IXI_TASKS.items():
            res[f"mil_{name}_{task}"] = stage(
                out, f"ixi_mil_{name}_{task}",
                lambda n=name, tk=task, tt=t: mil_crossval(args, out / f"bags_{n}", targets, tt["task"], tt["column"],
                                                           out / f"mil_{n}_{tk}"))
    if args.mil_extra_lr is not None:  # sensitivity check: the same runs with another MIL learning rate
        lr = args.mil_extra_lr
        for name in ckpts:
            for task, t in IXI_TASKS.items():
                res[f"mil_{name}_{task}_extra_lr"] = stage(
                    out, f"ixi_mil_{name}_{task}_lr{lr:g}",
                    lambda n=name, tk=task, tt=t: mil_crossval(args, out / f"bags_{n}", targets, tt["task"],
                                                               tt["column"], out / f"mil_{n}_{tk}_lr{lr:g}", lr))
                if res[f"mil_{name}_{task}_extra_lr"]["folds"] != res[f"mil_{name}_{task}"]["folds"]:
                    raise RuntimeError(f"IXI {task}: the extra-lr MIL run used different folds")
    for task in IXI_TASKS:
        if res[f"mil_lecl_{task}"]["folds"] != res[f"mil_random_{task}"]["folds"]:
            raise RuntimeError(f"IXI {task}: the LeCL and random-init MIL runs used different folds")

    feats_path = out / f"voxels_{args.pca_size}.npz"
    if not feats_path.is_file():
        log(f"downsampling {images} to {args.pca_size}^3 for the PCA baseline")
        t0 = time.perf_counter()
        ids, x = ixi_voxel_features(images, args.pca_size)
        np.savez(feats_path, ids=np.array(ids), x=x, seconds=time.perf_counter() - t0)
    cached = np.load(feats_path)
    ids, x = [str(i) for i in cached["ids"]], cached["x"]
    for task, t in IXI_TASKS.items():
        res[f"pca_{task}"] = stage(out, f"ixi_pca_{task}", lambda tk=task, tt=t: pca_baseline(
            ids, x, targets, tt["task"], tt["column"], res[f"mil_lecl_{tk}"]["folds"], args.pca_components))
    return res


# ----------------------------------------------------------------------------------------------- AdrenalMNIST3D

ADRENAL_SPLITS = ("train", "val", "test")


def adrenal_nifti(npz: Path, out: Path) -> dict:
    """Write every volume as ``<split>/adrenal_<split>_n<i>.nii.gz`` (uint8, 1 mm, identity affine) + targets.csv."""
    import nibabel as nib

    data = np.load(npz)
    rows, counts = [], {}
    for split in ADRENAL_SPLITS:
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        for i, (img, lab) in enumerate(zip(images, labels)):
            case = f"adrenal_{split}_n{i:04d}"  # "_n": index 0 would otherwise end in nnU-Net's "_0000" channel suffix
            nib.save(nib.Nifti1Image(np.ascontiguousarray(img), np.eye(4)), str(folder / f"{case}.nii.gz"))
            rows.append((case, int(lab), split))
        counts[split] = {"n": int(len(labels)), "positive": int(labels.sum())}
    with open(out / "targets.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "split"])
        w.writerows(rows)
    return {"targets": str(out / "targets.csv"), "counts": counts, "shape": list(data["train_images"].shape[1:])}


def adrenal_mil(bag_dirs: dict, targets: Path, seeds: list[int]) -> dict:
    """ABMIL with slice_mil's defaults: train on train, early stopping on val, metrics on test, per seed."""
    import torch
    from torch.utils.data import DataLoader

    from medvol.mil import (
        BagDataset,
        MILTaskLoss,
        collate_bags,
        compute_metrics,
        feature_stats,
        load_targets,
        network_factory,
        predict_bags,
        summarise_folds,
        train_fold,
    )

    cfg = json.loads((MIL / "configs" / "train.json").read_text(encoding="utf-8"))
    net = {k: v for k, v in cfg["network_def"].items() if k not in ("_target_", "_mode_")}
    net["pooling"] = cfg["mil_pooling"]
    table = load_targets(targets, ["label"], "binary", "id")
    split_of = {}
    with open(targets, newline="") as f:
        for r in csv.DictReader(f):
            split_of[r["id"]] = r["split"]
    ds = {}
    for split in ADRENAL_SPLITS:
        tg = {c: y for c, y in zip(table.ids, table.y) if split_of[c] == split}
        ds[split] = BagDataset(bag_dirs[split], tg)
    y = {s: np.stack([ds[s][i]["target"].numpy() for i in range(len(ds[s]))]) for s in ADRENAL_SPLITS}
    runs = []
    for seed in seeds:
        def loader(split, shuffle, s=seed):
            return DataLoader(ds[split], batch_size=cfg["batch_size"], shuffle=shuffle, collate_fn=collate_bags,
                              generator=torch.Generator().manual_seed(s))
        loss_fn = MILTaskLoss(table.spec, y["train"])
        torch.manual_seed(seed)
        model = network_factory(net)(in_dim=ds["train"].in_dim, n_outputs=table.spec.n_outputs)
        model.set_input_stats(*(torch.from_numpy(s) for s in feature_stats(ds["train"], range(len(ds["train"])))))
        result = train_fold(model, loss_fn, loader("train", True), loader("val", False), cfg["max_epochs"],
                            cfg["learning_rate"], cfg["weight_decay"], cfg["patience"], "cpu")
        model.load_state_dict(result.best_state)
        metrics = {"seed": seed, "best_epoch": result.best_epoch}
        for split in ("val", "test"):
            _, outputs, _, _ = predict_bags(model, loader(split, False), loss_fn, "cpu")
            metrics.update({f"{split}_{k}": v for k, v in compute_metrics(table.spec, y[split], outputs).items()})
        runs.append(metrics)
        log(f"AdrenalMNIST3D MIL seed {seed}: test AUROC {metrics['test_auroc']:.3f}, "
            f"ACC {metrics['test_accuracy']:.3f}")
    mean, std = summarise_folds(runs)
    return {"network": net, "per_seed": runs, "mean": mean, "std": std}


def run_adrenal(args, out: Path) -> dict:
    npz = Path(args.data) / "adrenalmnist3d" / "adrenalmnist3d.npz"
    nifti = out / "nifti"
    # binary shape masks {0, 255}: the CT preset with a 0..255 window maps them to {0, 1} (per-volume MRI
    # percentiles would not: some masks cover less than 0.5 % of the volume)
    pre = ("$medvol.transforms.slice_preset('ct', keys=['image'], windows=None, spacing=None, "
           "window=(0.0, 255.0))")
    enc = encoder_overrides(args, args.adrenal_size, preprocessing=pre)
    res = {"settings": {"encoder": enc, "lecl_epochs": args.adrenal_epochs,
                        "samples_per_volume": args.adrenal_samples, "base_learning_rate": args.base_lr,
                        "seeds": args.adrenal_seeds}}
    res["data"] = stage(out, "adrenal_nifti", lambda: adrenal_nifti(npz, nifti))
    res["pretrain"] = stage(out, "adrenal_pretrain", lambda: pretrain(
        args, out / "lecl", nifti / "train", enc, args.adrenal_epochs, args.adrenal_samples))
    encoders = {"lecl": res["pretrain"]["model"]}
    if args.adrenal_random:
        res["random"] = stage(out, "adrenal_random_ckpt", lambda: random_checkpoint(out, enc))
        encoders["random"] = res["random"]["model"]
    for name, ckpt in encoders.items():
        for split in ADRENAL_SPLITS:
            res[f"embed_{name}_{split}"] = stage(out, f"adrenal_embed_{name}_{split}", lambda c=ckpt, n=name, s=split:
                                                 embed(args, nifti / s, out / f"bags_{n}" / s, c, enc, 1))
        res[f"mil_{name}"] = stage(out, f"adrenal_mil_{name}", lambda n=name: adrenal_mil(
            {s: out / f"bags_{n}" / s for s in ADRENAL_SPLITS}, Path(res["data"]["targets"]), args.adrenal_seeds))
    return res


# ------------------------------------------------------------------------------------------------------- tables

def _ms(block: dict, key: str, digits: int = 3) -> str:
    mean, std = block["mean"].get(key), block["std"].get(key)
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def markdown(results: dict) -> str:
    """The result tables (mean ± sample std over folds / seeds) as markdown, from the stage results."""
    lines = []
    ixi = results.get("ixi")
    if ixi:
        lines += ["| embeddings / features | sex AUROC | sex balanced acc. | age MAE (years) | age Pearson r |",
                  "|---|---:|---:|---:|---:|"]
        rows = [("mil_lecl_{}", "LeCL-pretrained encoder + slice_mil (ABMIL)"),
                ("mil_random_{}", "random-init encoder + slice_mil (ABMIL)"),
                ("pca_{}", "PCA of downsampled voxels + logistic / ridge")]
        if "mil_lecl_sex_extra_lr" in ixi:
            rows += [("mil_lecl_{}_extra_lr", "LeCL + slice_mil, MIL lr " + results["args"]["mil_extra_lr"]),
                     ("mil_random_{}_extra_lr", "random init + slice_mil, MIL lr " + results["args"]["mil_extra_lr"])]
        for key, label in rows:
            sex, age = ixi[key.format("sex")], ixi[key.format("age")]
            lines.append(f"| {label} | {_ms(sex, 'auroc')} | {_ms(sex, 'balanced_accuracy')} | "
                         f"{_ms(age, 'mae', 2)} | {_ms(age, 'pearson_r')} |")
        lines.append("")
        for name in ("lecl", "random"):
            e = ixi[f"embed_{name}"]
            lines.append(f"- medvol embed ({name}): {e['volumes']} volumes in {e['wall_s']} s "
                         f"({e['volumes_per_s']} volumes/s, {e['mean_s_per_volume_in_worker']} s/volume in the worker, "
                         f"{e['slices_per_volume']} slices of D = {e['dim']} per volume)")
        lines.append(f"- LeCL pretraining: {ixi['pretrain']['wall_s']} s for {ixi['pretrain']['epochs']} epochs")
        lines.append("")
    adr = results.get("adrenal")
    if adr:
        lines += ["| AdrenalMNIST3D (28^3, official test split, n = 298) | test AUC | test ACC | val AUC |",
                  "|---|---:|---:|---:|"]
        for name in ("lecl", "random"):
            if f"mil_{name}" in adr:
                m = adr[f"mil_{name}"]
                lines.append(f"| {name} encoder + slice_mil (ABMIL), {len(m['per_seed'])} seeds | "
                             f"{_ms(m, 'test_auroc')} | {_ms(m, 'test_accuracy')} | {_ms(m, 'val_auroc')} |")
        lines.append("")
        lines.append(f"- LeCL pretraining: {adr['pretrain']['wall_s']} s for {adr['pretrain']['epochs']} epochs")
        for k, e in adr.items():
            if k.startswith("embed_"):
                lines.append(f"- medvol embed {k[6:]}: {e['volumes']} volumes in {e['wall_s']} s")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (stages are cached here; re-run resumes)")
    p.add_argument("--data", default=os.environ.get("MEDVOL_DATA", str(REPO.parent / "shared" / "data")),
                   help="folder with ixi_t1/ and adrenalmnist3d/ (default $MEDVOL_DATA)")
    p.add_argument("--benchmarks", nargs="+", default=["ixi", "adrenal"], choices=["ixi", "adrenal"])
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every child process (default 1)")
    p.add_argument("--dims", type=int, nargs=4, default=[24, 48, 96, 128], help="MambaOut stage widths")
    p.add_argument("--depths", type=int, nargs=4, default=[1, 1, 2, 1], help="MambaOut blocks per stage")
    p.add_argument("--base-lr", type=float, default=2e-3,
                   help="LeCL base_learning_rate (lr = base x batch 64 / 256; default 2e-3 for the short schedule)")
    p.add_argument("--ixi-size", type=int, default=96, help="IXI slice size (default 96)")
    p.add_argument("--ixi-stride", type=int, default=2, help="embed every k-th axial IXI slice (default 2)")
    p.add_argument("--ixi-epochs", type=int, default=12, help="LeCL epochs on IXI (default 12)")
    p.add_argument("--ixi-samples", type=int, default=16, help="LeCL slices per IXI volume and epoch (default 16)")
    p.add_argument("--pca-size", type=int, default=32, help="IXI volumes resized to this cube for PCA (default 32)")
    p.add_argument("--pca-components", type=int, default=32, help="PCA components (default 32)")
    p.add_argument("--adrenal-size", type=int, default=64, help="AdrenalMNIST3D slice size (default 64)")
    p.add_argument("--adrenal-epochs", type=int, default=8, help="LeCL epochs on AdrenalMNIST3D train (default 8)")
    p.add_argument("--adrenal-samples", type=int, default=4, help="LeCL slices per volume and epoch (default 4)")
    p.add_argument("--adrenal-seeds", type=int, nargs="+", default=[1337, 1338, 1339], help="MIL seeds")
    p.add_argument("--adrenal-random", action="store_true", help="also embed with a random-init encoder")
    p.add_argument("--mil-extra-lr", type=float, default=None,
                   help="also run the IXI slice_mil CVs with this learning rate (bundle default 1e-4)")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = {"machine": machine(), "loadavg_before": os.getloadavg(),
               "args": {k: str(v) for k, v in vars(args).items()}}
    if "ixi" in args.benchmarks:
        results["ixi"] = run_ixi(args, args.out / "ixi")
    if "adrenal" in args.benchmarks:
        results["adrenal"] = run_adrenal(args, args.out / "adrenal")
    results["loadavg_after"] = os.getloadavg()
    results["wall_s_this_invocation"] = round(time.perf_counter() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    log(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
