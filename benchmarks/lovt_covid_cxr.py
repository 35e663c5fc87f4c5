"""LoVT vs ConVIRT vs CLIP vs image-only SSL vs random init on real chest X-rays with clinical notes.

Data: ``$MEDVOL_DATA/image_reports/covid_cxr_notes`` (292 radiographs of 146 patients, each with its clinical /
imaging note; several images per patient, often sharing one note). Folds: 3 folds grouped by patient
(``GroupKFold`` on ``patientid``), so no patient is in the training and the test part of a fold.

Per fold and method: the fold's training patients are split again by patient (80 / 20, seed 0) into an inner
training and an inner validation part. Models are trained on the inner training part only; the checkpoint
(epoch) is chosen on the inner validation part (image-report methods: image-to-report recall@5; image-only SSL:
its validation loss). The held-out test patients are used only for the final numbers.

Settings chosen before the test run (written here and in docs/benchmarks.md):

- images 128 x 128 (longest side resized, padded), 2D U-Net encoder channels (8, 16, 32, 64, 128), one conv per
  level, instance norm -> an 8 x 8 region grid (LoVT: 7 x 7 ResNet-50 regions); batch 32; AdamW, weight decay
  1e-6 (paper), cosine schedule, 4 epochs (CPU budget), validation every 2 epochs.
- learning rate: 1e-3 for every method, fixed in advance (the planned choice on fold 0's inner validation from
  {1e-4 (paper), 1e-3} was dropped for time; ``LRS`` lists the candidates, stage ``lr``; the chosen run is fold
  0's LoVT row, it is the same training). Only the epoch (2 or 4) is chosen on inner validation.
- text: all-MiniLM-L6-v2 (the ``text`` extra) with ALL six layers frozen (CPU budget: the bundle default freezes
  3 of 6 and fine-tunes the rest); the frozen states are cached, the sentence pooling, attention pooling and
  projections are trained. Without the extra the scratch text encoder is used (the results say which).
- LoVT: paper settings (tau .1, .75 / .25, four local terms .375, local tau .3, positives within .5 with exp(-d),
  attention-weighted). ConVIRT: global only, mean-pooled image, one random sentence per step, tau .1,
  .75 / .25. CLIP: global only, attention-pooled image, one random sentence per step, learned temperature from
  .07, .5 / .5. Image-only SSL: medvol's GlobalLocalContrastive global stage with strategy GR (SimCLR NT-Xent,
  tau .1) on two augmented views, same backbone and schedule. Random init: the same backbone untrained.
- Evaluation on the test patients: retrieval image -> report and report -> image with recall@1/5/10 (reports
  de-duplicated by text; an image's hit is its own note; a note's hit is any image carrying it); linear probe
  (scikit-learn logistic regression on standardised frozen backbone features, global average pooling of the
  last encoder map, C chosen by grouped 3-fold CV inside the training fold from {0.01, 0.1, 1, 10}):
  COVID-19 (incl. "COVID-19, ARDS") vs every other finding (rows labelled "todo" upstream are left out of the
  probe), AUROC; view (PA / AP incl. AP supine / lateral; empty and "?" left out), macro one-vs-rest AUROC.

Stages are cached under ``--out`` (data cache, one file per fold x method) so a killed run resumes:

    MEDVOL_DATA=/work/shared/data nohup python benchmarks/lovt_covid_cxr.py --out /tmp/lovt_bench &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_info import machine_info  # noqa: E402

from medvol.io.atomic import atomic_path, atomic_write_text  # noqa: E402
from medvol.io.reports import image_report_datalist, join_sentences  # noqa: E402

METHODS = ("lovt", "convirt", "clip", "simclr", "random")
SIZE, BATCH, EPOCHS, EVAL_EVERY = 128, 32, 4, 2
CHANNELS = (8, 16, 32, 64, 128)
LRS = (1e-3,)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ---- data ------------------------------------------------------------------------------------------------------


def load_data(out: Path) -> dict:
    cache = out / "data.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    from medvol.transforms.radiograph import radiograph_preprocessing

    root = Path(os.environ.get("MEDVOL_DATA", "")) / "image_reports" / "covid_cxr_notes"
    if not (root / "pairs.csv").is_file():
        raise SystemExit(f"{root / 'pairs.csv'} not found: set MEDVOL_DATA to the shared data folder")
    items = image_report_datalist(root / "pairs.csv", report_key="clinical_notes", subject_key="patientid")
    pre = radiograph_preprocessing(size=SIZE)
    images = torch.stack([pre({"image": it["image"]})["image"].as_tensor() for it in items]).half()
    texts = [join_sentences(it["sentences"]) for it in items]
    unique = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    data = {
        "images": images, "reports": texts, "report_id": torch.tensor([unique[t] for t in texts]),
        "patient": [it["subject"] for it in items], "finding": [it["finding"] for it in items],
        "view": [it["view"] for it in items],
    }
    with atomic_path(cache) as tmp:
        torch.save(data, tmp)
    return data


def folds(data: dict, n_folds: int = 3):
    from sklearn.model_selection import GroupKFold, GroupShuffleSplit

    idx = np.arange(len(data["patient"]))
    groups = np.array(data["patient"])
    out = []
    for train, test in GroupKFold(n_splits=n_folds).split(idx, groups=groups):
        inner = GroupShuffleSplit(n_splits=1, test_size=0.2, random_state=0)
        tr, va = next(inner.split(train, groups=groups[train]))
        out.append((train[tr], train[va], test))
    return out


# ---- models ----------------------------------------------------------------------------------------------------


def text_encoder_name() -> str:
    from medvol.networks.text import pretrained_text_available

    return "minilm" if pretrained_text_available() else "scratch"


def build(method: str, seed: int):
    from medvol.methods.glcl import GlobalLocalContrastive
    from medvol.methods.lovt import LoVT
    from medvol.networks import UNet3D
    from medvol.networks.image_report import ImageReportModel
    from medvol.networks.text import build_text_encoder

    torch.manual_seed(seed)
    backbone = UNet3D(channels=CHANNELS, num_convs=1, spatial_dims=2)
    if method == "random":
        return backbone
    if method == "simclr":
        return GlobalLocalContrastive(backbone, strategy="GR", proj_dim=128, hidden_dim=512, temperature=0.1)
    name = text_encoder_name()
    text = build_text_encoder(name, frozen_layers=6) if name == "minilm" else build_text_encoder(name)
    if method == "lovt":
        return LoVT(ImageReportModel(backbone, text, proj_dim=128, local=True))
    if method == "convirt":
        return LoVT(ImageReportModel(backbone, text, proj_dim=128, image_pool="mean", local=False),
                    lambda_local=0.0, sentence_sampling="random", seed=seed)
    if method == "clip":
        return LoVT(ImageReportModel(backbone, text, proj_dim=128, local=False), temperature=0.07,
                    lambda_a2b=0.5, lambda_b2a=0.5, learn_temperature=True, lambda_local=0.0,
                    sentence_sampling="random", seed=seed)
    raise ValueError(method)


def image_backbone(model):
    from medvol.networks.image_report import ImageReportModel

    inner = getattr(model, "backbone", model)
    return inner.image if isinstance(inner, ImageReportModel) else inner


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random affine (rotation +-10 deg, scale +-10 %, shift +-5 %) and gamma per image; no flips."""
    b = x.shape[0]
    angle = torch.tensor(rng.uniform(-10, 10, b) * math.pi / 180, dtype=torch.float32)
    scale = torch.tensor(rng.uniform(0.9, 1.1, b), dtype=torch.float32)
    shift = torch.tensor(rng.uniform(-0.1, 0.1, (b, 2)), dtype=torch.float32)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    gamma = torch.tensor(rng.uniform(0.8, 1.25, b), dtype=torch.float32).view(b, 1, 1, 1)
    return x.clamp(0, 1) ** gamma


