"""The embedded default (README command one): a real small captioner from a fresh clone, offline.

    bash scripts/install.sh && .venv/bin/pvlm-demo          # or: .venv/bin/python scripts/demo.py
    .venv/bin/pvlm-demo output_dir=runs/mine train.max_steps=1200   # any RunConfig field can be overridden

Runtime on 2 CPU cores: about 11-12 minutes the first time (682 s measured on an idle AVX2 machine) (world ~40 s, stand-in ViT ~2-4 min, stand-in
LM ~30 s, feature cache ~20 s, adapter training, evaluation ~1 min); a second run reuses the world,
the backbones and the feature cache. Expected result: CIDEr, BLEU-4 and per-attribute accuracy on
400 held-out test images and 200 compositional images, each also with the image input removed (the
ablation), plus sample captions; outputs in runs/default/ (adapter/, eval/metrics.json,
eval/*_samples.png, metrics.csv, loss_curve.png). See the README for the numbers measured.
"""

from vlm.cli import main_demo

if __name__ == "__main__":
    main_demo()
