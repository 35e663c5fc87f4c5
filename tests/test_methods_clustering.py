"""Patch/pixel clustering methods, voxel teachers, the pseudo-label cache (k-means fitted once) and the montage."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medvol.cluster import (
    EncoderTeacher,
    HandcraftedTeacher,
    KMeans,
    VoxelFeatures,
    build_pseudolabels,
    cluster_montage,
    cluster_palette,
    montage_rgb,
    pseudolabel_datalist,
    sinkhorn,
)
from medvol.errors import ConfigError
from medvol.methods import PatchClustering, PixelClustering
from medvol.networks import UNet3D
from medvol.transforms import get_preset, roi_align_pair


def _boxes(*pairs):
    b1 = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    b2 = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    return b1, b2


OVERLAP = ([[0, 0, 0], [16, 16, 16]], [[4, 2, 0], [24, 20, 16]])
APART = ([[0, 0, 0], [16, 16, 16]], [[30, 30, 30], [40, 40, 40]])


# ---- patch-level --------------------------------------------------------------------------------------------


def test_patch_tokens_come_from_the_stride_8_level():
    assert PatchClustering(UNet3D(channels=(4, 8, 16, 32)), proj_dim=8, num_prototypes=5).token_level == 3
    deep = PatchClustering(UNet3D(channels=(4, 8, 16, 32, 32)), proj_dim=8, num_prototypes=5)
    assert (deep.token_level, deep.token_stride) == (3, (8, 8, 8))  # not the /16 bottleneck
    shallow = PatchClustering(UNet3D(channels=(4, 8, 16)), proj_dim=8, num_prototypes=5)
    assert (shallow.token_level, shallow.token_stride) == (2, (4, 4, 4))  # no /8 level: the bottleneck
    with pytest.raises(ValueError, match="token_level"):
        PatchClustering(UNet3D(channels=(4, 8, 16)), token_level=5)


def test_patch_loss_matches_reference_and_trains_the_encoder():
    torch.manual_seed(0)
    method = PatchClustering(UNet3D(channels=(4, 8, 16)), proj_dim=8, num_prototypes=6, temperature=0.1)
    b1, b2 = _boxes(OVERLAP, OVERLAP)
    x1, x2 = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)  # off the sphere: the training step must renormalise it
    out = method({"image_v1": x1, "image_v2": x2, "box_v1": b1, "box_v2": b2})
    w = method.prototypes.weight.detach()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(6))
    with torch.no_grad():  # the same loss written out: tokens, ROI alignment, Sinkhorn of the other view, CE
        z = method.embed(torch.cat([x1, x2]))
        a1, a2, valid = roi_align_pair(*z.chunk(2), b1, b2)
        s1 = F.normalize(a1.transpose(1, 2).reshape(-1, 8), dim=1) @ w.t()
        s2 = F.normalize(a2.transpose(1, 2).reshape(-1, 8), dim=1) @ w.t()
        ce = lambda s, q: -(q * torch.log_softmax(s / 0.1, dim=1)).sum(1).mean()  # noqa: E731
        expected = 0.5 * (ce(s1, sinkhorn(s2, 3, 0.05)) + ce(s2, sinkhorn(s1, 3, 0.05)))
    assert valid.all() and s1.shape == (2 * 4 ** 3, 6)
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert method.backbone.encoder.levels[0].convs[0].conv.weight.grad.abs().sum() > 0
    assert method.projection.weight.grad.abs().sum() > 0 and method.prototypes.weight.grad.abs().sum() > 0


def test_patch_pairs_without_overlap_are_left_out():
    torch.manual_seed(1)
    method = PatchClustering(UNet3D(channels=(4, 8, 16)), proj_dim=8, num_prototypes=6)
    x = torch.rand(2, 1, 16, 16, 16)
    y = torch.rand(2, 1, 16, 16, 16)
    b1, b2 = _boxes(OVERLAP, APART)
    mixed = method({"image_v1": x, "image_v2": y, "box_v1": b1, "box_v2": b2})
    b1, b2 = _boxes(OVERLAP)
    alone = method({"image_v1": x[:1], "image_v2": y[:1], "box_v1": b1, "box_v2": b2})
    assert int(mixed["overlap_pairs"]) == 1
    torch.testing.assert_close(mixed["loss"], alone["loss"])  # instance norm: samples do not interact
    b1, b2 = _boxes(APART, APART)
    none = method({"image_v1": x, "image_v2": y, "box_v1": b1, "box_v2": b2})
    none["loss"].backward()
    assert none["loss"].item() == 0.0


def test_patch_eval_does_not_touch_the_prototypes():
    method = PatchClustering(UNet3D(channels=(4, 8, 16)), proj_dim=8, num_prototypes=6).eval()
    with torch.no_grad():
        method.prototypes.weight.mul_(2.0)
    before = method.prototypes.weight.clone()
    b1, b2 = _boxes(OVERLAP)
    with torch.no_grad():
        method({"image_v1": torch.rand(1, 1, 16, 16, 16), "image_v2": torch.rand(1, 1, 16, 16, 16),
                "box_v1": b1, "box_v2": b2})
    assert torch.equal(method.prototypes.weight, before)


# ---- pixel-level ---------------------------------------------------------------------------------------------


def test_pixel_needs_k_output_channels():
    with pytest.raises(ValueError, match="out_channels=5"):
        PixelClustering(UNet3D(channels=(4, 8), out_channels=1), num_clusters=5)


def test_pixel_loss_is_swapped_ce_on_the_overlap():
    torch.manual_seed(2)
    k = 5
    method = PixelClustering(UNet3D(channels=(4, 8, 16), out_channels=k), num_clusters=k)
    x1, x2 = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    p1 = torch.randint(0, k, (1, 1, 16, 16, 16), dtype=torch.uint8)
    p2 = torch.randint(0, k, (1, 1, 16, 16, 16), dtype=torch.uint8)
    same = torch.tensor([[[0.0, 0, 0], [16, 16, 16]]])
    out = method({"image_v1": x1, "image_v2": x2, "pseudolabel_v1": p1, "pseudolabel_v2": p2, "box_v1": same,
                  "box_v2": same})
    with torch.no_grad():
        g1, g2 = method.backbone(torch.cat([x1, x2])).chunk(2)
    expected = 0.5 * (F.cross_entropy(g1, p2[:, 0].long()) + F.cross_entropy(g2, p1[:, 0].long()))
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    assert out["overlap_fraction"].item() == 1.0
    # view 2 shifted by 8 voxels along x: only half of each view is shared, and labels move with the anatomy
    shifted = torch.tensor([[[8.0, 0, 0], [24, 16, 16]]])
    out = method({"image_v1": x1, "image_v2": x2, "pseudolabel_v1": p1, "pseudolabel_v2": p2, "box_v1": same,
                  "box_v2": shifted})
    lp1, lp2 = torch.log_softmax(g1, 1), torch.log_softmax(g2, 1)
    ce1 = -lp1[:, :, 8:].gather(1, p2[:, :, :8].long()).mean()  # view 1 voxels x>=8 are view 2 voxels x<8
    ce2 = -lp2[:, :, :8].gather(1, p1[:, :, 8:].long()).mean()
    torch.testing.assert_close(out["loss"], 0.5 * (ce1 + ce2), rtol=1e-5, atol=1e-6)
    assert out["overlap_fraction"].item() == 0.5
    out["loss"].backward()
    assert method.backbone.head.conv.weight.grad.abs().sum() > 0


# ---- teachers ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volumes(demo_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("hippo_images")
    files = sorted((demo_dir / "hippocampus" / "imagesTr").iterdir())[:4]
    for f in files:
        shutil.copy(f, root / f.name)
    return sorted(root.iterdir())


PRE = {"name": "mri", "keys": ["image"], "size": (32, 48, 32), "crop_foreground": False}


def _window_stats(x: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over the w^3 window of each voxel, counting only voxels inside the volume (slow loop)."""
    r = w // 2
    total, sq, count = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    pad = np.pad(x, r, constant_values=np.nan)
    for dx in range(w):
        for dy in range(w):
            for dz in range(w):
                v = pad[dx:dx + x.shape[0], dy:dy + x.shape[1], dz:dz + x.shape[2]]
                ok = ~np.isnan(v)
                total += np.where(ok, v, 0)
                sq += np.where(ok, v * v, 0)
                count += ok
    mean = total / count
    return mean, np.sqrt(np.maximum(sq / count - mean ** 2, 0))


