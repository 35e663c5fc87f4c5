"""UNETRBackbone: same logits as MONAI's UNETR, feature taps, decode levels, size errors, TorchScript."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR

from medvol.networks import UNETRBackbone, build_backbone

TINY = dict(hidden_size=24, mlp_dim=48, num_heads=2, feature_size=4)


def test_equals_monai_unetr_and_feature_shapes():
    torch.manual_seed(0)
    net = UNETRBackbone(out_channels=2, img_size=(32, 48, 32), **TINY).eval()
    ref = UNETR(1, 2, (32, 48, 32), **TINY).eval()
    # medvol prefixes -> UNETR names: encoder.X / decoder.X -> X, head.* -> out.*
    ref.load_state_dict({("out." + k[5:]) if k.startswith("head.") else k.split(".", 1)[1]: v
                         for k, v in net.state_dict().items()})
    x = torch.randn(1, 1, 32, 48, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))
        enc = net.encode(x)
        assert [tuple(f.shape[1:]) for f in enc] == [(4, 32, 48, 32), (8, 16, 24, 16), (16, 8, 12, 8),
                                                    (32, 4, 6, 4), (24, 2, 3, 2)]
        assert net.encoder_channels == (4, 8, 16, 32, 24) and net.decoder_channels == (32, 16, 8, 4)
        dec = net.decode(enc)
        assert [f.shape[1] for f in dec] == [32, 16, 8, 4]
        for a, b in zip(net.decode(enc, num_levels=2), dec):
            torch.testing.assert_close(a, b)
    assert {k.split(".")[0] for k in net.state_dict()} == {"encoder", "decoder", "head"}
    assert any(k.startswith("encoder.vit.patch_embedding.") for k in net.state_dict())


def test_size_errors_factory_and_torchscript():
    net = build_backbone("unetr", img_size=32, **TINY)
    assert isinstance(net, UNETRBackbone) and net.img_size == (32, 32, 32)
    with pytest.raises(ValueError, match="must equal img_size"):
        net.encode(torch.zeros(1, 1, 32, 32, 48))
    with pytest.raises(ValueError, match="multiples of 16"):
        UNETRBackbone(img_size=(24, 32, 32), **TINY)
    x = torch.randn(1, 1, 32, 32, 32)
    encoder, decoder = torch.jit.script(net.encoder), torch.jit.script(net.decoder)
    with torch.no_grad():
        torch.testing.assert_close(decoder(encoder(x), 4)[-1], net.decode(net.encode(x))[-1])
