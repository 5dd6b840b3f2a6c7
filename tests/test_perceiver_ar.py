"""Perceiver AR: causality, cached generation == recomputation, padding, overfit, errors."""

import pytest
import torch

from resampler.models.perceiver_ar import PerceiverAR, PerceiverARCache, PerceiverARConfig


def _model(**overrides) -> PerceiverAR:
    base = {"vocab_size": 40, "max_seq_len": 64, "num_latents": 6, "dim": 32, "depth": 3, "heads": 4}
    base.update(overrides)
    torch.manual_seed(0)
    return PerceiverAR(PerceiverARConfig(**base)).eval()


def test_logits_for_the_last_n_positions_whatever_the_length():
    model = _model()
    for length in (1, 4, 6, 20):
        assert model(torch.randint(0, 40, (2, length))).shape == (2, min(6, length), 40)
    assert model(torch.randint(0, 40, (2, 20)), num_latents=9).shape == (2, 9, 40)


def test_no_position_sees_the_future_perturbation():
    """Changing token j changes no logit at a position before j (prefix and latent positions alike)."""
    model = _model()
    tokens = torch.randint(0, 40, (1, 20))
    base = model(tokens)  # positions 14..19
    for j in (3, 14, 16, 19):
        changed = tokens.clone()
        changed[0, j] = (changed[0, j] + 1) % 40
        out = model(changed)
        first_seeing = max(j - 14, 0)  # latents at positions >= j see token j
        torch.testing.assert_close(out[:, :first_seeing], base[:, :first_seeing], atol=1e-6, rtol=1e-6)
        assert (out[:, first_seeing:] - base[:, first_seeing:]).abs().amax(dim=-1).gt(1e-6).all()


def test_no_position_sees_the_future_gradient():
    """d logits[p] / d embedding[j] is exactly zero for every j > p, and nonzero for every j <= p."""
    model = _model()
    tokens = torch.randint(0, 40, (1, 16))
    emb = model.token_embedding(tokens).detach().requires_grad_(True)
    hook = model.token_embedding.register_forward_hook(lambda module, args, out: emb)
    try:
        logits = model(tokens)  # positions 10..15
    finally:
        hook.remove()
    for i, p in enumerate(range(10, 16)):
        (grad,) = torch.autograd.grad(logits[0, i].sum(), emb, retain_graph=True)
        assert torch.all(grad[0, p + 1 :] == 0), p
        assert grad[0, : p + 1].abs().sum(-1).gt(0).all(), p


@pytest.mark.parametrize("prefix_len", [3, 6, 10])
def test_cached_generation_equals_recomputation(prefix_len):
    """Greedy and sampled generation: same tokens and logits with and without the cache, including a
    window rebuild (max_generation_latents=9 is reached within 12 new tokens)."""
    model = _model(max_generation_latents=9)
    prefix = torch.randint(0, 40, (2, prefix_len))
    cached, logits_c = model.generate(prefix, 12, use_cache=True, return_logits=True)
    fresh, logits_f = model.generate(prefix, 12, use_cache=False, return_logits=True)
    assert torch.equal(cached, fresh) and cached.shape == (2, prefix_len + 12)
    torch.testing.assert_close(logits_c, logits_f, atol=1e-5, rtol=1e-5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = model.generate(prefix, 12, temperature=1.0, generator=g1)
    s2 = model.generate(prefix, 12, temperature=1.0, generator=g2, use_cache=False)
    assert torch.equal(s1, s2)


def test_generation_logits_are_the_models_next_token_logits():
    """The first generated token's logits equal forward()'s logits at the last prefix position."""
    model = _model()
    prefix = torch.randint(0, 40, (2, 10))
    _, logits = model.generate(prefix, 1, return_logits=True)
    torch.testing.assert_close(logits[:, 0], model(prefix)[:, -1], atol=1e-5, rtol=1e-5)


def test_cache_prefill_matches_and_grows():
    model = _model()
    tokens = torch.randint(0, 40, (2, 12))
    cache = PerceiverARCache(3)
    torch.testing.assert_close(model(tokens, cache=cache), model(tokens), atol=1e-6, rtol=1e-6)
    assert cache.length == 12 and cache.num_latents == 6


def test_left_padding_changes_nothing():
    model = _model()
    tokens = torch.randint(0, 40, (1, 12))
    padded = torch.cat([torch.full((1, 5), 7), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(padded, mask), model(tokens), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    model = _model().train()
    tokens = torch.randint(0, 40, (2, 14))
    model(tokens).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_tiny_overfit_mirrored_copy():
    """Learn to copy: sequence = x + reversed(x); the latents predict the mirrored half."""
    torch.manual_seed(0)
    model = PerceiverAR(PerceiverARConfig(vocab_size=10, max_seq_len=16, num_latents=8, dim=32, depth=2, heads=4))
    x = torch.randint(0, 10, (16, 8))
    seq = torch.cat([x, x.flip(1)], dim=1)  # (16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(80):
        logits = model(seq[:, :-1], num_latents=7)  # predict positions 9..15 from 8..14
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), seq[:, 9:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, loss.item()  # chance: ln(10) = 2.3


def test_bad_inputs_and_configs_raise_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match=r"integer ids of shape \(B, L\)"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 40\)"):
        model(torch.full((1, 3), 40))
    with pytest.raises(ValueError, match=r"mask must be bool of shape \(B, L\)"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="beyond max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="a cache needs unpadded sequences"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), cache=PerceiverARCache(3))
    with pytest.raises(ValueError, match="num_latents=70 must be <= max_seq_len=64"):
        PerceiverARConfig(max_seq_len=64, num_latents=70)
    with pytest.raises(ValueError, match="divisible by heads"):
        PerceiverARConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="max_generation_latents"):
        PerceiverARConfig(num_latents=8, max_generation_latents=4)
