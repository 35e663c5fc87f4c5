"""PCRLv2, SwinUNETR self-supervised and VoCo: their views, forward passes and SwinUNETR checkpoint layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import SwinUNETR

from medvol.methods import PCRLv2, SwinSSL, VoCo, monai_swinvit_checkpoint, swinvit_state_dict
from medvol.networks import SwinBackbone, UNet3D
from medvol.transforms import RandLocalCropsd, RandRotate90Class, RandRotate90Classd, VoCoCrops, grid_overlap

TINY_SWIN = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (3, 6, 12, 24)}


# ---- views -------------------------------------------------------------------------------------------------


def test_rotation_class_names_the_rotation():
    img = torch.arange(2 * 4**3, dtype=torch.float32).reshape(2, 4, 4, 4)
    rot = RandRotate90Class(planes=[(0, 1), (1, 2)])
    assert rot.num_classes == 7
    seen = set()
    for seed in range(60):
        rot.set_random_state(seed)
        out, label = rot(img)
        seen.add(label)
        if label == 0:
            assert torch.equal(out, img)
        else:
            plane, k = divmod(label - 1, 3)
            a, b = rot.planes[plane]
            assert torch.equal(out, torch.rot90(img, k + 1, dims=(1 + a, 1 + b)))
    assert seen == set(range(7))
    rot.label = 4  # a rotation in the plane of axes (1, 2), whose sides (4, 3) differ
    with pytest.raises(ValueError, match="not square"):
        rot(torch.rand(1, 4, 4, 3), randomize=False)


def test_rotation_dict_rotates_keys_together_and_writes_the_label():
    d = {"a": torch.rand(1, 4, 4, 4), "b": torch.rand(1, 4, 4, 4)}
    t = RandRotate90Classd(["a", "b"], label_key="rot", planes=[(0, 1)]).set_random_state(3)
    out = t(dict(d))
    k = int(out["rot"])
    assert out["rot"].dtype == torch.int64 and 0 <= k < 4
    for key in ("a", "b"):
        assert torch.equal(out[key], torch.rot90(d[key], k, dims=(1, 2)))


def test_local_crops_lie_in_the_union_of_the_global_boxes():
    x = torch.zeros(1, 30, 30, 30)
    x[:, 5:15, 10:20, 0:12] = 1.0  # the union of the two boxes below
    d = {"image": x, "box_v1": torch.tensor([[5.0, 10, 0], [12, 20, 8]]), "box_v2": torch.tensor([[8.0, 12, 4],
                                                                                               [15, 18, 12]])}
    out = RandLocalCropsd("image", roi_size=(4, 4, 4), num_crops=5, scale_range=(0.2, 0.5)).set_random_state(0)(d)
    for i in range(5):
        assert out[f"image_local{i}"].shape == (1, 4, 4, 4)
        assert torch.all(out[f"image_local{i}"] == 1.0)  # sampled only inside the union


def test_grid_overlap_counts_voxels():
    grid, base = (2, 3, 1), (4, 4, 6)
    rng = np.random.default_rng(0)
    for _ in range(5):
        start = [int(rng.integers(0, g * b - b + 1)) for g, b in zip(grid, base)]
        mask = np.zeros([g * b for g, b in zip(grid, base)], bool)
        mask[tuple(slice(s, s + b) for s, b in zip(start, base))] = True
        expected = [mask[i * 4:(i + 1) * 4, j * 4:(j + 1) * 4].sum() / mask.sum() for i in range(2) for j in range(3)]
        np.testing.assert_allclose(grid_overlap(start, base, grid, base), expected)


def test_voco_crops_tile_the_region_and_label_random_crops():
    x = torch.rand(1, 12, 16, 6)
    voco = VoCoCrops(grid=(2, 2, 1), base_size=(6, 8, 6), out_size=(6, 8, 6), num_crops=3).set_random_state(1)
    bases, crops, labels, starts = voco(x)
    assert bases.shape == (4, 1, 6, 8, 6) and crops.shape == (3, 1, 6, 8, 6) and labels.shape == (3, 4)
    tiled = torch.cat([torch.cat([bases[0], bases[1]], 2), torch.cat([bases[2], bases[3]], 2)], 1)
    torch.testing.assert_close(tiled, x)  # no resizing here, the region is the whole volume
    for crop, start, label in zip(crops, starts, labels):
        torch.testing.assert_close(crop, x[:, start[0]:start[0] + 6, start[1]:start[1] + 8, start[2]:start[2] + 6])
        torch.testing.assert_close(label, torch.as_tensor(grid_overlap(start, (6, 8, 6), (2, 2, 1), (6, 8, 6)),
                                                          dtype=torch.float32))
    small = VoCoCrops(grid=(2, 2, 1), base_size=(8, 8, 8), out_size=(4, 4, 4), num_crops=1)(torch.rand(1, 5, 5, 5))
    assert small[0].shape == (4, 1, 4, 4, 4)  # padded up to the grid region
    with pytest.raises(ValueError, match="at least two"):
        VoCoCrops(grid=(1, 1, 1))


# ---- methods -----------------------------------------------------------------------------------------------


def _grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def test_pcrlv2_needs_a_skip_free_unet_and_trains_its_encoder():
    with pytest.raises(ValueError, match="skip=False"):
        PCRLv2(UNet3D(channels=(4, 8, 16)))
    torch.manual_seed(0)
    method = PCRLv2(UNet3D(channels=(4, 8, 16), skip=False), num_local=2, beta_epochs=4)
    assert method.batch_keys == ("image_v1", "image_v2", "target_v1", "image_local0", "image_local1")
    batch = {"image_v1": torch.rand(2, 1, 16, 16, 16), "image_v2": torch.rand(2, 1, 16, 16, 16),
             "target_v1": torch.rand(2, 1, 16, 16, 16), "image_local0": torch.rand(2, 1, 8, 8, 8),
             "image_local1": torch.rand(2, 1, 8, 8, 8)}
    out = method(batch)
    expected = out["loss_restore"] + out["loss_global"] + out["loss_scale"] + out["loss_local"]  # beta 1 at epoch 1
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert -1 <= out["loss_global"].item() <= 1 and -1 <= out["loss_local"].item() <= 1
    out["loss"].backward()
    assert all(g is not None and torch.isfinite(g).all() for g in _grads(method.backbone.encoder))
    method.on_epoch_start(3)
    assert method.beta == pytest.approx(0.5 * (1 + np.cos(np.pi * 2 / 4)))
    method.on_epoch_start(10)
    assert method.beta == pytest.approx(0.0, abs=1e-12)


def test_voco_forward_and_gradients():
    torch.manual_seed(0)
    method = VoCo(UNet3D(channels=(4, 8, 16)), hidden_dim=16, proj_dim=8)
    voco = VoCoCrops(grid=(2, 2, 1), base_size=(8, 8, 8), out_size=(8, 8, 8), num_crops=2)
    views = [voco.set_random_state(s)(torch.rand(1, 16, 16, 8)) for s in range(2)]
    batch = {"image_bases": torch.stack([v[0] for v in views]), "image_crops": torch.stack([v[1] for v in views]),
             "overlap": torch.stack([v[2] for v in views])}
    out = method(batch)
    assert out["loss"].item() == pytest.approx((out["loss_pred"] + out["loss_reg"]).item(), rel=1e-6)
    out["loss"].backward()
    assert all(g is not None for g in _grads(method.backbone.encoder))
    with pytest.raises(ValueError, match="overlap"):
        method({**batch, "overlap": batch["overlap"][:, :1]})


def test_swin_ssl_forward_uses_the_swin_vit_only():
    with pytest.raises(ValueError, match="swinViT"):
        SwinSSL(UNet3D(channels=(4, 8)))
    torch.manual_seed(0)
    method = SwinSSL(SwinBackbone(**TINY_SWIN), contrast_dim=16)
    x = torch.rand(2, 1, 32, 32, 32)
    batch = {"image_v1": x, "image_v2": x.flip(2), "target_v1": x, "target_v2": x.flip(2),
             "rot_v1": torch.tensor([0, 1]), "rot_v2": torch.tensor([2, 3])}
    out = method(batch)
    total = out["loss_inpaint"] + out["loss_rot"] + out["loss_contrast"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    out["loss"].backward()
    assert all(g is not None for g in _grads(method.backbone.encoder.swinViT))
    assert method.backbone.encoder.encoder10.layer.conv1.conv.weight.grad is None  # conv blocks are not trained


def test_swinvit_checkpoint_loads_with_monai_load_from_and_load_state_dict():
    """The exported layout is the published model_swinvit.pt's: SwinUNETR.load_from copies every Swin weight."""
    torch.manual_seed(0)
    backbone = SwinBackbone(**TINY_SWIN)
    checkpoint = monai_swinvit_checkpoint(backbone.state_dict())
    keys = checkpoint["state_dict"]
    assert all(k.startswith("module.") for k in keys) and "module.patch_embed.proj.weight" in keys
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in keys and not any("linear1" in k for k in keys)
    net = SwinUNETR(in_channels=1, out_channels=3, **TINY_SWIN)
    net.load_from(checkpoint)
    mine = backbone.encoder.swinViT.state_dict()
    for key, value in net.swinViT.state_dict().items():  # load_from skips nothing the blocks hold
        torch.testing.assert_close(value, mine[key], msg=key)
    other = SwinUNETR(in_channels=1, out_channels=3, **TINY_SWIN)
    other.swinViT.load_state_dict(swinvit_state_dict(checkpoint), strict=True)
    with pytest.raises(ValueError, match="not a SwinUNETR"):
        monai_swinvit_checkpoint(UNet3D(channels=(4, 8)).state_dict())
