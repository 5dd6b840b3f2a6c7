"""The resampler attending in the media's own space equals the projected resampler, gradients included."""

import pytest
import torch

from resampler import flamingo
from resampler.flamingo import PerceiverResampler


def twins(**kw) -> tuple[PerceiverResampler, PerceiverResampler]:
    """Float64 twins with equal weights: one folds (a shape where it pays), one projects keys/values."""
    torch.manual_seed(0)
    defaults = dict(dim=32, depth=2, num_latents=3, heads=2, head_dim=16)
    defaults.update(kw)
    folded = PerceiverResampler(**defaults).double()
    for layer in folded.layers:  # opt-in: not automatic for the resampler (see PerceiverResampler._folds)
        layer.attn.fold_kv = True
    with torch.no_grad():  # norm affines away from (1, 0) so that folding them is exercised
        for name, p in folded.named_parameters():
            if "norm" in name:
                p.add_(0.5 * torch.randn_like(p))
    projected = PerceiverResampler(**defaults).double()
    projected.load_state_dict(folded.state_dict())
    for layer in projected.layers:
        layer.attn.fold_kv = False
    return folded, projected


def run(model, x, weight, **kw):
    out = model(x, **kw)
    inputs = [p for _, p in sorted(model.named_parameters())] + ([x] if x.requires_grad else [])
    return out, torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)


def assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-11)
    assert len(grads_a) == len(grads_b)
    for got, want in zip(grads_a, grads_b):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


CASES = {
    "plain": ({}, {}),
    "rmsnorm_gqa_swiglu": (dict(norm="rmsnorm", num_kv_heads=1, ff_gated=True, ff_activation="silu"), {}),
    "per_media_embedding": (dict(max_media=3), {}),  # frozen media: the closed-form token path
    "frames_and_media_embeddings": (dict(max_media=3, max_frames=2), {}),
    "patch_positions": (dict(num_patch_positions=7), {}),  # per-patch embedding: stays projected
    "out_proj": (dict(out_dim=5), {}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("media_grad", [False, True])
def test_folded_resampler_equals_projected(case, masked, media_grad):
    model_kw, _ = CASES[case]
    folded, projected = twins(**model_kw)
    frames = 2 if "max_frames" in model_kw else 1
    x = torch.randn(2, 3, frames, 7, 32, dtype=torch.float64, requires_grad=media_grad)
    call = {}
    if masked:
        mask = torch.rand(2, 3, frames, 7) > 0.4
        mask[0, 1] = False  # a media item with every patch masked
        call["mask"] = mask
        call["media_mask"] = torch.tensor([[True, True, False], [True, True, True]])
    weight = torch.randn(2, 3, 3, folded.out_dim, dtype=torch.float64)
    assert_same(run(folded, x, weight, **call), run(projected, x, weight, **call))


def test_the_fold_is_taken_only_when_asked(monkeypatch):
    calls = []
    real = flamingo._folded_layer
    monkeypatch.setattr(flamingo, "_folded_layer", lambda *a: calls.append(1) or real(*a))
    folded, projected = twins(max_media=2)
    x = torch.randn(2, 2, 7, 32, dtype=torch.float64)
    folded(x).sum().backward()
    assert len(calls) == 2  # every layer
    projected(x)
    assert len(calls) == 2  # switched off
    # Automatic (fold_kv=None): the resampler projects, even where folding takes fewer multiply-adds.
    automatic = PerceiverResampler(dim=32, depth=2, num_latents=3, heads=2, head_dim=16).double()
    assert automatic.layers[0].attn._folds(3, 7 + 3)
    automatic(x)
    assert len(calls) == 2


def test_per_media_embedding_gradient_needs_no_media_gradient(monkeypatch):
    """The closed form is what runs: the media's normalised features never get a gradient."""
    seen = []
    real = flamingo._MediaToken.backward
    monkeypatch.setattr(flamingo._MediaToken, "backward", staticmethod(lambda ctx, g: seen.append(1) or real(ctx, g)))
    folded, projected = twins(max_media=3)
    x = torch.randn(2, 3, 7, 32, dtype=torch.float64)
    weight = torch.randn(2, 3, 3, 32, dtype=torch.float64)
    assert_same(run(folded, x, weight), run(projected, x, weight))
    assert seen == [1]
