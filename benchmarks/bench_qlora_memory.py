"""QLoRA memory: LM weight memory fp32 vs 8-bit vs 4-bit (bitsandbytes), and the peak of one LoRA training step.

    .venv/bin/python benchmarks/bench_qlora_memory.py           # llama-shaped ~63M-parameter LM, ~2 min
    .venv/bin/python benchmarks/bench_qlora_memory.py --smoke   # tiny LM, seconds
    .venv/bin/python benchmarks/bench_qlora_memory.py --json docs/bench_qlora_memory.json

A random llama-shaped LM is built from a config (hidden 768, 8 layers, MLP 2048, vocab 8192, tied
embeddings: small, but with its decoder linears holding 90% of the weights, like real LMs), saved to a
temporary directory and loaded back through the project's own path (`vlm.language.load_language_model`
with ``lm.quantization`` = none / 8bit / 4bit, nf4 + double quantization), then wrapped with LoRA r=8
(`vlm.language.apply_lora`). Reported per precision:
- weight memory: all parameters and buffers (``get_memory_footprint``) and the decoder linears alone
  (packed int8 / 4-bit storage plus their quantization constants);
- peak memory of one training step (forward, backward, AdamW step on the LoRA weights; batch 4 x 128
  tokens), as torch CPU allocations seen by the profiler during the step (on top of the resident
  weights; "weights+step" adds the two), and its time.

Expected: 4-bit weights ~0.2x fp32 in total (~0.15x for the linears), 8-bit ~0.3x; the training-step
peak shrinks less (activations and the fp32 embeddings do not change).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import peak_memory_mb, report  # noqa: E402

from vlm.config import LMConfig, LoRAConfig  # noqa: E402
from vlm.language import apply_lora, load_language_model  # noqa: E402

LM_SIZE = {
    "hidden_size": 768,
    "num_hidden_layers": 8,
    "intermediate_size": 2048,
    "num_attention_heads": 12,
    "vocab_size": 8192,
    "batch": 4,
    "tokens": 128,
}
SMOKE = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "vocab_size": 512,
    "batch": 2,
    "tokens": 16,
}


def save_random_lm(size: dict, directory: Path) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=size["hidden_size"],
        num_hidden_layers=size["num_hidden_layers"],
        intermediate_size=size["intermediate_size"],
        num_attention_heads=size["num_attention_heads"],
        vocab_size=size["vocab_size"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the decoder's linear layers: packed weights, biases and quantization constants."""
    import bitsandbytes as bnb

    total = 0
    for name, module in model.named_modules():
        if "lm_head" in name or "lora_" in name:
            continue
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, torch.nn.Linear)):
            for tensor in (module.weight, module.bias):
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
            state = getattr(module.weight, "quant_state", None)
            for attr in ("absmax", "code"):
                value = getattr(state, attr, None)
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
            nested = getattr(state, "state2", None)
            if nested is not None and isinstance(getattr(nested, "absmax", None), torch.Tensor):
                total += nested.absmax.numel() * nested.absmax.element_size()
            scb = getattr(module.weight, "SCB", None)
            if isinstance(scb, torch.Tensor):
                total += scb.numel() * scb.element_size()
    return total


def measure(directory: Path, quantization: str, size: dict) -> dict:
    lm_config = LMConfig(name_or_path=str(directory), quantization=quantization)
    lm = load_language_model(lm_config)
    weights = {"total_mb": lm.get_memory_footprint() / 2**20, "linear_mb": linear_bytes(lm) / 2**20}
    lm = apply_lora(lm, LoRAConfig(r=8, alpha=16, dropout=0.0), lm_config)
    lm.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, size["vocab_size"], (size["batch"], size["tokens"]), generator=gen)

    def step() -> None:
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer state exists from here on, as in a running training loop
    start = time.perf_counter()
    step()
    step_ms = (time.perf_counter() - start) * 1e3
    peak = peak_memory_mb(step)
    return {
        **weights,
        "trainable_params": sum(p.numel() for p in params),
        "train_step_peak_mb": peak,
        "train_step_ms": step_ms,
    }


def run(size: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "lm"
        n_params = save_random_lm(size, directory)
        rows = {q: measure(directory, q, size) for q in ("none", "8bit", "4bit")}
    base = rows["none"]
    for row in rows.values():
        row["total_ratio"] = row["total_mb"] / base["total_mb"]
        row["linear_ratio"] = row["linear_mb"] / base["linear_mb"]
        row["train_peak_ratio"] = row["train_step_peak_mb"] / base["train_step_peak_mb"]
    return {"size": size, "parameters": n_params, "rows": rows}


def format_table(result: dict) -> str:
    lines = [
        f"QLoRA memory, llama-shaped LM with {result['parameters'] / 1e6:.1f}M parameters, LoRA r=8, "
        f"batch {result['size']['batch']} x {result['size']['tokens']} tokens",
        f"{'weights':8s} {'total MiB':>10s} {'x fp32':>7s} {'linears MiB':>12s} {'x fp32':>7s} "
        f"{'step peak MiB':>14s} {'x fp32':>7s} {'weights+step':>13s} {'x fp32':>7s} {'step ms':>8s}",
    ]
    base = result["rows"]["none"]
    for name, r in result["rows"].items():
        label = "fp32" if name == "none" else name
        both = r["total_mb"] + r["train_step_peak_mb"]  # the step's peak comes on top of the resident weights
        both_ratio = both / (base["total_mb"] + base["train_step_peak_mb"])
        lines.append(
            f"{label:8s} {r['total_mb']:10.1f} {r['total_ratio']:7.2f} {r['linear_mb']:12.1f} {r['linear_ratio']:7.2f} "
            f"{r['train_step_peak_mb']:14.1f} {r['train_peak_ratio']:7.2f} {both:13.1f} {both_ratio:7.2f} "
            f"{r['train_step_ms']:8.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    result = run(SMOKE if args.smoke else LM_SIZE)
    return report(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
