"""Pixel-level volumetric clustering: predict the other view's cached pseudo-labels on the shared voxels.

radioSSL (Trustworthy-AI-UU-NKI/radioSSL, pixel-level clustering; see ``docs/methods/pixel_clustering.md``).
Every training volume has a pseudo-label map of K clusters, computed once by ``medvol.cluster.pseudolabels``
(teacher features -> one k-means fit -> assignment). Two overlapping crops of the volume and of its
pseudo-label map (same boxes, nearest resizing for the labels) are intensity-augmented separately; the student
U-Net predicts K-channel logits for each view, and each view is trained on the *other* view's pseudo-labels,
resampled (nearest) onto its voxels inside the overlap (:func:`~medvol.transforms.warp_to_view`)::

    loss = 1/2 [ CE(g_1, p_2 -> view 1) + CE(g_2, p_1 -> view 2) ]     (log-softmax over the K channels)

Batch keys: ``image_v1``, ``image_v2``, ``pseudolabel_v1``, ``pseudolabel_v2`` (B, 1, *roi), ``box_v1``,
``box_v2``.
"""

from __future__ import annotations

import torch

from medvol.losses import PixelSwappedCELoss
from medvol.methods.base import SSLMethod
from medvol.transforms.geometry import warp_to_view

__all__ = ["PixelClustering"]


def _labels(t: torch.Tensor) -> torch.Tensor:
    """Integer labels from a collated pseudo-label view (uint8 from the cache, or float after resizing)."""
    return t.round().long() if t.is_floating_point() else t.long()


class PixelClustering(SSLMethod):
    """Pixel-level clustering pretext task on a U-Net with ``num_clusters`` output channels.

    Args:
        backbone: :class:`~medvol.networks.Backbone` with ``out_channels == num_clusters``.
        num_clusters: K, the number of pseudo-label clusters (radioSSL: 10).

    Raises:
        ValueError: when the backbone's ``out_channels`` is not ``num_clusters``.

    Example:
        >>> from medvol.networks import UNet3D
        >>> method = PixelClustering(UNet3D(channels=(4, 8, 16), out_channels=10), num_clusters=10)
        >>> labels = torch.randint(0, 10, (2, 1, 16, 16, 16)).float()
        >>> batch = {"image_v1": torch.rand(2, 1, 16, 16, 16), "image_v2": torch.rand(2, 1, 16, 16, 16),
        ...          "pseudolabel_v1": labels, "pseudolabel_v2": labels,
        ...          "box_v1": torch.tensor([[[0., 0, 0], [16, 16, 16]]] * 2),
        ...          "box_v2": torch.tensor([[[0., 0, 0], [16, 16, 16]]] * 2)}
        >>> method(batch)["loss"].shape
        torch.Size([])
    """

    batch_keys = ("image_v1", "image_v2", "pseudolabel_v1", "pseudolabel_v2", "box_v1", "box_v2")

    def __init__(self, backbone, num_clusters: int = 10):
        super().__init__(backbone)
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
        if backbone.out_channels != num_clusters:
            raise ValueError(f"PixelClustering predicts {num_clusters} clusters: the backbone needs "
                             f"out_channels={num_clusters}, got {backbone.out_channels}")
        self.num_clusters = num_clusters
        self.loss_fn = PixelSwappedCELoss()

    def forward(self, batch: dict) -> dict:
        x1, x2 = batch["image_v1"], batch["image_v2"]
        b1, b2 = batch["box_v1"], batch["box_v2"]
        logits1, logits2 = self.backbone(torch.cat([x1, x2])).chunk(2)  # (B, K, *roi) each
        with torch.no_grad():
            p1, p2 = _labels(batch["pseudolabel_v1"]), _labels(batch["pseudolabel_v2"])  # (B, 1, *roi)
            target1, inside1 = warp_to_view(p2, b2, b1, size=logits1.shape[2:])  # view 2's labels on view 1
            target2, inside2 = warp_to_view(p1, b1, b2, size=logits2.shape[2:])
        loss = 0.5 * (self.loss_fn(logits1, target1, inside1) + self.loss_fn(logits2, target2, inside2))
        with torch.no_grad():
            agree = (logits1.argmax(1, keepdim=True) == target1) & inside1
            accuracy = agree.sum() / inside1.sum().clamp(min=1)
        return {"loss": loss, "loss_swap": loss.detach(), "overlap_fraction": inside1.float().mean(),
                "accuracy": accuracy.float()}
