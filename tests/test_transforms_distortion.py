"""Models Genesis / CAiD distortions: the Bezier map against the curve's formula, shuffles are permutations inside
their blocks, painting fills only where it should, the recipe's probabilities are the paper's; on a real MRI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medvol.transforms import (
    RandBezierIntensity,
    RandBezierIntensityd,
    RandLocalPixelShuffle,
    RandLocalPixelShuffled,
    RandPainting,
    RandPaintingd,
    models_genesis_distortion,
    mri_preset,
)


@pytest.fixture(scope="module")
def crop(demo_dir) -> torch.Tensor:
    """A 24^3 crop of a hippocampus MRI in [0, 1], strictly positive."""
    pre = mri_preset(keys=("image",), size=(40, 56, 48), crop_foreground=False)
    vol = pre({"image": str(demo_dir / "hippocampus/imagesTr/hippocampus_004.nii.gz")})["image"].as_tensor()
    return vol[:, 8:32, 16:40, 12:36].clone().clamp(0.01, 1.0)


def bezier_reference(v: float, p1, p2, decreasing: bool) -> float:
    """From the formula: find t with B_x(t) = v by bisection, return B_y(t) (B_y(1 - t) when decreasing)."""

    def b(t, a, c):  # cubic Bezier coordinate with end points 0 and 1
        return 3 * (1 - t) ** 2 * t * a + 3 * (1 - t) * t ** 2 * c + t ** 3

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if b(mid, p1[0], p2[0]) < v else (lo, mid)
    t = (lo + hi) / 2
    return b(1 - t if decreasing else t, p1[1], p2[1])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_bezier_matches_the_curve(seed, crop):
    t = RandBezierIntensity(prob=1.0, num_points=20000)
    t.set_random_state(seed)
    y = t(crop)
    p1, p2, decreasing = t.points[1].copy(), t.points[2].copy(), t.decreasing
    assert y.shape == crop.shape and y.dtype == crop.dtype
    values = crop.flatten()[:: 97]
    ref = torch.tensor([bezier_reference(float(v), p1, p2, decreasing) for v in values])
    torch.testing.assert_close(y.flatten()[:: 97], ref.float(), atol=2e-4, rtol=0)
    order = torch.argsort(values)  # monotone: increasing, or decreasing for the flipped curve
    diffs = torch.diff(y.flatten()[:: 97][order])
    assert bool((diffs <= 1e-6).all()) if decreasing else bool((diffs >= -1e-6).all())


def test_bezier_draws_both_directions_and_keeps_prob(crop):
    t = RandBezierIntensityd("image", prob=0.9)
    seen, applied = set(), 0
    for seed in range(200):
        t.set_random_state(seed)
        out = t({"image": crop, "other": crop})
        applied += not torch.equal(out["image"], crop)
        if not torch.equal(out["image"], crop):
            seen.add(t.transform.decreasing)
        assert out["other"] is crop
    assert seen == {False, True} and abs(applied / 200 - 0.9) < 0.07


def test_local_shuffle_permutes_inside_blocks(crop):
    t = RandLocalPixelShuffle(prob=1.0, num_blocks=30, block_size=(0.1, 0.2))
    t.set_random_state(0)
    y = t(crop)
    assert not torch.equal(y, crop)
    torch.testing.assert_close(torch.sort(y.flatten()).values, torch.sort(crop.flatten()).values)  # a permutation
    inside = torch.zeros_like(crop, dtype=torch.bool)
    for start, end in t.blocks:
        sides = end - start
        assert ((sides >= 2) & (sides <= 5)).all()  # round(0.1 * 24) .. round(0.2 * 24) voxels per axis
        inside[(slice(None), *(slice(s, e) for s, e in zip(start, end)))] = True
    assert torch.equal(y[~inside], crop[~inside])  # voxels outside every block do not move
    sizes = {tuple(e - s) for s, e in t.blocks}
    assert len(sizes) > 5  # block sides are drawn independently, not non-decreasing as in MONAI's RandCoarse*


def test_local_shuffle_dict_applies_the_same_blocks(crop):
    t = RandLocalPixelShuffled(["a", "b"], prob=1.0, num_blocks=20, block_size=(0.1, 0.2))
    t.set_random_state(3)
    out = t({"a": crop, "b": crop * 2})
    assert not torch.equal(out["a"], crop)
    assert torch.equal((out["a"] == crop), (out["b"] == crop * 2))  # the same voxels moved in both


def test_inpainting_fills_boxes_with_noise(crop):
    t = RandPainting("in", num_boxes=3, box_size=(0.25, 0.4), fill=(0.0, 1.0), margin=3)
    t.set_random_state(0)
    y = t(crop)
    mask = torch.zeros_like(crop, dtype=torch.bool)
    for box in t.boxes:
        assert all(s.start >= 3 and s.stop <= 24 - 3 for s in box)
        mask[(slice(None), *box)] = True
    assert len(t.boxes) == 3 and torch.equal(y[~mask], crop[~mask])
    noise = y[mask]
    assert 0 <= noise.min() and noise.max() < 1 and abs(float(noise.mean()) - 0.5) < 0.05
    assert float(noise.std()) > 0.25  # uniform noise (std 0.29), not a constant


def test_outpainting_keeps_only_the_boxes(crop):
    t = RandPaintingd(["image", "label"], "out", num_boxes=(1, 2), box_size=(0.4, 0.6), fill=0.0)
    t.set_random_state(1)
    out = t({"image": crop, "label": torch.ones_like(crop)})
    kept = torch.zeros_like(crop, dtype=torch.bool)
    for box in t.transform.boxes:
        kept[(slice(None), *box)] = True
    assert torch.equal(out["image"][kept], crop[kept]) and bool((out["image"][~kept] == 0).all())
    assert torch.equal(out["label"] == 1, kept)  # the same boxes for every key


def test_box_count_distribution_of_models_genesis():
    """``extra_box_prob``: min boxes, then one more with probability p until a draw fails (Models Genesis' loop)."""
    t = RandPainting("in", num_boxes=(0, 5), extra_box_prob=0.95)
    t.set_random_state(0)
    counts = np.zeros(6)
    for _ in range(3000):
        t.randomize((24, 24, 24))
        counts[len(t.boxes)] += 1
    expected = [0.95 ** k * 0.05 for k in range(5)] + [0.95 ** 5]
    np.testing.assert_allclose(counts / 3000, expected, atol=0.025)


def test_models_genesis_recipe_probabilities(crop):
    """Shuffle 0.5, Bezier 0.9, painting 0.9 (out-painting 0.8 of it), as in the paper's code, in that order."""
    t = models_genesis_distortion("image", num_blocks=50)
    shuffle, bezier, paint = t.transforms
    n, hits = 400, {"shuffle": 0, "bezier": 0, "in": 0, "out": 0}
    painters = [p for p in paint.transforms if isinstance(p, RandPaintingd)]
    for seed in range(n):
        t.set_random_state(seed)
        for p in painters:  # only the branch OneOf picks draws (and sets _do_transform)
            p.transform._do_transform = False
        y = t({"image": crop})["image"]
        assert y.shape == crop.shape and bool(torch.isfinite(y).all())
        hits["shuffle"] += shuffle.transform._do_transform
        hits["bezier"] += bezier._do_transform
        for p in painters:
            hits[p.transform.mode] += p.transform._do_transform
    expected = {"shuffle": 0.5, "bezier": 0.9, "in": 0.9 * 0.2, "out": 0.9 * 0.8}
    for key, p in expected.items():
        assert abs(hits[key] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (key, hits[key])


@pytest.mark.parametrize("bad", [{"mode": "side"}, {"box_size": (0.5, 0.2)}, {"num_boxes": (3, 1)},
                                 {"extra_box_prob": 1.5}, {"margin": -1}])
def test_painting_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RandPainting(**bad)


def test_models_genesis_recipe_is_reproducible(crop):
    """The same seed gives the same distortion (resumed runs redraw the epoch's views exactly), another seed not."""
    t = models_genesis_distortion("image", num_blocks=50, shuffle_prob=1.0, nonlinear_prob=1.0, paint_prob=1.0)
    out = []
    for seed in (5, 5, 6):
        t.set_random_state(seed)
        out.append(t({"image": crop})["image"])
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