# ---- evaluation ------------------------------------------------------------------------------------------------


@torch.no_grad()
def features(model, images: torch.Tensor) -> np.ndarray:
    net = image_backbone(model).eval()
    out = [net.encode(images[i: i + 64].float())[-1].mean(dim=(2, 3)) for i in range(0, len(images), 64)]
    return torch.cat(out).numpy()


@torch.no_grad()
def embeddings(model, images: torch.Tensor, reports: list[str]):
    model.eval()
    m = model.backbone
    img = torch.cat([m.encode_image_embeddings(images[i: i + 64].float()) for i in range(0, len(images), 64)])
    rep = torch.cat([F.normalize(m.encode_report(reports[i: i + 64]).global_, dim=1)
                     for i in range(0, len(reports), 64)])
    return img, rep


def retrieval(img: torch.Tensor, rep: torch.Tensor, report_id: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Recall@k both ways over the de-duplicated reports of ``img``'s items."""
    ids = report_id.tolist()
    uniq = list(dict.fromkeys(ids))
    pos = {r: i for i, r in enumerate(uniq)}
    first = [ids.index(r) for r in uniq]
    rep_u = rep[first]
    sim = img @ rep_u.t()  # (n_images, n_reports)
    out = {}
    target = torch.tensor([pos[r] for r in ids])
    rank_i2r = (sim > sim[torch.arange(len(ids)), target][:, None]).sum(dim=1)  # 0 = top
    for k in ks:
        out[f"i2r_R@{k}"] = float((rank_i2r < k).float().mean())
    sim_t = sim.t()  # (n_reports, n_images)
    owner = torch.tensor([[pos[r] == j for r in ids] for j in range(len(uniq))])  # (n_reports, n_images)
    order = sim_t.argsort(dim=1, descending=True)
    hits = torch.gather(owner, 1, order)
    for k in ks:
        out[f"r2i_R@{k}"] = float(hits[:, :k].any(dim=1).float().mean())
    out["n_images"], out["n_reports"] = len(ids), len(uniq)
    return out


def probe(feat_tr, y_tr, g_tr, feat_te, y_te) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    multi = len(set(y_tr)) > 2
    scoring = "roc_auc_ovr" if multi else "roc_auc"
    search = GridSearchCV(pipe, {"logisticregression__C": [0.01, 0.1, 1, 10]}, cv=GroupKFold(3), scoring=scoring)
    search.fit(feat_tr, y_tr, groups=g_tr)
    p = search.predict_proba(feat_te)
    if multi:
        return float(roc_auc_score(y_te, p, multi_class="ovr", labels=search.classes_))
    return float(roc_auc_score(y_te, p[:, 1]))


def probe_labels(data: dict):
    finding = [None if f == "todo" else int(f.startswith("COVID-19")) for f in data["finding"]]
    views = {"PA": 0, "AP": 1, "AP Supine": 1, "L": 2}
    view = [views.get(v) for v in data["view"]]
    return finding, view


def evaluate_probes(data, train_idx, test_idx, feat) -> dict:
    finding, view = probe_labels(data)
    out = {}
    groups = np.array(data["patient"])
    for name, y in (("finding_auroc", finding), ("view_auroc", view)):
        tr = [i for i in train_idx if y[i] is not None]
        te = [i for i in test_idx if y[i] is not None]
        out[name] = probe(feat[tr], [y[i] for i in tr], groups[tr], feat[te], [y[i] for i in te])
    return out


# ---- training --------------------------------------------------------------------------------------------------


def train(method: str, data: dict, tr: np.ndarray, va: np.ndarray, lr: float, seed: int = 0) -> tuple:
    model = build(method, seed)
    if method == "random":
        return model, {"selected_epoch": 0}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-6)
    steps = EPOCHS * (len(tr) // BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    images, reports, rid = data["images"], data["reports"], data["report_id"]
    best, best_state, history = None, None, []
    for epoch in range(1, EPOCHS + 1):
        model.train()
        order = rng.permutation(tr)
        losses = []
        for s in range(len(tr) // BATCH):
            idx = order[s * BATCH:(s + 1) * BATCH]
            x = images[idx].float()
            if method == "simclr":
                batch = {"image_g1": augment(x, rng), "image_g2": augment(x, rng),
                         "partition": torch.zeros(len(idx), dtype=torch.long),
                         "case_index": torch.arange(len(idx))}
            else:
                batch = {"image": augment(x, rng), "report": [reports[i] for i in idx], "group": rid[idx]}
            out = model(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sched.step()
            losses.append(float(out["loss"]))
        record = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if epoch % EVAL_EVERY == 0:
            if method == "simclr":
                model.eval()
                with torch.no_grad():
                    x = images[va].float()
                    r = np.random.default_rng(1)
                    val = float(model({"image_g1": augment(x, r), "image_g2": augment(x, r),
                                       "partition": torch.zeros(len(va), dtype=torch.long),
                                       "case_index": torch.arange(len(va))})["loss"])
                score = -val
                record["val_loss"] = val
            else:
                img, rep = embeddings(model, images[va], [reports[i] for i in va])
                score = retrieval(img, rep, rid[va])["i2r_R@5"]
                record["val_i2r_R@5"] = score
            if best is None or score > best:
                best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
                record["selected"] = True
        history.append(record)
        log(f"{method} lr={lr:g} {record}")
    model.load_state_dict(best_state)
    selected = max((h for h in history if h.get("selected")), key=lambda h: h["epoch"])["epoch"]
    return model, {"selected_epoch": selected, "history": history}


def run_fold(method: str, fold: int, data, split, lr: float, out: Path, tag: str = "") -> dict:
    path = out / f"{method}_fold{fold}{tag}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    tr, va, te = split
    t0 = time.time()
    model, info = train(method, data, tr, va, lr)
    feat = features(model, data["images"])
    result = {"method": method, "fold": fold, "lr": lr, **info,
              **evaluate_probes(data, np.concatenate([tr, va]), te, feat)}
    if method not in ("simclr", "random"):
        img, rep = embeddings(model, data["images"][te], [data["reports"][i] for i in te])
        result.update(retrieval(img, rep, data["report_id"][te]))
    result["train_seconds"] = round(time.time() - t0, 1)
    atomic_write_text(path, json.dumps(result, indent=1))
    log(f"done {method} fold {fold}: " + json.dumps({k: v for k, v in result.items() if k != "history"}))
    return result


def choose_lr(data, split, out: Path) -> float:
    """LoVT on fold 0: inner-train / inner-validation only; the test part of fold 0 is scored but not looked at."""
    path = out / "lr_choice.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["lr"]
    scores = {}
    for lr in LRS:
        result = run_fold("lovt", 0, data, split, lr, out, tag=f"_lr{lr:g}")
        scores[f"{lr:g}"] = max(h.get("val_i2r_R@5", -1) for h in result["history"])
    lr = float(max(scores, key=scores.get))
    chosen = out / f"lovt_fold0_lr{lr:g}.json"
    atomic_write_text(out / "lovt_fold0.json", chosen.read_text(encoding="utf-8"))
    atomic_write_text(path, json.dumps({"lr": lr, "inner_val_i2r_R@5": scores}, indent=1))
    log(f"lr chosen on fold 0 inner validation: {lr} ({scores})")
    return lr


def summarize(results: list[dict], out: Path, info: dict) -> str:
    keys = ["i2r_R@1", "i2r_R@5", "i2r_R@10", "r2i_R@1", "r2i_R@5", "r2i_R@10", "finding_auroc", "view_auroc"]
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    table = {}
    for m in METHODS:
        rows = [r for r in results if r["method"] == m]
        if not rows:
            continue
        cells = []
        for k in keys:
            vals = [r[k] for r in rows if k in r]
            if vals:
                cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}")
                table.setdefault(m, {})[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)),
                                              "folds": vals}
            else:
                cells.append("—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    atomic_write_text(out / "summary.json", json.dumps({"table": table, **info}, indent=1))
    atomic_write_text(out / "summary.md", md + "\n")
    return md


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/lovt_bench")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = load_data(out)
    splits = folds(data, args.folds)
    log(f"{len(data['reports'])} images, text encoder {text_encoder_name()}, folds "
        + str([(len(a), len(b), len(c)) for a, b, c in splits]))
    lr = choose_lr(data, splits[0], out)
    results = [run_fold(m, f, data, splits[f], lr, out) for f in range(args.folds) for m in args.methods]
    info = {"machine": machine_info(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "text_encoder": text_encoder_name(), "lr": lr, "folds": args.folds,
            "wall_seconds_this_call": round(time.time() - t0, 1)}
    print(summarize(results, out, info))


if __name__ == "__main__":
    main()
