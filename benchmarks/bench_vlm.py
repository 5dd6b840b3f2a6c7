"""The whole VLM, same weights and inputs: ours converted from Idefics2 (prefix) and IDEFICS (cross-attention).

    .venv/bin/python benchmarks/bench_vlm.py                  # mid-size models, ~10 min on one thread
    .venv/bin/python benchmarks/bench_vlm.py --smoke          # tiny sizes, seconds
    .venv/bin/python benchmarks/bench_vlm.py --json out.json

Each reference is a randomly initialised transformers model at a mid-size CPU config (LM hidden 768,
6 layers, vocab 32,000; tower 384 wide, 4 layers, 196 patches; resampler 64 latents x 3 layers), and
ours is `vlm.convert.from_idefics2` / `from_idefics` of a copy of it. Two measurements, one thread,
process CPU time, the two models timed round-robin:

- training step: forward + backward of a batch of 4 samples x 2 images and a 32-token caption, the
  loss on the caption; the tower and the LM frozen in both, the trainable parts the reference's
  connector (Idefics2) or perceiver + gated cross-attention (IDEFICS) and their converted copies.
  Peak memory: torch CPU allocations during the step (`common.peak_memory_mb`).
- generation: greedy, KV cache, 32 prompts with one image each, 32 new tokens (``min_new_tokens``),
  ours ``generate_ids`` vs the reference's ``generate`` on the same processor output: tokens/s and
  whether every token is identical.

A missed goal comes with measured bounds. Training: the work both models share (the tower's forward
plus our LM's forward + backward with the connector's output given as a leaf), timed; with a free
connector, and with the connector's FLOPs (our step's count less the shared work's) run at this
machine's one-thread GEMM rate. Generation: ours' prefill (one new token) timed, plus the decode
steps' FLOPs at the GEMM rate. FLOPs come from torch's flop formulas (``common.count_flops``), which
miss CPU flash attention: the counts are low, so the bounds are generous.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import count_flops, gemm_flops, interleaved_ms, peak_memory_mb, report, spread  # noqa: E402

from vlm.convert import from_idefics, from_idefics2  # noqa: E402
from vlm.convert.tiny import tiny_idefics, tiny_idefics2, tiny_photos  # noqa: E402

TEXT = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 12}
VISION = {"image_size": 224, "patch_size": 16, "num_hidden_layers": 4, "num_attention_heads": 6}
SIZES = {
    "idefics2": {
        "text_config": {
            **TEXT,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
            "max_position_embeddings": 1024,
            "initializer_range": 0.02,
        },
        "vision_config": {**VISION, "hidden_size": 384, "intermediate_size": 1536, "initializer_range": 0.02},
        "perceiver_config": {
            "hidden_size": 768,
            "resampler_n_latents": 64,
            "resampler_depth": 3,
            "resampler_n_heads": 12,
            "resampler_head_dim": 64,
            "num_key_value_heads": 4,
            "initializer_range": 0.02,
        },
    },
    "idefics": {
        **TEXT,
        "vocab_size": 32000,
        "max_position_embeddings": 1024,
        "initializer_range": 0.02,
        "vision_config": {**VISION, "embed_dim": 384, "intermediate_size": 1536},
        "perceiver_config": {"resampler_n_latents": 64, "resampler_depth": 3, "resampler_n_heads": 8},
    },
}
SMOKE_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
SMOKE = {
    "idefics2": {
        "text_config": {**SMOKE_TEXT, "vocab_size": 1000},
        "perceiver_config": {"hidden_size": 64, "resampler_n_latents": 16},
    },
    "idefics": {**SMOKE_TEXT, "vocab_size": 1000, "perceiver_config": {"resampler_n_latents": 16}},
}
WORDS = [
    "a",
    "red",
    "circle",
    "above",
    "two",
    "small",
    "blue",
    "squares",
    "near",
    "the",
    "left",
    "edge",
    "of",
    "a",
    "green",
    "field",
]


def build(name: str, smoke: bool):
    """(reference in train mode with frozen tower and LM, ours converted from a copy, processor)."""
    sizes = (SMOKE if smoke else SIZES)[name]
    if name == "idefics2":
        hf, processor = tiny_idefics2(sizes=sizes)
        trainable = [hf.model.connector]
        ours = from_idefics2(copy.deepcopy(hf), processor.tokenizer)
    else:
        hf, processor = tiny_idefics(cross_layer_interval=2, qk_norms=False, sizes=sizes)
        trainable = [hf.model.perceiver_resampler, hf.model.gated_cross_attn_layers]
        ours = from_idefics(copy.deepcopy(hf), processor.tokenizer)
    hf.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)
    return hf.train(), ours.train(), processor


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def inputs(name: str, processor, *, batch: int, images: int, caption_words: int, padding_side: str, seed: int = 0):
    """The processor's batch for ``batch`` samples of ``images`` images and a caption (labels on the
    caption only) -> (reference kwargs, our kwargs)."""
    tok = processor.tokenizer
    tok.padding_side = padding_side
    photos = tiny_photos(batch * images, seed=seed, size=(224, 224))
    words = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(caption_words)) for i in range(batch)]
    per_sample = [photos[i * images : (i + 1) * images] for i in range(batch)]
    if name == "idefics2":
        text = [("<image>" * images) + "Caption:" + (f" {w}" if w else "") for w in words]
        data = processor(images=per_sample, text=text, padding="longest", return_tensors="pt")
        ours = {"images": data["pixel_values"], "pixel_attention_mask": data["pixel_attention_mask"]}
    else:
        prompts = [[*p, "Caption:" + (f" {w}" if w else "")] for p, w in zip(per_sample, words)]
        data = processor(text=prompts, padding="longest", return_tensors="pt")
        ours = {"images": data["pixel_values"]}
    ours.update(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    return dict(data), ours


def with_caption_labels(name, processor, reference: dict, ours: dict, images: int) -> None:
    """Labels = the caption tokens (the prompt, images and padding ignored), added to both kwargs."""
    tok = processor.tokenizer
    if name == "idefics2":
        prompt = processor(images=[tiny_photos(images)], text=["<image>" * images + "Caption:"], return_tensors="pt")
    else:
        prompt = processor(text=[[*tiny_photos(images), "Caption:"]], return_tensors="pt")
    start = prompt["input_ids"].shape[1]
    labels = reference["input_ids"].clone()
    labels[:, :start] = -100
    labels[reference["attention_mask"] == 0] = -100
    assert tok.padding_side == "right" and (labels != -100).any()
    reference["labels"] = ours["labels"] = labels


def training_step(model, kwargs: dict):
    model.zero_grad(set_to_none=True)
    loss = model(**kwargs).loss
    loss.backward()
    return loss


def grad_norm(model) -> float:
    return float(sum(p.grad.double().square().sum() for p in model.parameters() if p.grad is not None).sqrt())


def bench_training(name: str, hf, ours, processor, smoke: bool, repeats: int, gemm: float) -> dict:
    images = 2
    reference, mine = inputs(name, processor, batch=2 if smoke else 4, images=images, caption_words=4 if smoke else 24,
                             padding_side="right")  # fmt: skip
    with_caption_labels(name, processor, reference, mine, images)
    loss_ref, loss_ours = training_step(hf, reference), training_step(ours, mine)
    parity = {
        "loss_ref": float(loss_ref),
        "loss_delta": abs(float(loss_ref) - float(loss_ours)),
        "grad_norm_rel_delta": abs(grad_norm(hf) - grad_norm(ours)) / max(grad_norm(hf), 1e-30),
        "trainable_ref": _count(hf),
        "trainable_ours": _count(ours),
    }
    timed = interleaved_ms(
        {"reference": lambda: training_step(hf, reference), "ours": lambda: training_step(ours, mine)},
        warmup=1,
        repeats=repeats,
        clock=time.process_time,
    )
    floor = shared_floor_ms(ours, mine, repeats)
    connector_flops = count_flops(lambda: training_step(ours, mine)) - floor["flops"]
    at_ceiling = floor["tower"] + floor["lm"] + connector_flops / gemm * 1e3
    memory = {
        key: peak_memory_mb(lambda m=m, k=k: training_step(m, k), setup=lambda m=m: m.zero_grad(set_to_none=True))
        for key, m, k in (("reference", hf, reference), ("ours", ours, mine))
    }
    return {
        "tokens": list(reference["input_ids"].shape),
        "ms": {k: v[0] for k, v in timed.items()},
        "spread": {k: spread(v[1]) for k, v in timed.items()},
        "peak_mib": memory,
        "speedup": timed["reference"][0] / timed["ours"][0],
        "floor_ms": floor,
        "bound": timed["reference"][0] / (floor["tower"] + floor["lm"]),
        "connector_gflop": connector_flops / 1e9,
        "ceiling_ms": at_ceiling,
        "ceiling_bound": timed["reference"][0] / at_ceiling,
        "memory_ratio": memory["ours"] / memory["reference"],
        **parity,
    }


def shared_floor_ms(ours, kwargs: dict, repeats: int) -> dict:
    """What any implementation with these frozen weights runs: the tower's forward and the LM's forward +
    backward to its image inputs (our step with the connector's output given as a leaf). A perfect
    connector would cost nothing beyond them: reference ms / (tower + lm) bounds the possible speed-up.
    Also their FLOPs (``flops``), to separate the connector's share of a step's count."""
    images = {k: v for k, v in kwargs.items() if k in ("images", "pixel_attention_mask")}
    per_sample = ours.processor.count_images(kwargs["input_ids"]).tolist()
    tower = {}

    def started(_module, args, kwargs):
        tower.update(args=args, kwargs=kwargs, start=time.process_time())

    hook = ours.vision.register_forward_pre_hook(started, with_kwargs=True)
    done = ours.vision.register_forward_hook(lambda *_: tower.update(ms=(time.process_time() - tower["start"]) * 1e3))
    try:
        with torch.no_grad():
            media, counts = ours.encode_images(**images, per_sample=per_sample)
    finally:
        hook.remove()
        done.remove()
    with torch.no_grad():
        tower_flops = count_flops(lambda: ours.vision(*tower["args"], **tower["kwargs"]))
    leaf = media.detach().requires_grad_(True)
    text = {k: v for k, v in kwargs.items() if k not in images}
    with mock.patch.object(ours, "encode_images", lambda *a, **k: (leaf, counts)):
        lm = interleaved_ms(
            {"lm": lambda: training_step(ours, text)}, warmup=1, repeats=repeats, clock=time.process_time
        )
        lm_flops = count_flops(lambda: training_step(ours, text))
    return {"tower": tower["ms"], "lm": lm["lm"][0], "flops": tower_flops + lm_flops}


def bench_generation(name: str, hf, ours, processor, smoke: bool, repeats: int, gemm: float) -> dict:
    hf.eval()
    ours.eval()
    n, new = (4, 4) if smoke else (32, 32)
    reference, mine = inputs(name, processor, batch=n, images=1, caption_words=0, padding_side="left", seed=1)
    tok = processor.tokenizer
    bad = [[tok.convert_tokens_to_ids("<image>")], [tok.convert_tokens_to_ids("<fake_token_around_image>")]]
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "num_beams": 1, "bad_words_ids": bad}
    length = reference["input_ids"].shape[1]
    want = hf.generate(**reference, **kwargs)[:, length:]
    got = ours.generate_ids(**mine, **kwargs)
    timed = interleaved_ms(
        {"reference": lambda: hf.generate(**reference, **kwargs), "ours": lambda: ours.generate_ids(**mine, **kwargs)},
        warmup=0,
        repeats=repeats,
        clock=time.process_time,
    )
    first = {**kwargs, "max_new_tokens": 1, "min_new_tokens": 1}  # prefill: tower, connector, LM over the prompt
    prefill = interleaved_ms(
        {"ours": lambda: ours.generate_ids(**mine, **first)}, warmup=0, repeats=repeats, clock=time.process_time
    )
    decode_flops = count_flops(lambda: ours.generate_ids(**mine, **kwargs)) - count_flops(
        lambda: ours.generate_ids(**mine, **first)
    )
    at_ceiling = prefill["ours"][0] + decode_flops / gemm * 1e3
    tokens = n * new
    return {
        "prefill_ms": prefill["ours"][0],
        "decode_gflop": decode_flops / 1e9,
        "ceiling_ms": at_ceiling,
        "ceiling_bound": timed["reference"][0] / at_ceiling,
        "prompts": n,
        "new_tokens": new,
        "prompt_tokens": length,
        "ms": {k: v[0] for k, v in timed.items()},
        "spread": {k: spread(v[1]) for k, v in timed.items()},
        "tokens_per_s": {k: tokens / (v[0] / 1e3) for k, v in timed.items()},
        "speedup": timed["reference"][0] / timed["ours"][0],
        "identical": bool(torch.equal(want, got)),
        "identical_fraction": float((want == got).float().mean()) if want.shape == got.shape else 0.0,
    }


def run(smoke: bool = False, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = {}
    try:
        for name, mode in (("idefics2", "prefix"), ("idefics", "cross_attention")):
            hf, ours, processor = build(name, smoke)
            gemm = gemm_flops(256 if smoke else 2048, repeats=3)  # this row's ceiling, one thread
            rows[name] = {
                "mode": mode,
                "gemm_gflops": gemm / 1e9,
                "train": bench_training(name, hf, ours, processor, smoke, repeats, gemm),
                "generate": bench_generation(name, hf, ours, processor, smoke, repeats, gemm),
            }
            del hf, ours
    finally:
        torch.set_num_threads(threads)
    return {"threads": 1, "clock": "process CPU time", "smoke": smoke, "rows": rows}


def table(result: dict) -> str:
    lines = [
        "Whole VLM, same weights and inputs, 1 thread, process CPU time (ours = the converted model)",
        f"{'reference':<10} {'mode':<16} {'measure':<12} {'reference':>10} {'ours':>10} {'ours x':>7}  notes",
    ]
    for name, row in result["rows"].items():
        t, g = row["train"], row["generate"]
        lines.append(
            f"{name:<10} {row['mode']:<16} {'train ms':<12} {t['ms']['reference']:>10.0f} {t['ms']['ours']:>10.0f} "
            f"{t['speedup']:>6.2f}x  batch x tokens {t['tokens'][0]} x {t['tokens'][1]}, loss delta "
            f"{t['loss_delta']:.1e}, grad-norm rel. delta {t['grad_norm_rel_delta']:.1e}, trainable "
            f"{t['trainable_ref'] / 1e6:.2f}M / {t['trainable_ours'] / 1e6:.2f}M"
        )
        floor = t["floor_ms"]
        lines.append(
            f"{'':<10} {'':<16} {'train bound':<12} {'':>10} {floor['tower'] + floor['lm']:>10.0f} {t['bound']:>6.2f}x  "
            f"a free connector: tower forward {floor['tower']:.0f} ms + LM forward+backward {floor['lm']:.0f} ms"
        )
        lines.append(
            f"{'':<10} {'':<16} {'':<12} {'':>10} {t['ceiling_ms']:>10.0f} {t['ceiling_bound']:>6.2f}x  "
            f"the connector's {t['connector_gflop']:.1f} GFLOP at the GEMM rate ({row['gemm_gflops']:.1f} GFLOP/s)"
            + ("; ours is already faster (uncounted attention FLOPs)" if t["ceiling_ms"] >= t["ms"]["ours"] else "")
        )
        lines.append(
            f"{'':<10} {'':<16} {'train MiB':<12} {t['peak_mib']['reference']:>10.0f} {t['peak_mib']['ours']:>10.0f} "
            f"{t['memory_ratio']:>6.2f}x  peak torch CPU allocations during the step"
        )
        lines.append(
            f"{'':<10} {'':<16} {'gen tok/s':<12} {g['tokens_per_s']['reference']:>10.1f} "
            f"{g['tokens_per_s']['ours']:>10.1f} {g['speedup']:>6.2f}x  {g['prompts']} prompts x {g['new_tokens']} "
            f"new tokens (prompt {g['prompt_tokens']}), identical tokens: {g['identical']} "
            f"({g['identical_fraction']:.1%}); ours' prefill (one new token) {g['prefill_ms']:.0f} ms of "
            f"{g['ms']['ours']:.0f}"
        )
        lines.append(
            f"{'':<10} {'':<16} {'gen bound':<12} {'':>10} {g['ceiling_ms']:>10.0f} {g['ceiling_bound']:>6.2f}x  "
            f"ours' prefill + the decode steps' {g['decode_gflop']:.1f} GFLOP at the GEMM rate"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (checks that it runs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.smoke, args.repeats)
    return report(result, table(result), args.json)


if __name__ == "__main__":
    main()
