"""SimCLR, BYOL and Models Genesis on small tensors: their losses against loops over the papers' formulas, which
parameters get gradients, BYOL's target network (EMA, cosine schedule, no gradient)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine

from medvol.engines.handlers import MomentumUpdateHandler
from medvol.methods import BYOL, ModelsGenesis, SimCLR
from medvol.networks import build_backbone


def _backbone():
    torch.manual_seed(0)
    return build_backbone("unet", channels=(4, 8, 16))


def _views(n=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image_v1": torch.rand(n, 1, size, size, size, generator=g),
            "image_v2": torch.rand(n, 1, size, size, size, generator=g)}


def simclr_reference(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR (Chen et al. 2020) Algorithm 1: views 2k-1, 2k of sample k; s = cosine similarity;
    l(i, j) = -log(exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau)); L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]."""
    z = []
    for a, b in zip(z1.double(), z2.double()):
        z += [a, b]

    def s(i, j):
        return float(z[i] @ z[j] / (z[i].norm() * z[j].norm()))

    def loss(i, j):
        den = sum(math.exp(s(i, k) / tau) for k in range(len(z)) if k != i)
        return -math.log(math.exp(s(i, j) / tau) / den)

    n = len(z1)
    return sum(loss(2 * k, 2 * k + 1) + loss(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


def test_simclr_loss_is_nt_xent_with_2n_minus_2_negatives():
    method = SimCLR(_backbone(), proj_dim=8, hidden_dim=16, temperature=0.1).eval()
    views = _views(n=4)
    with torch.no_grad():
        loss = float(method(views)["loss"])
        z1, z2 = method.project(views["image_v1"]), method.project(views["image_v2"])
    assert loss == pytest.approx(simclr_reference(z1, z2, 0.1), rel=1e-4)


def test_simclr_trains_encoder_and_head_only():
    method = SimCLR(_backbone(), proj_dim=8, hidden_dim=16).train()
    method(_views())["loss"].backward()
    for name, p in method.named_parameters():
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert has_grad == name.startswith(("backbone.encoder.", "head.")), name


def test_byol_loss_is_the_symmetrised_normalised_mse():
    method = BYOL(_backbone(), proj_dim=8, hidden_dim=16).eval()
    views = _views(n=3)
    with torch.no_grad():
        loss = float(method(views)["loss"])
        q1, q2 = method.predict(views["image_v1"]), method.predict(views["image_v2"])
        z1, z2 = method.target(views["image_v1"]), method.target(views["image_v2"])

    def pair(q, z):  # BYOL Eq. 2, averaged over the batch
        return sum(float(((a / a.norm() - b / b.norm()) ** 2).sum()) for a, b in zip(q.double(), z.double())) / len(q)

    assert loss == pytest.approx(pair(q1, z2) + pair(q2, z1), rel=1e-5)
    # at initialisation the target equals the online network: the loss is 2 - 2 cos(predictor(z), z')
    torch.testing.assert_close(z1, method.projector(method.backbone.encode(views["image_v1"])[-1]).detach())


def test_byol_gradients_and_target_network():
    method = BYOL(_backbone(), proj_dim=8, hidden_dim=16).train()
    method(_views())["loss"].backward()
    for name, p in method.named_parameters():
        trained = name.startswith(("backbone.encoder.", "projector.", "predictor."))
        assert p.requires_grad == (not name.startswith("target_")), name
        assert (p.grad is not None and bool(p.grad.abs().sum() > 0)) == trained, name
    before = {k: v.clone() for k, v in method.target_backbone.state_dict().items()}
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    method.update_momentum(0.996)
    for key, value in method.target_backbone.named_parameters():  # xi <- 0.996 xi + 0.004 theta
        online = dict(method.backbone.named_parameters())[key]
        torch.testing.assert_close(value, 0.996 * before[key] + 0.004 * online)


def test_byol_momentum_follows_the_cosine_schedule():
    (handler,) = BYOL(_backbone(), proj_dim=8, hidden_dim=16).train_handlers()
    assert isinstance(handler, MomentumUpdateHandler) and (handler.momentum, handler.schedule) == (0.996, "cosine")
    seen = []

    class Recorder(torch.nn.Module):
        def update_momentum(self, m):
            seen.append(m)

    engine = Engine(lambda e, b: None)
    engine.network = Recorder()
    handler.attach(engine)
    engine.run([0] * 10, max_epochs=2)
    expected = [1 - 0.004 * (math.cos(math.pi * k / 20) + 1) / 2 for k in range(1, 21)]
    assert seen == pytest.approx(expected) and seen[-1] == 1.0


def test_models_genesis_loss_is_mse_of_the_sigmoid_output():
    method = ModelsGenesis(_backbone()).eval()
    g = torch.Generator().manual_seed(2)
    batch = {"image": torch.rand(2, 1, 16, 16, 16, generator=g), "target": torch.rand(2, 1, 16, 16, 16, generator=g)}
    with torch.no_grad():
        loss = float(method(batch)["loss"])
        restored = torch.sigmoid(method.backbone(batch["image"])).double()
    errors = [(float(a) - float(b)) ** 2 for a, b in zip(restored.flatten(), batch["target"].double().flatten())]
    assert loss == pytest.approx(sum(errors) / len(errors), rel=1e-5)
    assert float(F.mse_loss(restored, batch["target"].double())) == pytest.approx(loss, rel=1e-5)


def test_models_genesis_trains_the_whole_unet():
    method = ModelsGenesis(_backbone()).train()
    g = torch.Generator().manual_seed(3)
    method({"image": torch.rand(2, 1, 16, 16, 16, generator=g), "target": torch.rand(2, 1, 16, 16, 16, generator=g)}
           )["loss"].backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in method.parameters())
    assert method.find_unused_parameters is False
    with pytest.raises(ValueError, match="out_channels == in_channels"):
        ModelsGenesis(build_backbone("unet", channels=(4, 8), out_channels=3))
