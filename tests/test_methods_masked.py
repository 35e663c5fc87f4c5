"""MAE on UNETR: encoder on visible tokens only, masked input never reaches the reconstruction, gradients, errors;
SparK/MAE backbones load into the few-shot network by prefix."""

from __future__ import annotations

import pytest
import torch

from medvol.methods import MAE, SparK
from medvol.networks import UNet3D, UNETRBackbone, build_backbone, load_pretrained
from medvol.transforms import RandPatchMask

TINY = dict(hidden_size=24, mlp_dim=48, num_heads=2, feature_size=4)


def _mask(n, grid_image, ratio=0.75, seed=0):
    t = RandPatchMask(16, ratio)
    t.set_random_state(seed=seed)
    return torch.stack([t(torch.zeros(1, *grid_image)) for _ in range(n)])


@pytest.fixture
def mae():
    torch.manual_seed(0)
    return MAE(UNETRBackbone(img_size=(32, 48, 32), **TINY), decoder_dim=12, decoder_depth=1, decoder_heads=2)


def test_mae_encoder_sees_visible_patches_only(mae):
    x = torch.rand(2, 1, 32, 48, 32)
    mask = _mask(2, (32, 48, 32))  # 12 patches, 9 masked
    latent, index = mae.encode_visible(x, mask)
    assert latent.shape == (2, 3, 24) and index.shape == (2, 3)
    assert not mask.reshape(2, -1).gather(1, index).any()  # the indices are the visible patches
    # perturbing the masked patches changes nothing the method computes from the input
    vox = mask.float().repeat_interleave(16, 2).repeat_interleave(16, 3).repeat_interleave(16, 4)
    x2 = x + 5 * torch.randn_like(x) * vox
    mae.eval()
    with torch.no_grad():
        torch.testing.assert_close(mae.reconstruct(x, mask), mae.reconstruct(x2, mask), rtol=0, atol=1e-5)
        assert float((mae.reconstruct(x, mask) - mae.reconstruct(x, ~mask)).abs().max()) > 1e-4


def test_mae_gradients_and_errors(mae):
    x = torch.rand(2, 1, 32, 48, 32)
    out = mae({"image": x, "mask": _mask(2, (32, 48, 32))})
    out["loss"].backward()
    assert out["loss"].ndim == 0 and float(out["mask_ratio"]) == 0.75
    assert mae.mask_token.grad.abs().sum() > 0 and mae.decoder_pred.weight.grad.abs().sum() > 0
    assert mae.backbone.encoder.vit.patch_embedding.patch_embeddings.weight.grad.abs().sum() > 0
    assert not mae.decoder_pos.requires_grad
    uneven = _mask(2, (32, 48, 32))
    uneven[0, 0, 0, 0, 0] = ~uneven[0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="same number"):
        mae({"image": x, "mask": uneven})
    with pytest.raises(ValueError, match="patch grid"):
        mae({"image": x, "mask": torch.zeros(2, 1, 2, 2, 2, dtype=torch.bool)})
    with pytest.raises(TypeError, match="UNETRBackbone"):
        MAE(UNet3D(channels=(4, 8)))
    with pytest.raises(ValueError, match="divisible by 6"):
        MAE(UNETRBackbone(img_size=32, **TINY), decoder_dim=16, decoder_heads=2)


def test_pretrained_backbones_load_into_the_fewshot_networks(mae):
    # SparK: the whole U-Net (encoder + decoder) transfers; only the head differs (3 classes)
    spark = SparK(UNet3D(channels=(4, 8, 16)))
    seg = UNet3D(channels=(4, 8, 16), out_channels=3)
    report = load_pretrained(seg, spark.backbone.state_dict(), prefixes=("encoder.", "decoder."))
    assert report["loaded"] and not report["missing"] and not report["skipped_shape"]
    # MAE: the ViT transfers into a UNETR of the same img_size
    seg = build_backbone("unetr", out_channels=3, img_size=(32, 48, 32), **TINY)
    report = load_pretrained(seg, mae.backbone.state_dict(), prefixes=("encoder.vit.",))
    assert not report["missing"] and not report["skipped_shape"]
    torch.testing.assert_close(seg.encoder.vit.patch_embedding.position_embeddings,
                               mae.backbone.encoder.vit.patch_embedding.position_embeddings)
