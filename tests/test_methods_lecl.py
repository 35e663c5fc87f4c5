"""LeCL method: MoCo v3 loss from the paper, the lesion term, the momentum branch, validation without side effects,
and the bundle helpers (channels, preprocessing, datalist with lesion masks or boxes), on real scans."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import EnsureTyped, SelectItemsd

from medvol.engines import MomentumUpdateHandler, SeededDataset, SSLEvaluator, SSLTrainer, make_loader
from medvol.errors import ConfigError
from medvol.io import lesion_datalist
from medvol.methods import LeCL
from medvol.networks import build_slice_encoder
from medvol.transforms import LesionBoxesd, RandLesionSliceViewsd, lecl_view_augmentation, slice_channels, slice_preset

SIZE = 32
TINY = {"dims": (8, 16), "depths": (1, 1)}


def _method(seed: int = 0, **kwargs) -> LeCL:
    torch.manual_seed(seed)
    return LeCL(build_slice_encoder("mambaout", in_channels=3, **TINY), proj_dim=16, hidden_dim=32,
                pred_hidden_dim=32, **kwargs)


def _dataset(demo_dir, lesion_prob: float = 1.0) -> SeededDataset:
    """breast1 (MR with a lesion mask) and two hippocampus MRIs (no lesion), as LeCL view pairs."""
    nrrd = demo_dir / "nrrd"
    data = [{"image": str(nrrd / "breast1_image.nrrd"), "label": str(nrrd / "breast1_label.nrrd")}]
    data += [{"image": str(p)} for p in sorted((demo_dir / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:2]]
    det = [slice_preset("mri", keys=["image", "label"]),
           LesionBoxesd("label", boxes_key="boxes", remove_mask=True, allow_missing_keys=True)]
    views = [RandLesionSliceViewsd("image", label_key=None, boxes_key="boxes", lesion_prob=lesion_prob,
                                   spatial_size=(SIZE, SIZE), allow_missing_keys=True),
             lecl_view_augmentation(["image_v1", "image_v2"]),
             SelectItemsd(["image_v1", "image_v2", "is_lesion"]),
             EnsureTyped(["image_v1", "image_v2", "is_lesion"], track_meta=False)]
    return SeededDataset(data, det, views)


@pytest.fixture(scope="module")
def batch(demo_dir) -> dict:
    loader = make_loader(_dataset(demo_dir), batch_size=8, num_samples=8, seed=3)
    out = next(iter(loader))
    assert out["image_v1"].shape == (8, 3, SIZE, SIZE) and out["is_lesion"].dtype == torch.bool
    assert 0 < int(out["is_lesion"].sum()) < 8  # real lesion pairs from breast1 next to plain pairs
    return out


def _paper_loss(method: LeCL, batch: dict, is_lesion, tau: float, w: float) -> float:
    """MoCo v3 (+ CLEAR lesion denominator) written per anchor from the paper, in float64."""
    q = [F.normalize(method.query(batch[v]).double(), dim=1) for v in ("image_v1", "image_v2")]
    with torch.no_grad():
        k = [F.normalize(method.key(batch[v]).double(), dim=1) for v in ("image_v1", "image_v2")]
    flags = [False] * len(q[0]) if is_lesion is None else [bool(f) for f in is_lesion]
    total = 0.0
    for qa, kb in ((q[0], k[1]), (q[1], k[0])):  # l(q1, k2) + l(q2, k1)
        n, terms = len(qa), []
        for i in range(n):
            s = [float(qa[i] @ kb[j]) / tau for j in range(n)]
            den = sum(math.exp(v) for v in s) + sum(math.exp(w * s[j]) for j in range(n) if flags[j] and j != i)
            terms.append(-math.log(math.exp(s[i]) / den) * 2 * tau)
        total += sum(terms) / n
    return total


@pytest.mark.parametrize("tau,w", [(1.0, 1.0), (0.5, 3.0)])
def test_loss_matches_moco_v3_and_lesion_reference(batch, tau, w):
    method = _method(temperature=tau, lesion_weight=w).eval()  # eval: BatchNorm statistics fixed across calls
    with torch.no_grad():
        with_lesion = float(method(batch)["loss"])
        plain = float(method({k: v for k, v in batch.items() if k != "is_lesion"})["loss"])
        all_false = float(method({**batch, "is_lesion": torch.zeros(8, dtype=torch.bool)})["loss"])
        ref_lesion = _paper_loss(method, batch, batch["is_lesion"], tau, w)
        ref_plain = _paper_loss(method, batch, None, tau, w)
    assert with_lesion == pytest.approx(ref_lesion, rel=1e-5)
    assert plain == pytest.approx(ref_plain, rel=1e-5)
    assert all_false == plain  # no lesion in the batch = plain MoCo v3
    assert with_lesion > plain  # the lesion keys enter every denominator once more


def test_lesion_term_grows_with_similar_lesion_keys(batch):
    """Two lesion samples with the same image (identical keys) raise the loss more than two dissimilar ones."""
    method = _method(lesion_weight=10.0).eval()
    lesion = int(torch.nonzero(batch["is_lesion"])[0, 0])
    plain = [int(i) for i in torch.nonzero(~batch["is_lesion"])[:, 0]]
    views = {v: batch[v].clone() for v in ("image_v1", "image_v2")}
    for v in views:  # sample plain[0] becomes a copy of the lesion sample
        views[v][plain[0]] = batch[v][lesion]

    def gain(lesion_samples: list[int]) -> float:
        flags = torch.zeros(8, dtype=torch.bool)
        flags[lesion_samples] = True
        with torch.no_grad():
            return float(method({**views, "is_lesion": flags})["loss"] - method(views)["loss"])

    similar, dissimilar = gain([lesion, plain[0]]), gain([plain[1], plain[2]])
    assert similar > dissimilar > 0


def test_momentum_branch_is_an_ema_of_encoder_and_projector(batch):
    method = _method()
    assert [id(a) for a, _ in method.momentum_pairs()] == [id(method.backbone), id(method.projector)]
    for online, ema in method.momentum_pairs():
        assert all(not p.requires_grad for p in ema.parameters())
        for (n, a), b in zip(online.named_parameters(), ema.parameters()):
            assert torch.equal(a, b), n  # starts as a copy
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    before = copy.deepcopy([ema.state_dict() for _, ema in method.momentum_pairs()])
    method.update_momentum(0.99)
    for (online, ema), old in zip(method.momentum_pairs(), before):
        for name, p in online.named_parameters():
            expected = 0.99 * old[name] + 0.01 * p.detach()
            torch.testing.assert_close(ema.state_dict()[name], expected, rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in method.predictor.parameters())


def test_training_moves_momentum_and_validation_changes_nothing(demo_dir, tmp_path):
    ds = _dataset(demo_dir, lesion_prob=0.5)
    method = _method()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    trainer = SSLTrainer("cpu", 1, make_loader(ds, batch_size=4, num_samples=8, drop_last=True), method, opt,
                         train_handlers=[MomentumUpdateHandler(0.99, schedule="cosine")], channels_last=False)
    ema_before = copy.deepcopy(method.momentum_backbone.state_dict())
    trainer.run()
    assert any(not torch.equal(v, ema_before[k]) for k, v in method.momentum_backbone.state_dict().items())
    before = copy.deepcopy(method.state_dict())
    evaluator = SSLEvaluator("cpu", make_loader(ds, batch_size=4, num_samples=8, shuffle=False), method,
                             channels_last=False)
    evaluator.run()
    after = method.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert torch.isfinite(evaluator.state.output["loss"])


@pytest.mark.parametrize("name,opts", [
    ("mambaout", TINY),
    ("resnet18", {"widen_factor": 0.125}),
    ("vit", {"img_size": SIZE, "patch_size": 8, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "conv_stem": True}),
])
def test_every_online_parameter_gets_a_gradient(batch, name, opts):
    """So DistributedDataParallel runs without find_unused_parameters (multi_gpu_train.json)."""
    torch.manual_seed(0)
    method = LeCL(build_slice_encoder(name, in_channels=3, **opts), 16, 32, 32).train()
    method(batch)["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(p.grad is None for p in method.momentum_backbone.parameters())


def test_rejects_encoder_without_out_dim():
    with pytest.raises(ValueError, match="out_dim"):
        LeCL(torch.nn.Conv2d(3, 4, 3))


def test_in_channels_and_preprocessing(demo_dir):
    assert slice_channels(1) == 3 and slice_channels(0) == 1
    assert slice_channels(1, ["lung", "soft_tissue", "bone"]) == 9
    with pytest.raises(ConfigError, match="windows: unknown window 'lungs'"):
        slice_channels(1, ["lungs"])
    with pytest.raises(ConfigError, match="use preset 'ct'"):
        slice_preset("mri", windows=["lung"])
    with pytest.raises(ConfigError, match="preset must be"):
        slice_preset("pet")
    ct = str(demo_dir / "ct" / "example_ct_sm.nii.gz")
    hu = slice_preset("ct", keys=["image"], windows=["lung", "bone"])({"image": ct})["image"]
    unit = slice_preset("ct", keys=["image"])({"image": ct})["image"]
    assert float(hu.min()) < -500 and float(hu.max()) > 500  # HU kept for the window channels
    assert 0.0 <= float(unit.min()) and float(unit.max()) <= 1.0 and unit.shape == hu.shape


def test_datalist_with_masks_and_boxes(demo_dir, tmp_path):
    items = lesion_datalist(demo_dir / "nrrd" / "datalist.csv")
    assert items[0]["label"].endswith("breast1_label.nrrd") and items[0]["case_index"] == 0
    folder = lesion_datalist(demo_dir / "hippocampus")
    assert len(folder) == 20 and all("label" in d for d in folder)
    boxes = tmp_path / "boxes.csv"
    with open(boxes, "w", newline="") as f:
        csv.writer(f).writerows([["case", "slice", "x1", "y1", "x2", "y2"], ["hippocampus_004", 10, 5, 6, 15, 20],
                                 ["hippocampus_004", 12, 8, 8, 12, 12]])
    with_boxes = lesion_datalist(demo_dir / "hippocampus", lesion_boxes_csv=boxes)
    first = with_boxes[0]
    assert "label" not in first and first["boxes"].shape == (2, 6)
    np.testing.assert_array_equal(first["boxes"][0], [0, 10, 5, 6, 15, 20])
    assert all("boxes" not in d for d in with_boxes[1:])
    assert len(lesion_datalist(demo_dir / "hippocampus", cases=["hippocampus_006"])) == 1
    with pytest.raises(ConfigError, match="dataset_dir '.*nope' does not exist"):
        lesion_datalist(tmp_path / "nope")
    with open(boxes, "w", newline="") as f:
        csv.writer(f).writerows([["case", "slice", "x1", "y1", "x2", "y2"], ["someone_else", 1, 1, 1, 4, 4]])
    with pytest.raises(ConfigError, match="none of its cases"):
        lesion_datalist(demo_dir / "hippocampus", lesion_boxes_csv=boxes)
