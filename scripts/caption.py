"""Caption image files with a trained adapter (the `pvlm-caption` command).

    .venv/bin/python scripts/caption.py --config configs/tiny/train.yaml output_dir=/tmp/pvlm-tiny --images a.png b.png

Runtime on 2 CPU cores: a few seconds. Expected result: one line per image, ``path: caption``.
"""

from vlm.cli import main_caption

if __name__ == "__main__":
    main_caption()
