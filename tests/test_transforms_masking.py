"""RandPatchMask(d): exact masked count on the patch grid, seeded reproducibility, errors."""

from __future__ import annotations

import pytest
import torch

from medvol.transforms import RandPatchMask, RandPatchMaskd


def test_mask_shape_count_and_seed():
    t = RandPatchMask(patch_size=(4, 4, 2), ratio=0.6)
    t.set_random_state(seed=3)
    a = t(torch.zeros(1, 16, 8, 8))
    assert a.shape == (1, 4, 2, 4) and a.dtype == torch.bool
    assert int(a.sum()) == round(0.6 * 32)
    t.set_random_state(seed=3)
    assert torch.equal(t(torch.zeros(1, 16, 8, 8)), a)
    assert not torch.equal(t(torch.zeros(1, 16, 8, 8)), a)  # a new draw
    # at least one masked and one visible patch
    assert int(RandPatchMask(4, 0.01)(torch.zeros(1, 8, 8, 4)).sum()) == 1
    assert int(RandPatchMask(4, 0.99)(torch.zeros(1, 8, 8, 4)).sum()) == 3


def test_dict_version_and_errors():
    d = RandPatchMaskd("image", patch_size=8, ratio=0.75).set_random_state(seed=0)
    out = d({"image": torch.zeros(1, 32, 32, 16)})
    assert out["mask"].shape == (1, 4, 4, 2) and int(out["mask"].sum()) == 24
    d2 = RandPatchMaskd("image", patch_size=8, ratio=0.75).set_random_state(seed=0)
    assert torch.equal(d2({"image": torch.zeros(1, 32, 32, 16)})["mask"], out["mask"])
    with pytest.raises(ValueError, match="ratio"):
        RandPatchMask(4, 1.0)
    with pytest.raises(ValueError, match="divisible"):
        RandPatchMask(4, 0.5)(torch.zeros(1, 6, 8, 8))
    with pytest.raises(ValueError, match="one image key"):
        RandPatchMaskd(["a", "b"], 4, 0.5)
