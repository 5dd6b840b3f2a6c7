"""Evaluate a trained adapter (the `pvlm-eval` command).

    .venv/bin/python scripts/eval.py --config configs/tiny/train.yaml output_dir=/tmp/pvlm-tiny

Runtime on 2 CPU cores: seconds for the tiny config (after scripts/train.py with the same output_dir).
Expected result: CIDEr, BLEU-4, ROUGE-L (METEOR with Java), per-attribute accuracy on synthetic data,
the same with the image input removed, sample captions; eval/<split>.json, eval/metrics.json and
eval/<split>_samples.png under output_dir.
"""

from vlm.cli import main_eval

if __name__ == "__main__":
    main_eval()
