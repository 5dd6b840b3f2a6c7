"""Parity of the resampler with flamingo-pytorch and transformers' Idefics2, weights copied by our converters.

Outputs agree at fp32 1e-5. Parameter gradients are sums of many terms (size ~50 here), and in fp32
both implementations sit ~5e-5 away from the float64 truth, so they are compared in float64 (1e-9)
for flamingo-pytorch; Idefics2's RMSNorm always computes in fp32, so its gradients are compared in fp32
to 1e-5 of the gradient's scale.
"""

import pytest
import torch
from flamingo_pytorch import PerceiverResampler as FlamingoResampler
from transformers import Idefics2Config, Idefics2PerceiverConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector, Idefics2PerceiverResampler

from resampler.convert import from_flamingo_pytorch, from_idefics2

TOL = {"atol": 1e-5, "rtol": 1e-5}


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter, norms included (their ones/zeros init would hide swaps)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if "norm" in name else p.shape[-1] ** -0.5
            offset = 1.0 if "norm" in name and "weight" in name else 0.0
            p.copy_(offset + scale * torch.randn(p.shape, generator=gen))


GRAD_TOL = {"atol": 1e-9, "rtol": 1e-9}


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got is not None and got.dtype == want.dtype, name
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, want, **GRAD_TOL, msg=lambda m: f"{name}: {m}")
    else:  # fp32: relative to the gradient's scale
        err, scale = (got - want).abs().max().item(), want.abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: max error {err:.3g} vs gradient scale {scale:.3g}"


def assert_grads_match(ours, theirs_grads: dict[str, torch.Tensor], mapping) -> None:
    for our_name, their_name in mapping:
        assert_grad_close(ours.get_parameter(our_name).grad, theirs_grads[their_name], f"{our_name} vs {their_name}")


@pytest.mark.parametrize(
    "dim,depth,heads,dim_head,num_latents,ff_mult",
    [(32, 1, 1, 32, 4, 4), (48, 2, 4, 8, 5, 2), (64, 3, 8, 8, 64, 2), (40, 2, 2, 24, 3, 1.5)],
)
@pytest.mark.parametrize("media_time", [True, False])
def test_flamingo_pytorch_parity(dim, depth, heads, dim_head, num_latents, ff_mult, media_time):
    torch.manual_seed(dim + depth)
    theirs = FlamingoResampler(
        dim=dim,
        depth=depth,
        dim_head=dim_head,
        heads=heads,
        num_latents=num_latents,
        num_media_embeds=3,
        ff_mult=ff_mult,
    )
    randomize_(theirs, seed=dim)
    if not media_time:  # "without": the peer's table is zero and ours has none
        with torch.no_grad():
            theirs.media_pos_emb.zero_()
    ours = from_flamingo_pytorch(theirs, media_time_embeddings=media_time)
    assert (ours.media_time_embeddings is None) != media_time

    for x in (torch.randn(2, 3, 11, dim), torch.randn(3, 9, dim)):  # (B, T, P, D) and (B, P, D)
        expected = theirs(x)  # (B, T, N, D); (B, 1, N, D) for (B, P, D) input, as ours
        got = ours(x)
        assert got.shape == expected.shape == (x.shape[0], x.shape[1] if x.dim() == 4 else 1, num_latents, dim)
        torch.testing.assert_close(got, expected, **TOL)

    theirs, ours = theirs.double(), ours.double()
    x = torch.randn(2, 3, 11, dim, dtype=torch.float64)
    weight = torch.randn(2, 3, num_latents, dim, dtype=torch.float64)
    (theirs(x) * weight).sum().backward()
    (ours(x) * weight).sum().backward()
    their_grads = {n: p.grad for n, p in theirs.named_parameters()}
    mapping = [("latents", "latents"), ("norm.weight", "norm.weight")]
    for i in range(depth):
        mapping += [
            (f"layers.{i}.norm_kv.weight", f"layers.{i}.0.norm_media.weight"),
            (f"layers.{i}.norm_kv.bias", f"layers.{i}.0.norm_media.bias"),
            (f"layers.{i}.norm_q.weight", f"layers.{i}.0.norm_latents.weight"),
            (f"layers.{i}.attn.to_q.weight", f"layers.{i}.0.to_q.weight"),
            (f"layers.{i}.attn.to_kv.weight", f"layers.{i}.0.to_kv.weight"),
            (f"layers.{i}.attn.to_out.weight", f"layers.{i}.0.to_out.weight"),
            (f"layers.{i}.norm_ff.bias", f"layers.{i}.1.0.bias"),
            (f"layers.{i}.ff.fc1.weight", f"layers.{i}.1.1.weight"),
            (f"layers.{i}.ff.fc2.weight", f"layers.{i}.1.3.weight"),
        ]
    assert_grads_match(ours, their_grads, mapping)
    if media_time:
        assert_grad_close(ours.media_time_embeddings.grad, theirs.media_pos_emb.grad[:, 0], "media_time_embeddings")


