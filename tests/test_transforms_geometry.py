"""Crop-box geometry: box overlap and IoU closed forms, ROI alignment of real crops, warping labels between views."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from medvol.transforms import (
    RandCropPaird,
    box_intersection,
    box_iou,
    overlap_points,
    roi_align_pair,
    sample_at,
    warp_to_view,
)


def test_box_intersection_and_iou_closed_form():
    a = np.array([[0.0, 0, 0], [4, 4, 4]])
    b = np.array([[2.0, 2, 2], [6, 6, 6]])
    assert box_iou(a, b) == 8 / (64 + 64 - 8)
    assert box_iou(a, a) == 1.0
    assert box_iou(a, np.array([[5.0, 0, 0], [9, 4, 4]])) == 0.0  # apart along one axis
    batch = torch.tensor([[[0.0, 0], [4, 4]], [[0.0, 0], [1, 1]]])
    lo, hi = box_intersection(batch, torch.tensor([[[2.0, 3], [6, 6]]]))  # broadcasts over (B, 2, D)
    assert lo.tolist() == [[2, 3], [2, 3]] and hi.tolist() == [[4, 4], [2, 3]]  # empty extent: hi == lo
    assert (hi > lo).all(-1).tolist() == [True, False]


def _coordinate_map(box: torch.Tensor, grid) -> torch.Tensor:
    """(1, 3, *grid) map whose cell g holds the source coordinate of its centre, a + (g + 1/2)(b - a)/G."""
    axes = [box[0, d] + (torch.arange(n, dtype=torch.float64) + 0.5) * (box[1, d] - box[0, d]) / n
            for d, n in enumerate(grid)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].float()


def test_overlap_points_closed_form():
    b1 = torch.tensor([[[0.0, 0, 0], [10, 10, 10]]])
    b2 = torch.tensor([[[4.0, 2, 6], [14, 12, 16]]])
    points, valid = overlap_points(b1, b2, (3, 2, 1))
    assert valid.tolist() == [True] and points.shape == (1, 3, 2, 1, 3)
    torch.testing.assert_close(points[0, :, 0, 0, 0], torch.tensor([5.0, 7, 9], dtype=torch.float64))
    torch.testing.assert_close(points[0, 0, :, 0, 1], torch.tensor([4.0, 8], dtype=torch.float64))
    assert float(points[0, 0, 0, 0, 2]) == 8.0
    far = torch.tensor([[[20.0, 0, 0], [30, 10, 10]]])
    assert overlap_points(b1, far, (2, 2, 2))[1].tolist() == [False]


def test_sample_at_reads_source_coordinates_on_any_grid():
    box = torch.tensor([[[3.0, 5, 0], [19, 13, 24]]])
    points = overlap_points(box, torch.tensor([[[0.0, 0, 0], [40, 40, 40]]]), (5, 4, 3))[0]
    for grid in [(16, 8, 24), (2, 1, 3), (4, 4, 4)]:  # voxel grid, coarse /8 grid, anisotropic
        feat = _coordinate_map(box[0].double(), grid)
        out = sample_at(feat, box, points)  # (1, 3, 5, 4, 3)
        got, want = out[0].movedim(0, -1).double(), points[0]
        cell = (box[0, 1] - box[0, 0]).double() / torch.tensor(grid, dtype=torch.float64)
        lo, hi = box[0, 0] + cell / 2, box[0, 1] - cell / 2  # centres of the first/last cell: exact in between
        inside = ((want >= lo) & (want <= hi))
        assert torch.allclose(got[inside], want[inside], atol=1e-4)
        assert ((got - want).abs() <= cell / 2 + 1e-4).all()  # border cells are clamped, never further off


def test_roi_align_pair_matches_anatomy_of_real_crops():
    """Crops of a volume that encodes its own voxel coordinates: both views agree at every aligned point."""
    shape = (40, 44, 36)
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) + 0.5 for s in shape], indexing="ij"))  # (3, *shape)
    crop = RandCropPaird("image", roi_size=(16, 16, 16), scale_range=(0.5, 1.0), min_iou=0.3)
    for seed in range(4):
        crop.set_random_state(seed)
        d = crop({"image": coords})
        b1, b2 = d["box_v1"][None], d["box_v2"][None]
        v1, v2 = d["image_v1"][None], d["image_v2"][None]  # (1, 3, 16, 16, 16), values = source coordinates
        pooled1 = F.avg_pool3d(v1, 4)  # a /4 "token" grid of view 1
        a1, a2, valid = roi_align_pair(pooled1, v2, b1, b2, size=(6, 6, 6))
        points, _ = overlap_points(b1, b2, (6, 6, 6))
        assert valid.all() and a1.shape == a2.shape == (1, 3, 216)
        want = points[0].reshape(-1, 3).t().float()
        step1 = (b1[0, 1] - b1[0, 0]) / 4  # token size of view 1 in source voxels
        step2 = (b2[0, 1] - b2[0, 0]) / 16
        assert ((a1[0] - want).abs() <= step1[:, None] / 2 + 1e-3).all()
        assert ((a2[0] - want).abs() <= step2[:, None] / 2 + 1e-3).all()


def test_warp_to_view_nearest_labels():
    shape = (30, 34, 28)
    ids = torch.arange(math.prod(shape)).reshape(1, *shape)  # every source voxel has its own label
    crop = RandCropPaird("label", roi_size=(12, 12, 12), scale_range=(0.5, 1.0), min_iou=0.3, mode="nearest")
    crop.set_random_state(3)
    d = crop({"label": ids})
    b1, b2 = d["box_v1"][None], d["box_v2"][None]
    warped, inside = warp_to_view(d["label_v2"][None], b2, b1)
    assert warped.dtype == ids.dtype and inside.shape == (1, 1, 12, 12, 12)
    centres = overlap_points(b1, b1, (12, 12, 12))[0][0]  # view 1 voxel centres in source coordinates
    in_box2 = ((centres >= b2[0, 0].double()) & (centres < b2[0, 1].double())).all(-1)
    assert torch.equal(inside[0, 0], in_box2) and 0 < in_box2.float().mean() < 1
    src = torch.stack(torch.unravel_index(warped[0, 0][inside[0, 0]], shape), dim=-1).double() + 0.5
    step2 = ((b2[0, 1] - b2[0, 0]) / 12).double()
    assert ((src - centres[in_box2]).abs() <= step2 + 0.5 + 1e-6).all()  # within one voxel of view 2
    same, everywhere = warp_to_view(d["label_v1"][None], b1, b1)
    assert torch.equal(same, d["label_v1"][None]) and everywhere.all()