def test_handcrafted_features_against_numpy(volumes):
    image = get_preset(**PRE)({"image": str(volumes[0])})["image"]
    feats = HandcraftedTeacher(0.05)(image)
    assert feats.dim == 6 and feats.spatial_shape == (32, 48, 32)
    every = feats.at(torch.arange(feats.num_voxels))  # (n, 6)
    torch.testing.assert_close(torch.cat(list(feats.chunks(1000))), every)
    x = np.asarray(image[0], dtype=np.float64)
    p = np.pad(x, 1, mode="edge")
    grads = [(p[2:, 1:-1, 1:-1] - p[:-2, 1:-1, 1:-1]) / 2, (p[1:-1, 2:, 1:-1] - p[1:-1, :-2, 1:-1]) / 2,
             (p[1:-1, 1:-1, 2:] - p[1:-1, 1:-1, :-2]) / 2]
    raw = [x, np.sqrt(sum(g ** 2 for g in grads)), *_window_stats(x, 3), *_window_stats(x, 7)]
    fg = x > 0.05
    want = np.stack([(f - f[fg].mean()) / f[fg].std(ddof=1) for f in raw], axis=-1).reshape(-1, 6)
    np.testing.assert_allclose(every.numpy(), want, atol=1e-3)  # float32 E[x^2] - E[x]^2


