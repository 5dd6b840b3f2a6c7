"""Cache the frozen vision tower's patch features as fp16 shards (the `pvlm-precompute-features` command).

    .venv/bin/python scripts/precompute_features.py --config configs/tiny/train.yaml output_dir=/tmp/pvlm-tiny

Runtime on 2 CPU cores: seconds for the tiny config; ~20 s for the default world with the stand-in ViT.
Expected result: <split>-NNNNNN.tar feature shards and <split>-features.json per split in
features.output_dir (default <output_dir>/features); training with data.use_cached_features=true reads them.
"""

from vlm.cli import main_precompute_features

if __name__ == "__main__":
    main_precompute_features()
