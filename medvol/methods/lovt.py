"""LoVT: localized representation learning from images and reports; ConVIRT and CLIP as global-only settings.

Mueller et al., "Joint Learning of Localized Representations from Medical Images and Reports", ECCV 2022.
An image (2D radiograph or 3D volume) and its report are encoded by an :class:`~medvol.networks.ImageReportModel`:
image regions (the last encoder map's grid) and report sentences, each aggregated by attention pooling into a
global embedding. The loss is

    0.75 Lg(image -> report) + 0.25 Lg(report -> image)                      (GlobalAlignmentLoss, tau 0.1)
  + 0.375 [ l(regions -> their report-side view) + l(report-side view -> regions) ]   spatial positives
  + 0.375 [ l(sentences -> their image-side view) + l(image-side view -> sentences) ] positive = itself

where the "view" of a region is what the cross-modal attention gathers for it from the report's sentences (and
the other way round), the local terms are :class:`~medvol.losses.LocalIntraSampleLoss` (tau 0.3) weighted by the
(detached) aggregation attention, and image positives are the grid cells within normalised distance 0.5,
weighted ``exp(-d)`` (:func:`~medvol.losses.spatial_positive_weights`: a 2D or 3D kernel).

ConVIRT (Zhang et al. 2020) and CLIP (Radford et al. 2021) as in LoVT's own baselines: no local terms
(``lambda_local=0``, model built with ``local=False``), one random sentence of the report per training step
(``sentence_sampling="random"``); ConVIRT mean-pools the image (tau 0.1, 0.75 / 0.25), CLIP attention-pools it
and learns its temperature (from 0.07, 0.5 / 0.5). See bundles/lovt/configs/{convirt,clip}.json.

Batch keys: ``image`` (B, C, *spatial) and ``report`` (B strings, sentences joined by newlines, as
:func:`medvol.io.reports.join_sentences` writes them); optional ``group`` (B,) ints: items of one group (the same
report text) are not each other's negatives.
"""

from __future__ import annotations

import random

import torch

from medvol.losses.image_report import GlobalAlignmentLoss, LocalIntraSampleLoss, spatial_positive_weights
from medvol.methods.base import SSLMethod
from medvol.networks.image_report import ImageReportModel, split_reports

__all__ = ["LoVT", "SENTENCE_SAMPLING"]

SENTENCE_SAMPLING = ("all", "random")


class LoVT(SSLMethod):
    """Image-report alignment (LoVT; ConVIRT / CLIP with ``lambda_local=0``).

    Args:
        model: the :class:`~medvol.networks.ImageReportModel` (saved whole as ``models/model.pt``: image
            backbone under ``image.``, text encoder under ``text.``).
        temperature: global InfoNCE temperature (0.1).
        lambda_a2b, lambda_b2a: global weights (0.75, 0.25).
        learn_temperature: learn the global temperature (CLIP).
        lambda_local: weight of each of the four local terms (0.375); 0 disables them (ConVIRT, CLIP).
        local_temperature: tau of the local terms (0.3).
        distance_threshold: image positives within this normalised grid distance (0.5).
        smooth_lambda: positive weight ``exp(-smooth_lambda * d)`` (1.0); None: unweighted.
        attention_weights: weight local elements by the aggregation attention (detached), else uniformly.
        sentence_sampling: ``"all"`` sentences (LoVT), or one ``"random"`` sentence per report and training step
            (ConVIRT, CLIP; validation always uses all sentences).
        seed: seed of the sentence sampling.

    Raises:
        ValueError: local terms requested from a model without local projections, or an unknown sampling.
    """

    batch_keys = ("image", "report", "group")

    def __init__(self, model: ImageReportModel, temperature: float = 0.1, lambda_a2b: float = 0.75,
                 lambda_b2a: float = 0.25, learn_temperature: bool = False, lambda_local: float = 0.375,
                 local_temperature: float = 0.3, distance_threshold: float = 0.5,
                 smooth_lambda: float | None = 1.0, attention_weights: bool = True, sentence_sampling: str = "all",
                 seed: int = 0):
        super().__init__(model)
        if lambda_local and not model.has_local:
            raise ValueError("lambda_local > 0 needs an ImageReportModel built with local=True")
        if sentence_sampling not in SENTENCE_SAMPLING:
            raise ValueError(f"sentence_sampling={sentence_sampling!r} must be one of {SENTENCE_SAMPLING}")
        self.global_loss = GlobalAlignmentLoss(temperature, lambda_a2b, lambda_b2a, learn_temperature)
        self.local_loss = LocalIntraSampleLoss(local_temperature, lambda_local, lambda_local)
        self.lambda_local = float(lambda_local)
        self.distance_threshold, self.smooth_lambda = float(distance_threshold), smooth_lambda
        self.attention_weights = bool(attention_weights)
        self.sentence_sampling = sentence_sampling
        self._rng = random.Random(seed)
        self._positives: dict[tuple, torch.Tensor] = {}

    @property
    def model(self) -> ImageReportModel:
        return self.backbone

    def positive_weights(self, grid: tuple[int, ...], device) -> torch.Tensor:
        """The (N, N) spatial positive weights of a region grid (cached per grid shape and device)."""
        key = (tuple(grid), str(device))
        if key not in self._positives:
            self._positives[key] = spatial_positive_weights(grid, self.distance_threshold,
                                                            self.smooth_lambda).to(device)
        return self._positives[key]

    def _sentences(self, reports) -> list[list[str]]:
        sentences = split_reports(reports)
        if any(not s for s in sentences):
            raise ValueError("LoVT: a report of the batch has no sentences")
        if self.training and self.sentence_sampling == "random":
            sentences = [[self._rng.choice(s)] for s in sentences]
        return sentences

    def forward(self, batch: dict) -> dict:
        model = self.model
        image = model.encode_image(batch["image"])
        report = model.encode_report(self._sentences(batch["report"]))
        groups = batch.get("group")
        groups = torch.as_tensor(groups, device=image.global_.device) if groups is not None else None
        g_a2b, g_b2a = self.global_loss.directional(image.global_, report.global_, groups)
        loss = self.global_loss.lambda_a2b * g_a2b + self.global_loss.lambda_b2a * g_b2a
        out = {"loss_global_a2b": g_a2b.detach(), "loss_global_b2a": g_b2a.detach()}
        if self.lambda_local:
            image_view, report_view, _, _ = model.align(image, report)
            img_w = image.weights.detach() if self.attention_weights else None
            txt_w = report.weights.detach() if self.attention_weights else None
            i_ab, i_ba = self.local_loss.directional(image.local, image_view,
                                                     self.positive_weights(image.grid, image.local.device),
                                                     image.mask, img_w)
            t_ab, t_ba = self.local_loss.directional(report.local, report_view, None, report.mask, txt_w)
            loss = loss + self.lambda_local * (i_ab + i_ba + t_ab + t_ba)
            out.update({"loss_local_image": (i_ab + i_ba).detach(), "loss_local_report": (t_ab + t_ba).detach()})
        out["loss"] = loss
        return out
