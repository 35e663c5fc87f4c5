"""ABMIL and PMA pooling: paper formulas, masking, permutation invariance, argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from medvol.networks.mil import ABMIL, PMA, MILOutput, build_mil_network, masked_softmax

D = 12


def _nets():
    torch.manual_seed(0)
    return {
        "abmil_gated": ABMIL(D, hidden_dim=16, attention_dim=8, n_outputs=2).eval(),
        "abmil_plain": ABMIL(D, hidden_dim=16, attention_dim=8, gated=False).eval(),
        "pma": PMA(D, hidden_dim=16, num_heads=4, num_seeds=3, n_outputs=2).eval(),
    }


def _abmil_reference(net: ABMIL, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ilse et al. 2018 eq. 8/9 written per instance with explicit weights (one bag, no padding)."""
    w_e, b_e = net.embed[0].weight, net.embed[0].bias
    v, bv = net.attention_v[0].weight, net.attention_v[0].bias
    w, bw = net.attention_w.weight[0], net.attention_w.bias[0]
    hs = [torch.relu(w_e @ x + b_e) for x in bag]
    scores = []
    for h in hs:
        gate = torch.tanh(v @ h + bv)
        if net.gated:
            gate = gate * torch.sigmoid(net.attention_u[0].weight @ h + net.attention_u[0].bias)
        scores.append(w @ gate + bw)
    exps = [math.exp(float(s.detach())) for s in scores]
    a = torch.tensor([e / sum(exps) for e in exps])
    z = sum(a_k * h for a_k, h in zip(a, hs))
    return net.head(z[None])[0], a


@pytest.mark.parametrize("gated", [True, False])
def test_abmil_matches_per_instance_reference(gated):
    torch.manual_seed(1)
    net = ABMIL(D, hidden_dim=16, attention_dim=8, n_outputs=3, gated=gated).eval()
    bag = torch.randn(7, D)
    out = net.forward_with_attention(bag[None])
    logits, attention = _abmil_reference(net, bag)
    torch.testing.assert_close(out.attention[0], attention.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.logits[0], logits, atol=1e-5, rtol=1e-5)
    assert (net.attention_u is not None) == gated


def test_pma_matches_manual_multihead_attention():
    torch.manual_seed(2)
    net = PMA(D, hidden_dim=16, num_heads=4, num_seeds=2, n_outputs=1).eval()
    bag = torch.randn(6, D)
    out = net.forward_with_attention(bag[None])
    # Lee et al. 2019: PMA_k(Z) = LN(H + rFF(H)), H = LN(S + MultiHead(S, rFF(Z), rFF(Z)))
    z = net.rff_in(net.embed(bag))  # (N, H)
    mha = net.attention
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    s = net.seeds[0]  # (k, H)
    q, k, v = s @ wq.T + bq, z @ wk.T + bk, z @ wv.T + bv
    heads, dh = 4, 4
    weights, values = [], []
    for i in range(heads):
        sl = slice(i * dh, (i + 1) * dh)
        a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(dh), dim=-1)  # (k, N)
        weights.append(a)
        values.append(a @ v[:, sl])
    attended = torch.cat(values, dim=1) @ mha.out_proj.weight.T + mha.out_proj.bias
    h = net.norm0(s + attended)
    h = net.norm1(h + net.rff_out(h))
    torch.testing.assert_close(out.logits[0], net.head(h.flatten()[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.attention[0], torch.stack(weights).mean(dim=(0, 1)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["abmil_gated", "abmil_plain", "pma"])
def test_bag_alone_equals_bag_padded_in_a_batch(name):
    net = _nets()[name]
    torch.manual_seed(3)
    lengths = [5, 9, 2]
    bags = [torch.randn(n, D) for n in lengths]
    x = torch.full((3, 9, D), float("nan"))  # padding content must not matter, not even NaN
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)], mask[i, : len(b)] = b, True
    batched = net.forward_with_attention(x, mask)
    assert torch.isfinite(batched.logits).all()
    for i, b in enumerate(bags):
        alone = net.forward_with_attention(b[None])
        torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(batched.attention[i, : len(b)], alone.attention[0], atol=1e-6, rtol=1e-5)
        assert torch.equal(batched.attention[i, len(b):], torch.zeros(9 - len(b)))  # exactly zero
    torch.testing.assert_close(batched.attention.sum(1), torch.ones(3))
    assert torch.equal(net(x, mask), batched.logits)  # forward returns the logits tensor itself


@pytest.mark.parametrize("name", ["abmil_gated", "pma"])
def test_permutation_invariance(name):
    net = _nets()[name]
    x = torch.randn(2, 8, D)
    perm = torch.randperm(8)
    out, out_perm = net.forward_with_attention(x), net.forward_with_attention(x[:, perm])
    torch.testing.assert_close(out.logits, out_perm.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.attention[:, perm], out_perm.attention, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", ["abmil_gated", "pma"])
def test_training_gradients_reach_attention_and_padding_gets_none(name):
    net = _nets()[name].train()
    x = torch.randn(2, 6, D, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], dtype=torch.bool)
    out = net.forward_with_attention(x, mask)
    assert isinstance(out, MILOutput) and out.logits.shape == (2, net.n_outputs)
    out.logits.sum().backward()
    attention_params = [p for n, p in net.named_parameters() if "attention" in n or "seeds" in n]
    assert attention_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in attention_params)
    assert torch.equal(x.grad[0, 4:], torch.zeros(2, D))  # padded instances do not influence the output