def test_encoder_teacher_upsamples_trilinearly_and_loads_the_checkpoint(tmp_path):
    torch.manual_seed(3)
    source = UNet3D(channels=(4, 8, 16))
    torch.save(source.state_dict(), tmp_path / "model.pt")
    teacher = EncoderTeacher(UNet3D(channels=(4, 8, 16)), tmp_path / "model.pt")
    for a, b in zip(teacher.backbone.encoder.state_dict().values(), source.encoder.state_dict().values()):
        assert torch.equal(a, b)
    image = torch.rand(1, 16, 18, 12)  # 18 is padded to 20 for the /4 encoder
    feats = teacher(image)
    assert feats.dim == 4 + 8 + 16 and feats.extent == (16, 20, 12)
    every = feats.at(torch.arange(feats.num_voxels))
    torch.testing.assert_close(every.norm(dim=1), torch.ones(feats.num_voxels))
    with torch.no_grad():
        maps = source.encode(F.pad(image[None], (0, 0, 0, 2)))
    parts = []
    for m in maps:  # F.interpolate(trilinear, align_corners=False) to the padded size, crop, L2 per level
        up = F.interpolate(m, size=(16, 20, 12), mode="trilinear", align_corners=False)[0, :, :, :18]
        parts.append(F.normalize(up.flatten(1).t(), dim=1))
    torch.testing.assert_close(every, torch.cat(parts, 1) / np.sqrt(3), atol=1e-4, rtol=1e-3)


def test_voxel_features_at_arbitrary_voxels():
    maps = [torch.arange(24.0).reshape(1, 2, 3, 4)]
    feats = VoxelFeatures(maps, (2, 3, 4))
    torch.testing.assert_close(feats.at(torch.tensor([0, 5, 23])), torch.tensor([[0.0], [5.0], [23.0]]))


# ---- pseudo-label cache ----------------------------------------------------------------------------------------


def _build(volumes, out, **kw):
    datalist = [{"image": str(v)} for v in volumes]
    args = dict(num_clusters=4, max_samples=3000, per_volume_quota=1000, kmeans_device="cpu", montage_volumes=2)
    return build_pseudolabels(datalist, get_preset(**PRE), HandcraftedTeacher(0.05), out, **{**args, **kw})


