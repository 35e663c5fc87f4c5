"""Heads, momentum encoder, MoCo queue and pretrained loading."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn

from medvol.errors import DataError
from medvol.networks import (
    ConvProjectionHead,
    GlobalPoolHead,
    MLPHead,
    MoCoQueue,
    PredictionHead,
    ProjectionHead,
    SwinBackbone,
    UNet3D,
    copy_momentum_encoder,
    cosine_momentum,
    load_pretrained,
    update_momentum,
)

# ----------------------------------------------------------------------------------------------------- heads


def test_mocov3_projector_and_predictor_layout():
    proj = ProjectionHead(32, hidden_dim=64, out_dim=16)
    kinds = [type(m).__name__ for m in proj.layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    last_bn = proj.layers[-1]
    assert not last_bn.affine and last_bn.weight is None and last_bn.bias is None
    assert all(m.bias is None for m in proj.layers if isinstance(m, nn.Linear))  # BN follows every Linear
    assert proj(torch.randn(4, 32)).shape == (4, 16)

    pred = PredictionHead(16, hidden_dim=64, out_dim=16)
    assert [type(m).__name__ for m in pred.layers] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert pred.layers[-1].bias is not None
    assert pred(torch.randn(4, 16)).shape == (4, 16)


def test_mlp_head_layer_norm_and_batch_of_one():
    head = MLPHead(8, 16, 4, num_layers=3, norm="layer", last_norm=True, last_norm_affine=False)
    assert head(torch.randn(1, 8)).shape == (1, 4)  # LayerNorm: any batch size, also in training
    assert head.layers[-1].weight is None
    bn = MLPHead(8, 16, 4)
    with pytest.raises(ValueError, match="batch of at least 2 in training mode"):
        bn(torch.randn(1, 8))
    bn.eval()
    assert bn(torch.randn(1, 8)).shape == (1, 4)  # eval mode uses running statistics
    with pytest.raises(ValueError, match="last_norm=True needs norm"):
        MLPHead(8, 16, 4, norm=None, last_norm=True)
    with pytest.raises(ValueError, match="norm='group'"):
        MLPHead(8, 16, 4, norm="group")


def test_global_pool_head_equals_mlp_of_the_mean():
    torch.manual_seed(0)
    head = GlobalPoolHead(6, 12, 5)
    assert [type(m).__name__ for m in head.mlp.layers] == ["Linear", "ReLU", "Linear"]  # MoCo v2 MLP
    x3 = torch.randn(2, 6, 3, 4, 5)
    torch.testing.assert_close(head(x3), head.mlp(x3.mean(dim=(2, 3, 4))))
    x2 = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(head(x2), head.mlp(x2.mean(dim=(2, 3))))


def test_conv_projection_head_is_pointwise():
    torch.manual_seed(0)
    head = ConvProjectionHead(4, 8, 3).eval()
    x = torch.randn(2, 4, 4, 4, 4)
    y = head(x)
    assert y.shape == (2, 3, 4, 4, 4)
    x2 = x.clone()
    x2[0, :, 1, 2, 3] += 1.0
    changed = (head(x2) - y).abs().sum(dim=1) > 0
    assert changed.sum() == 1 and changed[0, 1, 2, 3]


# -------------------------------------------------------------------------------------------------- momentum


def _net():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_update_momentum_matches_formula_and_copies_buffers():
    torch.manual_seed(0)
    model = _net()
    ema = copy_momentum_encoder(model)
    assert all(not p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(5, 3))  # changes BN running statistics
    before = copy.deepcopy(ema.state_dict())
    update_momentum(model, ema, 0.9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.state_dict()[name], 0.9 * before[name] + 0.1 * p.detach())
    for name, b in model.named_buffers():
        torch.testing.assert_close(ema.state_dict()[name], b)
    update_momentum(model, ema, 0.0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.state_dict()[name], p.detach())
    with pytest.raises(ValueError, match="m=1.5"):
        update_momentum(model, ema, 1.5)
    with pytest.raises(ValueError, match="different parameters"):
        update_momentum(model, nn.Linear(3, 4), 0.5)


def test_momentum_with_ddp_wrapped_model(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
        ema = copy_momentum_encoder(ddp)
        assert isinstance(ema, nn.Linear) and not ema.weight.requires_grad
        with torch.no_grad():
            ddp.module.weight.add_(1.0)
        old = ema.weight.clone()
        update_momentum(ddp, ema, 0.5)
        torch.testing.assert_close(ema.weight, 0.5 * old + 0.5 * ddp.module.weight)
        queue = MoCoQueue(dim=2, size=4)  # world size 1: enqueue takes the local path
        queue.enqueue(torch.ones(1, 2))
        assert int(queue.ptr) == 1
    finally:
        dist.destroy_process_group()


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 500, 100) == pytest.approx(1.0)
    values = [cosine_momentum(0.9, s, 10) for s in range(11)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="total_steps=0"):
        cosine_momentum(0.99, 0, 0)


# ----------------------------------------------------------------------------------------------------- queue


def test_queue_init_seeded_and_normalised():
    a = MoCoQueue(dim=8, size=16, generator=torch.Generator().manual_seed(1))
    b = MoCoQueue(dim=8, size=16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.queue, b.queue)
    torch.testing.assert_close(a.queue.norm(dim=1), torch.ones(16))
    assert a.ptr.dtype == torch.long and int(a.ptr) == 0
    assert set(a.state_dict()) == {"queue", "ptr"}
    with pytest.raises(ValueError, match="size=0"):
        MoCoQueue(dim=8, size=0)


def test_queue_enqueue_wraps_around():
    q = MoCoQueue(dim=2, size=5, generator=torch.Generator().manual_seed(0))
    init = q.negatives
    keys = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # rows k0..k5
    q.enqueue(keys[:3])  # slots 0-2
    torch.testing.assert_close(q.queue[:3], keys[:3])
    torch.testing.assert_close(q.queue[3:], init[3:])
    q.enqueue(keys[3:6])  # slots 3, 4, then wraps to 0
    assert int(q.ptr) == 1
    torch.testing.assert_close(q.queue, torch.stack([keys[5], keys[1], keys[2], keys[3], keys[4]]))
    big = torch.arange(14, dtype=torch.float32).reshape(7, 2)  # more keys than slots: the last 5 survive
    q.enqueue(big)
    assert int(q.ptr) == (1 + 7) % 5
    expected = torch.empty(5, 2)
    for j in range(7):
        expected[(1 + j) % 5] = big[j]
    torch.testing.assert_close(q.queue, expected)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        q.enqueue(torch.randn(3, 4))


def test_queue_reading_does_not_modify_and_detaches():
    q = MoCoQueue(dim=4, size=6)
    snapshot = q.queue.clone()
    neg = q.negatives
    neg.zero_()
    q().add_(1.0)
    torch.testing.assert_close(q.queue, snapshot)
    keys = torch.randn(2, 4, requires_grad=True)
    q.enqueue(keys.double())
    assert not q.queue.requires_grad and q.queue.dtype == torch.float32


def test_queue_state_dict_round_trip(tmp_path):
    q = MoCoQueue(dim=4, size=6, generator=torch.Generator().manual_seed(0))
    q.enqueue(torch.randn(4, 4))
    q.enqueue(torch.randn(4, 4))
    torch.save(q.state_dict(), tmp_path / "queue.pt")
    restored = MoCoQueue(dim=4, size=6, generator=torch.Generator().manual_seed(99))
    restored.load_state_dict(torch.load(tmp_path / "queue.pt", map_location="cpu", weights_only=True))
    torch.testing.assert_close(restored.queue, q.queue)
    assert int(restored.ptr) == int(q.ptr) == 2
    keys = torch.randn(3, 4)
    q.enqueue(keys)
    restored.enqueue(keys)
    torch.testing.assert_close(restored.queue, q.queue)


# ------------------------------------------------------------------------------------------ pretrained loading


def _pair():
    torch.manual_seed(0)
    src = UNet3D(channels=(4, 8, 16), out_channels=1)
    torch.manual_seed(1)
    dst = UNet3D(channels=(4, 8, 16), out_channels=3)
    return src, dst


def test_load_pretrained_encoder_only(tmp_path):
    src, dst = _pair()
    path = tmp_path / "pretext.pt"
    torch.save(src.state_dict(), path)
    dec_before = {k: v.clone() for k, v in dst.state_dict().items() if not k.startswith("encoder.")}
    report = load_pretrained(dst, path, prefixes=("encoder.",))
    assert report["loaded"] == list(src.encoder_state_dict())
    assert report["skipped_shape"] == report["missing"] == report["unexpected"] == []
    for k, v in src.encoder_state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)
    for k, v in dec_before.items():  # decoder and head untouched
        torch.testing.assert_close(dst.state_dict()[k], v)


def test_load_pretrained_report_wrapped_checkpoints_and_strict(tmp_path):
    src, dst = _pair()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)  # zoo + DDP layout
    report = load_pretrained(dst, path, prefixes=None)
    assert report["skipped_shape"] == ["head.conv.weight", "head.conv.bias"]  # 1 vs 3 output channels
    assert len(report["loaded"]) == len(dst.state_dict()) - 2
    with pytest.raises(ValueError, match="ckpt.pt: 2 tensor"):
        load_pretrained(dst, path, prefixes=None, strict_shapes=True)

    # a whole pretext model saved with the backbone as an attribute; extra keys of the encoder are "unexpected"
    state = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    state["backbone.encoder.extra.weight"] = torch.zeros(1)
    report = load_pretrained(dst, {"state_dict": state}, source_prefix="backbone.")
    assert report["unexpected"] == ["encoder.extra.weight"] and report["missing"] == []


def test_load_pretrained_errors_name_the_file(tmp_path, caplog):
    _, dst = _pair()
    swin = SwinBackbone(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    path = tmp_path / "swin.pt"
    torch.save(swin.state_dict(), path)
    with pytest.raises(DataError, match=r"swin\.pt: no tensor matches"):
        load_pretrained(dst, path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"bad\.pt: not a torch checkpoint \(the file starts with .not a checkpoint"):
        load_pretrained(dst, bad)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_pretrained(dst, tmp_path / "absent.pt")
    bn = UNet3D(channels=(4, 8, 16), norm="batch")  # BatchNorm pretext into an InstanceNorm network: warned
    with caplog.at_level(logging.WARNING, logger="medvol.networks.pretrained"):
        load_pretrained(dst, bn.state_dict())
    assert "different norm layers" in caplog.text


def _queue_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # different seeds per rank: the first enqueue broadcasts rank 0's queue
        q = MoCoQueue(dim=2, size=8, generator=torch.Generator().manual_seed(rank))
        keys = torch.full((rank + 1, 2), float(rank + 1))  # rank 0 sends 1 key, rank 1 sends 2 (unequal batches)
        q.enqueue(keys)
        torch.save(q.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_queue_all_gathers_across_ranks(tmp_path):
    # fork: the children inherit the imported modules, so the test takes a second rather than re-importing MONAI
    torch.multiprocessing.start_processes(
        _queue_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.testing.assert_close(r0["queue"], r1["queue"])
    assert int(r0["ptr"]) == int(r1["ptr"]) == 3
    torch.testing.assert_close(r0["queue"][:3], torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]))
    torch.testing.assert_close(r0["queue"][3:], MoCoQueue(2, 8, torch.Generator().manual_seed(0)).queue[3:])
