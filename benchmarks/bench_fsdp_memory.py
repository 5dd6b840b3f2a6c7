"""Memory per rank, ``train.distributed=ddp`` vs ``fsdp``: the VLM over a ~100M-parameter Llama, N processes.

    .venv/bin/python benchmarks/bench_fsdp_memory.py               # 2 CPU processes (gloo), ~2 min on 2 cores
    .venv/bin/python benchmarks/bench_fsdp_memory.py --smoke       # a tiny LM, checks it runs (~40 s)
    .venv/bin/python benchmarks/bench_fsdp_memory.py --json docs/fsdp_memory.json
    .venv/bin/python benchmarks/bench_fsdp_memory.py --nproc 8     # on a machine with 8 GPUs (nccl)

Each mode runs in its own ``torchrun --standalone --nproc_per_node N`` launch of this script. Every rank
builds the same VLM (tiny open_clip tower, a Llama of 12 layers x 768 with an 8k vocabulary, LoRA r=8,
resampler and MLP projector), under fsdp shards it (`vlm.training.fsdp.shard_model`, which frees each
rank's full copy) and then trains ``--steps`` steps with `vlm.training.train` (AdamW, fp32, batch 4 per
rank). Measured per rank:

    parameters   the rank's parameters (its shards under fsdp), counted exactly from the tensors; the
                 AdamW state (two tensors per trainable parameter) likewise
    peak         the most tensor memory alive at once during the measured ``train`` call (after a
                 one-step warm-up run that loads every lazy import). GPU: ``torch.cuda.max_memory_allocated``;
                 CPU: the parameters + how far malloc's bytes in use rose (``MallocPeak``: glibc
                 ``mallinfo2`` sampled every 0.5 ms; torch's profiler misses the storage frees FSDP2
                 makes when it reshards, so its replayed peak grows with every unit gathered)
    RSS growth   CPU only, for the record: how far the resident set grew during that call (VmHWM reset
                 just before). glibc keeps freed all-gather buffers resident, so under fsdp this counts
                 every unit's gathered copy, not the few alive at once; it is not the GPU picture

Expected on N GPUs: ddp holds the whole model on every rank whatever N is; fsdp holds 1/N of it plus
what a step gathers and computes (one or two units all-gathered at a time, the activations), which does
not shrink with N. From this run's numbers: fsdp(N) ~= params_ddp / N + (peak_fsdp - params_fsdp),
printed for N = 2, 4, 8 as a ratio to ddp's peak. The frozen LM dominates a LoRA run, so the ratio
approaches the transient share as N grows. Results of the last run: docs/fsdp_memory.md (--docs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LM_SIZES = {
    "full": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 2048},
    "smoke": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
}
VOCAB = {"full": 8192, "smoke": 512}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current resident set."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MallocPeak:
    """Peak bytes malloc has handed out and not taken back (glibc ``mallinfo2``: in-use heap + mmapped
    blocks), sampled every ``interval`` seconds from a thread while the block runs. Unlike the resident
    set it drops when a buffer is freed, even if glibc keeps the pages; torch ops release the GIL, so the
    sampler runs during them."""

    def __init__(self, interval: float = 0.0005) -> None:
        import ctypes

        fields = (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )

        class Info(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in fields]

        self._mallinfo = ctypes.CDLL("libc.so.6").mallinfo2
        self._mallinfo.restype = Info
        self.interval, self.start, self.peak = interval, 0, 0

    def in_use(self) -> int:
        info = self._mallinfo()
        return int(info.uordblks + info.hblkhd)

    def __enter__(self) -> MallocPeak:
        import threading

        self.start = self.peak = self.in_use()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, self.in_use())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.in_use())


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def build(size: str):
    """(model, loader) with the same seeds on every rank."""
    from vlm.config import LoRAConfig
    from vlm.model import VisionLanguageModel
    from vlm.testing import tiny_clip, tiny_images, tiny_lm, tiny_tokenizer, tiny_vlm_config
    from vlm.training import EpochLoader

    tokenizer = tiny_tokenizer()
    clip, preprocess = tiny_clip()
    lm = tiny_lm("llama", tokenizer, vocab_size=VOCAB[size], num_key_value_heads=None, **LM_SIZES[size])
    config = tiny_vlm_config("llama", lora=LoRAConfig(r=8, alpha=16, dropout=0.0))
    torch.manual_seed(1)
    model = VisionLanguageModel.from_parts(clip, lm, tokenizer, config, preprocess=preprocess)
    images = tiny_images(64)
    data = [{"image": images[i], "caption": "a small red circle on the left"} for i in range(len(images))]

    def collate(items):
        text = model.processor(["Caption:"] * len(items), captions=[it["caption"] for it in items], num_images=1)
        return {"images": torch.stack([it["image"] for it in items]), **text}

    return model, EpochLoader(data, 4, collate, seed=0)


def worker(mode: str, size: str, steps: int, out: Path) -> None:
    import gc

    from vlm.distributed import gather_objects, init_distributed, rank, world_size
    from vlm.training import TrainConfig, train
    from vlm.training.fsdp import shard_model

    init_distributed()
    cuda = torch.cuda.is_available()
    model, loader = build(size)
    params = sum(p.numel() for p in model.language_model.parameters())
    config = TrainConfig(max_steps=steps + 1, distributed=mode, progress=False, tensorboard=False, plot=False)
    if cuda and mode == "ddp":
        model.cuda()
    if mode == "fsdp":
        model = shard_model(model, config)  # frees this rank's full copy before anything is measured
    with tempfile.TemporaryDirectory() as tmp:
        train(model, loader, config, tmp, stop_after=1)  # warm-up: lazy imports, first-use allocations
        config.resume = False  # the measured run builds its optimizer state afresh
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        reset, rss = _reset_peak_rss(), _status_kib("VmRSS") * 1024
        with MallocPeak() as malloc:
            train(model, loader, config, Path(tmp) / "measured", stop_after=steps)
        growth = _status_kib("VmHWM") * 1024 - rss
    param_bytes = _local_bytes(model.parameters())
    row = {
        "rank": rank(),
        "lm_params": params,
        "param_bytes": param_bytes,  # this rank's parameters (its shards under fsdp)
        "optim_bytes": 2 * _local_bytes(p for p in model.parameters() if p.requires_grad),  # exp_avg, exp_avg_sq
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else param_bytes + malloc.peak - malloc.start,
        "peak_kind": "cuda max_memory_allocated" if cuda else "parameters + peak of malloc's bytes in use",
        "rss_growth_bytes": growth if reset else None,
    }
    rows = gather_objects(row)
    if rank() == 0:
        out.write_text(json.dumps({"mode": mode, "world": world_size(), "rows": rows}))


def launch(mode: str, size: str, steps: int, nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{mode}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd += [__file__, "--worker", mode, "--size", size, "--steps", str(steps), "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} launch failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def summarize(results: dict[str, dict]) -> dict:
    mib = 2**20
    per_mode = {}
    for mode, result in results.items():
        rows = result["rows"]
        per_mode[mode] = {
            "param_mib": max(r["param_bytes"] for r in rows) / mib,
            "optim_mib": max(r["optim_bytes"] for r in rows) / mib,
            "rss_growth_mib": max((r["rss_growth_bytes"] or 0) for r in rows) / mib,
            "peak_mib": max(r["peak_bytes"] for r in rows) / mib,
            "peak_kind": rows[0]["peak_kind"],
            "world": result["world"],
        }
    ddp, fsdp = per_mode["ddp"], per_mode["fsdp"]
    transient = fsdp["peak_mib"] - fsdp["param_mib"]
    expected = {n: (ddp["param_mib"] / n + transient) / ddp["peak_mib"] for n in (2, 4, 8)}
    lm_params = results["ddp"]["rows"][0]["lm_params"]
    return {"lm_params": lm_params, "modes": per_mode, "measured_ratio": fsdp["peak_mib"] / ddp["peak_mib"],
            "expected_ratio": expected}  # fmt: skip


def table(summary: dict) -> str:
    lines = [
        f"VLM over a {summary['lm_params'] / 1e6:.0f}M-parameter Llama (LoRA r=8), fp32, batch 4 per rank, "
        f"{summary['modes']['ddp']['world']} processes; peak = {summary['modes']['ddp']['peak_kind']}",
        "",
        "| mode | parameters MiB per rank | AdamW state MiB per rank | peak MiB per rank | RSS growth MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, row in summary["modes"].items():
        cells = f"{row['param_mib']:.1f} | {row['optim_mib']:.1f} | {row['peak_mib']:.0f} | {row['rss_growth_mib']:.0f}"
        lines.append(f"| {mode} | {cells} |")
    lines += ["", f"fsdp / ddp peak, measured: {summary['measured_ratio']:.2f}"]
    expected = ", ".join(f"N={n}: {r:.2f}" for n, r in summary["expected_ratio"].items())
    lines.append(f"expected fsdp / ddp peak on N GPUs (ddp parameters / N + this run's fsdp transient): {expected}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny LM: checks the script runs")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--docs", type=Path, default=None, help="write <dir>/fsdp_memory.md")
    parser.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--size", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.size, args.steps, args.out)
        return None
    size = "smoke" if args.smoke else "full"
    summary = summarize({mode: launch(mode, size, args.steps, args.nproc) for mode in ("ddp", "fsdp")})
    text = table(summary)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    if args.docs:
        head = "# FSDP vs DDP memory per rank\n\nGenerated by `python benchmarks/bench_fsdp_memory.py --docs docs`.\n\n"
        (args.docs / "fsdp_memory.md").write_text(head + text + "\n")
    return summary


if __name__ == "__main__":
    main()
