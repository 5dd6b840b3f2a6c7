"""Train resampler + projection + LoRA on caption shards (the `pvlm-train` command).

    .venv/bin/python scripts/train.py --config configs/tiny/train.yaml output_dir=/tmp/pvlm-tiny
    torchrun --standalone --nproc_per_node 2 scripts/train.py --config configs/tiny/train.yaml output_dir=/tmp/pvlm-2p

Runtime on 2 CPU cores: the tiny config takes about 30 s (world, stand-ins, 30 steps). Expected result:
<output_dir>/adapter (adapter-only checkpoint), checkpoints/step_*/ every train.checkpoint_every steps
(re-running the same command resumes from the latest one), metrics.csv, tensorboard/, loss_curve.png.
"""

from vlm.cli import main_train

if __name__ == "__main__":
    main_train()
