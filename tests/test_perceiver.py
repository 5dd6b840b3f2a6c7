"""Perceiver encoder (v1, iterative cross-attends) and classifier: schedule, invariances, gradients, errors."""

import pytest
import torch

from resampler.models.perceiver import PerceiverClassifier, PerceiverEncoder, PerceiverEncoderConfig
from resampler.nn.position import fourier_feature_dim, fourier_features, linear_positions


def _config(**overrides) -> PerceiverEncoderConfig:
    base = {
        "input_dim": 12,
        "num_latents": 6,
        "latent_dim": 16,
        "num_cross_attends": 3,
        "num_self_attends_per_block": 2,
        "cross_heads": 1,
        "self_heads": 4,
    }
    base.update(overrides)
    return PerceiverEncoderConfig(**base)


def test_paper_imagenet_configuration_parameter_count():
    """512 latents x 1024, 8 cross-attends, 6 latent layers per block, all but the first cross-attend
    shared, pixels + 2D Fourier features (64 bands: 261 channels), 1000 classes. Paper: 44.9M."""
    input_dim = fourier_feature_dim(2, 64) + 3
    assert input_dim == 261
    cfg = PerceiverEncoderConfig(
        input_dim=input_dim,
        num_latents=512,
        latent_dim=1024,
        num_cross_attends=8,
        num_self_attends_per_block=6,
        cross_heads=1,
        self_heads=8,
    )
    model = PerceiverClassifier(cfg, 1000, head="mean", device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert len(model.encoder.cross_attends) == 2 and len(model.encoder.latent_blocks) == 1
    assert model.encoder.cross_schedule == [0, 1, 1, 1, 1, 1, 1, 1]
    print(f"paper ImageNet Perceiver: {total / 1e6:.2f}M parameters (paper: 44.9M)")
    assert abs(total / 1e6 - 44.9) < 0.1


@pytest.mark.parametrize(
    "sharing, share_latents, n_cross, n_latent",
    [("all_but_first", True, 2, 1), ("none", True, 3, 1), ("all", False, 1, 3), ("none", False, 3, 3)],
)
def test_weight_sharing_schedule(sharing, share_latents, n_cross, n_latent):
    enc = PerceiverEncoder(_config(cross_sharing=sharing, share_latent_blocks=share_latents))
    assert len(enc.cross_attends) == n_cross and len(enc.latent_blocks) == n_latent
    # every unique module is used, and the parameter count is that of the unique modules only
    assert set(enc.cross_schedule) == set(range(n_cross)) and set(enc.latent_schedule) == set(range(n_latent))
    one_cross = sum(p.numel() for p in enc.cross_attends[0].parameters())
    one_block = sum(p.numel() for p in enc.latent_blocks[0].parameters())
    assert sum(p.numel() for p in enc.parameters()) == n_cross * one_cross + n_latent * one_block + 6 * 16


def test_shared_weights_are_reused_not_copied():
    """Changing the shared cross-attend changes the output; the encoder really runs it several times."""
    torch.manual_seed(0)
    enc = PerceiverEncoder(_config(num_cross_attends=4)).eval()
    x = torch.randn(2, 9, 12)
    calls = []
    hook = enc.cross_attends[1].register_forward_hook(lambda *a: calls.append(1))
    enc(x)
    hook.remove()
    assert len(calls) == 3


@pytest.mark.parametrize("num_cross_attends", [1, 3])
def test_shape_independent_of_input_length(num_cross_attends):
    enc = PerceiverEncoder(_config(num_cross_attends=num_cross_attends))
    for m in (1, 7, 50):
        assert enc(torch.randn(2, m, 12)).shape == (2, 6, 16)


def test_padding_changes_nothing():
    torch.manual_seed(0)
    model = PerceiverClassifier(_config(), 4).eval()
    x = torch.randn(3, 10, 12)
    lengths = [10, 6, 1]
    mask = torch.arange(10)[None] < torch.tensor(lengths)[:, None]
    padded = x.masked_fill(~mask[..., None], 1e3)  # garbage in the padding
    out = model(padded, mask)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i], model(x[i : i + 1, :n])[0], atol=1e-5, rtol=1e-5)


def test_permutation_invariance_with_positions_as_features():
    """Positions carried as Fourier features: permuting the input elements changes nothing."""
    torch.manual_seed(0)
    pos = linear_positions((4, 5)).reshape(-1, 2)  # (20, 2)
    feats = fourier_features(pos, 4, (4, 5))  # (20, 18)
    x = torch.cat([torch.randn(2, 20, 3), feats.expand(2, -1, -1)], dim=-1)
    model = PerceiverClassifier(_config(input_dim=x.shape[-1]), 5).eval()
    perm = torch.randperm(20)
    torch.testing.assert_close(model(x[:, perm]), model(x), atol=1e-5, rtol=1e-5)


def test_sdpa_and_reference_paths_agree():
    torch.manual_seed(0)
    fast = PerceiverEncoder(_config(use_sdpa=True)).eval()
    slow = PerceiverEncoder(_config(use_sdpa=False)).eval()
    slow.load_state_dict(fast.state_dict())
    x, mask = torch.randn(2, 9, 12), torch.rand(2, 9) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(fast(x, mask), slow(x, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["query", "mean"])
def test_gradients_reach_every_parameter(head):
    torch.manual_seed(0)
    model = PerceiverClassifier(_config(cross_sharing="none", share_latent_blocks=False), 3, head=head)
    x, mask = torch.randn(2, 7, 12), torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    model(x, mask).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_tiny_overfit():
    """A few labelled sets, memorised: the loss must fall well below chance level."""
    torch.manual_seed(0)
    model = PerceiverClassifier(_config(num_cross_attends=2, num_self_attends_per_block=1), 4)
    x, y = torch.randn(8, 10, 12), torch.arange(8) % 4
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, loss.item()


def test_config_yaml_round_trip(tmp_path):
    from resampler.config import load_config, save_config

    cfg = _config(cross_qk_dim=8, cross_sharing="none")
    save_config(cfg, tmp_path / "perceiver.yaml")
    assert load_config(PerceiverEncoderConfig, tmp_path / "perceiver.yaml") == cfg
    assert load_config(PerceiverEncoderConfig, tmp_path / "perceiver.yaml", ["num_latents=3"]).num_latents == 3


def test_bad_inputs_raise_clear_errors():
    enc = PerceiverEncoder(_config())
    with pytest.raises(ValueError, match=r"\(B, M, C=12\)"):
        enc(torch.randn(2, 5, 11))
    with pytest.raises(ValueError, match=r"\(B, M, C=12\)"):
        enc(torch.randn(5, 12))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, M\)=\(2, 5\)"):
        enc(torch.randn(2, 5, 12), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean"):
        enc(torch.randn(2, 5, 12), torch.ones(2, 5))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"cross_sharing": "some"}, "cross_sharing"),
        ({"self_heads": 3}, "self_qk_dim=16 must be a positive multiple of heads=3"),
        ({"cross_qk_dim": 10, "cross_heads": 4}, "cross_qk_dim=10"),
        ({"num_latents": 0}, "num_latents"),
        ({"cross_qk_from": "x"}, "cross_qk_from"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)
    with pytest.raises(ValueError, match="head must be"):
        PerceiverClassifier(_config(), 3, head="max")