def test_pseudolabels_fit_once_write_aligned_maps_and_resume(volumes, tmp_path, count_fits):
    summary = _build(volumes, tmp_path)
    assert count_fits == [4000] and summary["fitted"]  # one fit streaming 4 x 1000 voxels (3000 kept in memory)
    assert summary["counts"] == {"ok": 4, "failed": 0, "skipped": 0}
    meta = KMeans.read_metadata(summary["centroids"])
    assert meta["k"] == 4 and meta["feature_source"].startswith("handcrafted")
    pre = get_preset(**PRE)
    rows = list(__import__("csv").DictReader(open(summary["manifest"])))
    assert [r["status"] for r in rows] == ["ok"] * 4
    for row, vol in zip(rows, volumes):
        img = nib.load(row["output"])
        ref = pre({"image": str(vol)})["image"]
        labels = np.asarray(img.dataobj)
        assert img.get_data_dtype() == np.uint8 and labels.shape == tuple(ref.shape[1:])
        assert np.allclose(img.affine, ref.affine.numpy(), atol=1e-5)
        assert labels.min() >= 0 and labels.max() < 4 and len(np.unique(labels)) > 1
    assert not list((tmp_path / "pseudolabels").glob(".*tmp"))  # atomic writes leave no temp files
    assert (tmp_path / "cluster_montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = {r["output"]: Path(r["output"]).read_bytes() for r in rows}
    Path(rows[1]["output"]).unlink()  # as if killed before this volume was written
    again = _build(volumes, tmp_path)
    assert count_fits == [4000] and not again["fitted"]  # resumed: the saved centroids are reused
    assert again["counts"] == {"ok": 1, "failed": 0, "skipped": 3}
    assert all(Path(p).read_bytes() == b for p, b in before.items())  # same labels, byte for byte

    redo = _build(volumes, tmp_path, overwrite=True)
    assert len(count_fits) == 2 and redo["counts"]["ok"] == 4
    with pytest.raises(ConfigError, match="overwrite true"):
        _build(volumes, tmp_path, num_clusters=5)


def test_failed_volume_is_named_in_the_manifest(volumes, tmp_path, count_fits):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a volume")
    summary = _build([*volumes[:2], bad], tmp_path / "out")
    assert count_fits == [2000] and summary["counts"] == {"ok": 2, "failed": 1, "skipped": 0}
    rows = {r["source"]: r for r in __import__("csv").DictReader(open(summary["manifest"]))}
    assert rows[str(bad)]["status"] == "failed" and str(bad) in rows[str(bad)]["error"]
    with pytest.raises(ConfigError, match="broken.nii.gz"):
        pseudolabel_datalist([{"image": str(bad)}], tmp_path / "out" / "pseudolabels")


def test_pseudolabel_datalist_requires_the_cluster_step(volumes, tmp_path):
    datalist = [{"image": str(v)} for v in volumes[:2]]
    with pytest.raises(ConfigError, match=r"run `python -m monai.bundle run cluster .*` first"):
        pseudolabel_datalist(datalist, tmp_path / "pseudolabels", 4)
    _build(volumes[:2], tmp_path, montage_volumes=0)
    items = pseudolabel_datalist(datalist, tmp_path / "pseudolabels", 4)
    assert [Path(d["pseudolabel"]).name for d in items] == [Path(v).name for v in volumes[:2]]
    with pytest.raises(ConfigError, match="num_clusters=6"):
        pseudolabel_datalist(datalist, tmp_path / "pseudolabels", 6)


# ---- montage -------------------------------------------------------------------------------------------------


def test_montage_shows_one_colour_per_cluster_present(tmp_path):
    import matplotlib.image as mpimg

    k = 8
    palette = cluster_palette(k)
    assert len({tuple(c) for c in palette}) == k and not any(c[0] == c[1] == c[2] for c in palette)
    rng = np.random.default_rng(0)
    image = rng.random((20, 24, 10)).astype(np.float32)
    labels = np.zeros((20, 24, 10), np.int64)
    labels[:, 8:16] = 3
    labels[:, 16:] = 6  # clusters 0, 3 and 6 present
    rgb, present = montage_rgb([("a", image, labels), ("b", image, labels)], k)
    assert present == [0, 3, 6] and rgb.dtype == np.uint8 and rgb.ndim == 3
    path = cluster_montage([("a", image, labels), ("b", image, labels)], tmp_path / "m.png", k, title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = np.round(mpimg.imread(path)[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(pixels, axis=0)}
    shown = [c for c in range(k) if tuple(palette[c]) in colours]
    assert shown == [0, 3, 6]