def test_masked_softmax_and_errors():
    a = masked_softmax(torch.tensor([[1.0, 2.0, 50.0]]), torch.tensor([[True, True, False]]))
    torch.testing.assert_close(a, torch.tensor([[1 / (1 + math.e), math.e / (1 + math.e), 0.0]]))
    net = ABMIL(D, hidden_dim=8, attention_dim=8)
    with pytest.raises(ValueError, match="at least one instance"):
        net(torch.randn(2, 3, D), torch.tensor([[True, False, False], [False] * 3]))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 12\)"):
        net(torch.randn(2, 3, D + 1))
    with pytest.raises(ValueError, match="mask must be"):
        net(torch.randn(2, 3, D), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="in_dim=0"):
        ABMIL(0)
    with pytest.raises(ValueError, match="dropout=1.5"):
        ABMIL(D, dropout=1.5)
    with pytest.raises(ValueError, match="num_heads=3"):
        PMA(D, hidden_dim=16, num_heads=3)
    with pytest.raises(ValueError, match="pooling='mean'"):
        build_mil_network("mean", in_dim=D)


def test_build_mil_network_by_name():
    abmil = build_mil_network("abmil", in_dim=D, n_outputs=4, hidden_dim=16, attention_dim=8, gated=False)
    assert isinstance(abmil, ABMIL) and not abmil.gated and abmil.head[-1].out_features == 4
    pma = build_mil_network("PMA", in_dim=D, n_outputs=2, hidden_dim=16, num_heads=2, num_seeds=3)
    assert isinstance(pma, PMA) and pma.seeds.shape == (1, 3, 16) and pma.head[0].normalized_shape == (48,)
    assert pma(torch.randn(1, 4, D)).shape == (1, 2)


@pytest.mark.parametrize("name", ["abmil_gated", "pma"])
def test_input_standardisation_is_part_of_the_network(name):
    net = _nets()[name]
    x, mean, std = torch.randn(2, 5, D) * 3 + 7, torch.linspace(-1, 1, D), torch.linspace(0.5, 2, D)
    plain = net((x - mean) / std)
    net.set_input_stats(mean, std)
    torch.testing.assert_close(net(x), plain)
    state = net.state_dict()
    assert torch.equal(state["input_mean"], mean) and torch.equal(state["input_std"], std)  # saved with weights
    with pytest.raises(ValueError, match="std > 0"):
        net.set_input_stats(mean, torch.zeros(D))
    with pytest.raises(ValueError, match=r"must be \(12,\)"):
        net.set_input_stats(mean[:3], std[:3])
