"""A converted model is a normal VisionLanguageModel: LoRA, QLoRA (bitsandbytes 4-bit on CPU), adapter
save/load, a training step, and its pretrained resampler plugged into another LLM."""

from __future__ import annotations

import copy

import pytest
import torch

from vlm import LoRAConfig, VisionLanguageModel, load_component
from vlm.convert import from_idefics, from_idefics2, idefics2_parts, idefics_parts
from vlm.convert.idefics2 import QLORA_SKIP
from vlm.convert.tiny import tiny_idefics, tiny_idefics2, tiny_photos
from vlm.testing import tiny_lm, tiny_tokenizer, tiny_vlm_config

LORA = LoRAConfig(r=4, alpha=8, dropout=0.0)


def _idefics2_batch(processor, captions=True):
    photos = tiny_photos(2, size=(40, 52))
    processor.tokenizer.padding_side = "right"
    text = ["<image>A photo of", "Look:<image>it is"]
    if captions:
        text = [t + " a red circle" for t in text]
    return processor(images=[[photos[0]], [photos[1]]], text=text, padding="longest", return_tensors="pt")


def _idefics_batch(processor):
    photos = tiny_photos(2)
    processor.tokenizer.padding_side = "right"
    prompts = [["User:", photos[0], "a red circle"], ["Hi", photos[1], "two shapes"]]
    return processor(text=prompts, padding="longest", return_tensors="pt")


def _inputs(batch):
    out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "images": batch["pixel_values"]}
    if "pixel_attention_mask" in batch:
        out["pixel_attention_mask"] = batch["pixel_attention_mask"]
    return out


def _train_step(model, inputs):
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-2, lora_lr=1e-2))
    model.train()
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    optimizer.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return loss, changed


@pytest.mark.parametrize("source", ["idefics", "idefics2"])
def test_lora_training_step_and_adapter_round_trip(source, tmp_path):
    build, convert, parts, batch_of = {
        "idefics": (tiny_idefics, from_idefics, idefics_parts, _idefics_batch),
        "idefics2": (tiny_idefics2, from_idefics2, idefics2_parts, _idefics2_batch),
    }[source]
    hf, processor = build()
    reference = copy.deepcopy(hf)
    model = convert(hf, processor.tokenizer, lora=LORA)
    batch = batch_of(processor)
    inputs = _inputs(batch)
    real = batch["attention_mask"].bool()
    with torch.no_grad():  # LoRA starts at zero: still the reference model
        torch.testing.assert_close(model(**inputs).logits[real], reference(**batch).logits[real], rtol=1e-4, atol=1e-4)
    loss, changed = _train_step(model, inputs)
    assert torch.isfinite(loss)
    assert any("lora_B" in n for n in changed) and any(n.startswith("resampler.") for n in changed)
    assert all("lora_" in n or n.startswith(("resampler.", "projector.", "xattn.")) for n in changed)
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_adapter(tmp_path / "adapter")
    fresh, _ = build()  # the same frozen base parts, loaded again
    again = VisionLanguageModel.load_adapter(tmp_path / "adapter", *parts(fresh), processor.tokenizer).eval()
    assert again.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, logits, rtol=0, atol=0)


def test_qlora_on_a_4bit_idefics2(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig, Idefics2ForConditionalGeneration

    # bitsandbytes' CPU 4-bit kernels need in_features >= their block size (64), and on CPUs with
    # AVX512-BF16 (eval, no grad) out_features divisible by 32: the text model at hidden 64.
    hf, processor = tiny_idefics2(sizes={"text_config": {"hidden_size": 64, "intermediate_size": 128}})
    hf.save_pretrained(tmp_path / "idefics2")

    def load(**quant):
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **quant)
        return Idefics2ForConditionalGeneration.from_pretrained(
            tmp_path / "idefics2", quantization_config=config, device_map="cpu"
        )

    with pytest.raises(ValueError, match="llm_int8_skip_modules"):
        from_idefics2(load(), processor.tokenizer)  # the connector quantized too: refused, clearly
    q = load(llm_int8_skip_modules=QLORA_SKIP)
    reference = copy.deepcopy(q)
    model = from_idefics2(q, processor.tokenizer, lora=LORA)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.language_model.modules())
    batch = _idefics2_batch(processor)
    inputs = _inputs(batch)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**batch).logits, rtol=1e-4, atol=1e-4)
    loss, changed = _train_step(model, inputs)
    assert torch.isfinite(loss) and any("lora_B" in n for n in changed)


def test_a_converted_resampler_plugs_into_another_llm(tmp_path):
    """The README's transplant: IDEFICS' pretrained resampler (at the vision width) kept fixed in a
    prefix-mode VLM on another LM; only a fresh projection head and LoRA train."""
    hf, processor = tiny_idefics()
    converted = from_idefics(hf, processor.tokenizer)
    converted.save_adapter(tmp_path / "idefics_adapter")
    vision, _ = idefics_parts(tiny_idefics()[0])
    tok = tiny_tokenizer()
    config = tiny_vlm_config(
        "gpt2", vision=converted.config.vision, resampler=copy.deepcopy(converted.config.resampler)
    )
    config.resampler.trainable = False
    model = VisionLanguageModel.from_parts(vision, tiny_lm("gpt2", tok), tok, config)
    model.resampler.load_state_dict(load_component(tmp_path / "idefics_adapter", "resampler."))
    trainable = sorted({name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad})
    assert trainable == ["lm", "projector"]
    pixels = _idefics_batch(processor)["pixel_values"][:, 0]  # (2, 3, H, W)
    with torch.no_grad():
        torch.testing.assert_close(
            model.resampler(model.vision(pixels)), converted.resampler(converted.vision(pixels)), rtol=0, atol=0
        )
    batch = model.processor(["Caption:"], captions=["a red circle"], num_images=1)
    model(images=pixels[:1], **batch).loss.backward()
    assert model.projector[0].weight.grad is not None


def test_a_bfloat16_reference_gets_an_fp32_connector():
    hf, processor = tiny_idefics2()
    reference = copy.deepcopy(hf).to(torch.bfloat16)
    model = from_idefics2(copy.deepcopy(hf).to(torch.bfloat16), processor.tokenizer)
    assert next(model.resampler.parameters()).dtype == torch.float32
    assert next(model.language_model.parameters()).dtype == torch.bfloat16
    batch = _idefics2_batch(processor)
    with torch.no_grad():
        got = model(**_inputs(batch)).logits.float()
        want = reference(**batch).logits.float()
        exact = hf(**batch).logits
    # bf16 rounding only: about as far from the fp32 model as the bf16 reference itself
    assert (got - exact).abs().max() <= 2 * (want - exact).abs().max() + 1e-2
