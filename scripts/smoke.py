"""Core smoke example: the shared attention core, a Perceiver Resampler, and a parity check.

    .venv/bin/python scripts/smoke.py        # ~5 s on 2 CPU cores

Expected: the SDPA and reference attention paths agree to ~1e-7, and 257 patches of 4 images
are resampled to 64 latents each.
"""

import torch

from resampler import Attention, AttentionSpec, PerceiverResampler, ResamplerConfig


def main() -> None:
    torch.manual_seed(0)
    spec = AttentionSpec(heads=8, head_dim=32)
    attn, reference = Attention(256, 128, spec), Attention(256, 128, spec.replace(use_sdpa=False))
    reference.load_state_dict(attn.state_dict())
    x, context = torch.randn(2, 64, 256), torch.randn(2, 1000, 128)
    mask = torch.rand(2, 1000) > 0.1
    diff = (attn(x, context, mask) - reference(x, context, mask)).abs().max()
    print(f"attention: SDPA vs reference max |diff| = {diff:.2e}")
    resampler = PerceiverResampler(ResamplerConfig(dim=256, depth=2, num_latents=64, heads=8, head_dim=32))
    tokens = resampler(torch.randn(4, 257, 256))
    print(f"resampler: (4, 257, 256) patches -> {tuple(tokens.shape)} latents")


if __name__ == "__main__":
    main()
