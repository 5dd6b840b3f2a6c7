"""perceiver-pytorch PerceiverIO encoder -> our PerceiverEncoder: same latents, same gradients."""

from __future__ import annotations

import pytest
import torch

perceiver_pytorch = pytest.importorskip("perceiver_pytorch")

from resampler.convert.perceiver_pytorch import from_perceiver_pytorch  # noqa: E402


def _peer(**overrides) -> torch.nn.Module:
    kwargs = dict(
        depth=2,
        dim=20,
        queries_dim=16,
        num_latents=6,
        latent_dim=32,
        cross_heads=1,
        latent_heads=4,
        cross_dim_head=20,
        latent_dim_head=8,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = perceiver_pytorch.PerceiverIO(**kwargs).double()
    with torch.no_grad():  # LayerNorms start at ones/zeros: randomise them so the check covers them
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"cross_heads": 2, "cross_dim_head": 12},
        {"depth": 0},
        {"depth": 3, "latent_heads": 2, "latent_dim_head": 24},
    ],
)
def test_latents_and_gradients_match(overrides):
    peer = _peer(**overrides)
    ours = from_perceiver_pytorch(peer).eval()
    data = torch.randn(3, 37, peer.cross_attend_block.cross_attn.fn.to_kv.in_features, dtype=torch.float64)
    mask = torch.ones(3, 37, dtype=torch.bool)
    mask[1, 20:] = False
    for m in (None, mask):
        data_a = data.clone().requires_grad_(True)
        data_b = data.clone().requires_grad_(True)
        expected = peer(data_a, mask=m)
        got = ours(data_b, m)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        weight = torch.randn_like(expected)
        (expected * weight).sum().backward()
        (got * weight).sum().backward()
        torch.testing.assert_close(data_b.grad, data_a.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(ours.latents.grad, peer.latents.grad, rtol=0, atol=1e-10)
        ours.zero_grad()
        peer.zero_grad()


def test_fp32_parity_and_parameter_count():
    peer = _peer().float()
    ours = from_perceiver_pytorch(peer)
    encoder_params = sum(
        p.numel() for name, p in peer.named_parameters() if not name.startswith(("decoder", "to_logits"))
    )
    assert sum(p.numel() for p in ours.parameters()) == encoder_params
    data = torch.randn(2, 50, 20)
    torch.testing.assert_close(ours(data), peer(data), rtol=1e-5, atol=1e-5)


def test_unsupported_variants_raise():
    with pytest.raises(ValueError, match="weight_tie_layers"):
        from_perceiver_pytorch(_peer(depth=2, weight_tie_layers=True))
    with pytest.raises(ValueError, match="attn_residual"):
        from_perceiver_pytorch(_peer(attn_residual=True))
    with pytest.raises(TypeError, match="PerceiverIO"):
        from_perceiver_pytorch(torch.nn.Linear(2, 2))
