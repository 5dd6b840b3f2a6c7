"""VisionLanguageModel in prefix mode on tiny offline parts: splicing, labels, images, generation, errors."""

from __future__ import annotations

import pytest
import torch

from vlm.testing import tiny_images, tiny_vlm


@pytest.fixture(scope="module")
def model():
    return tiny_vlm("llama").eval()


def test_forward_backward_smoke(model):
    batch = model.processor(["Caption:", ""], captions=["a red circle", "two blue squares"], num_images=1)
    out = model(images=tiny_images(2), **batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.language_model.config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    model.zero_grad(set_to_none=True)
    assert len(model.generate(tiny_images(2), "Caption:", max_new_tokens=3)) == 2