def test_flamingo_converter_rejects_other_modules():
    with pytest.raises(TypeError, match="flamingo_pytorch.PerceiverResampler"):
        from_flamingo_pytorch(torch.nn.Linear(2, 2))


def idefics2_resampler(seed: int, **overrides) -> Idefics2PerceiverResampler:
    kw = dict(
        hidden_size=48,
        resampler_n_latents=6,
        resampler_depth=2,
        resampler_n_heads=4,
        resampler_head_dim=12,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
    )
    kw.update(overrides)
    model = Idefics2PerceiverResampler(Idefics2PerceiverConfig(**kw)).eval()
    randomize_(model, seed)
    return model


def padding_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, length - 2 * row :] = 0  # each row a different amount of padding
    return mask


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA 4 heads / 2 kv heads, SiLU
        {"num_key_value_heads": 1, "hidden_act": "gelu"},  # multi-query
        {"num_key_value_heads": 4, "resampler_depth": 3, "resampler_n_latents": 64},  # no grouping, 64 latents
        {"hidden_size": 32, "resampler_head_dim": 16, "resampler_n_heads": 2, "rms_norm_eps": 1e-5},
    ],
)
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_idefics2_parity_with_and_without_mask(overrides, attn_impl):
    theirs = idefics2_resampler(seed=len(overrides), **overrides)
    theirs.config._attn_implementation = attn_impl
    ours = from_idefics2(theirs)
    dim = theirs.config.hidden_size
    x = torch.randn(3, 13, dim)
    for mask in (torch.ones(3, 13, dtype=torch.long), padding_mask(3, 13)):
        expected = theirs(context=x, attention_mask=mask)
        got = ours(x, mask.bool())
        assert got.shape == (3, 1, theirs.config.resampler_n_latents, dim)
        torch.testing.assert_close(got[:, 0], expected, **TOL)
    if not mask.all():  # unmasked call of ours = Idefics2 with an all-ones mask
        torch.testing.assert_close(ours(x)[:, 0], theirs(context=x, attention_mask=torch.ones_like(mask)), **TOL)

    weight = torch.randn(3, theirs.config.resampler_n_latents, dim)
    (theirs(context=x, attention_mask=mask) * weight).sum().backward()
    (ours(x, mask.bool())[:, 0] * weight).sum().backward()
    their_grads = {n: p.grad for n, p in theirs.named_parameters()}
    gate, up = their_grads["layers.0.mlp.gate_proj.weight"], their_grads["layers.0.mlp.up_proj.weight"]
    assert_grad_close(ours.layers[0].ff.fc1.weight.grad, torch.cat([gate, up]), "fc1")
    k, v = their_grads["layers.0.self_attn.k_proj.weight"], their_grads["layers.0.self_attn.v_proj.weight"]
    assert_grad_close(ours.layers[0].attn.to_kv.weight.grad, torch.cat([k, v]), "to_kv")
    mapping = [("latents", "latents"), ("norm.weight", "norm.weight")]
    for i in range(theirs.config.resampler_depth):
        mapping += [
            (f"layers.{i}.norm_q.weight", f"layers.{i}.input_latents_norm.weight"),
            (f"layers.{i}.norm_kv.weight", f"layers.{i}.input_context_norm.weight"),
            (f"layers.{i}.attn.to_q.weight", f"layers.{i}.self_attn.q_proj.weight"),
            (f"layers.{i}.attn.to_out.weight", f"layers.{i}.self_attn.o_proj.weight"),
            (f"layers.{i}.norm_ff.weight", f"layers.{i}.post_attention_layernorm.weight"),
            (f"layers.{i}.ff.fc2.weight", f"layers.{i}.mlp.down_proj.weight"),
        ]
    assert_grads_match(ours, their_grads, mapping)


def test_idefics2_parity_through_the_full_config():
    """Idefics2Config -> Idefics2Connector: the converter finds the resampler inside it."""
    config = Idefics2Config(
        perceiver_config={
            "hidden_size": 40,
            "resampler_n_latents": 8,
            "resampler_depth": 1,
            "resampler_n_heads": 4,
            "resampler_head_dim": 10,
            "num_key_value_heads": 2,
        },
        vision_config={"hidden_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
        text_config={
            "model_type": "mistral",
            "hidden_size": 40,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 100,
        },
    )
    connector = Idefics2Connector(config).eval()
    randomize_(connector, seed=3)
    ours = from_idefics2(connector)
    x = torch.randn(2, 9, config.perceiver_config.hidden_size)
    mask = padding_mask(2, 9)
    expected = connector.perceiver_resampler(context=x, attention_mask=mask)
    torch.testing.assert_close(ours(x, mask.bool())[:, 0], expected, **TOL)


def test_idefics2_converter_rejects_other_modules():
    with pytest.raises(TypeError, match="Idefics2PerceiverResampler"):
        from_idefics2(torch.nn.Linear(2, 2))
