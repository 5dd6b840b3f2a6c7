"""Write webdataset shards (the `pvlm-make-shards` command): the synthetic world, a folder of images
with a CSV/JSONL of captions, or img2dataset output.

    .venv/bin/python scripts/make_shards.py --config configs/tiny/make_shards.yaml output_dir=/tmp/pvlm-tiny
    .venv/bin/python scripts/make_shards.py --config configs/tiny/make_shards.yaml shards.source=folder \
        shards.input_dir=my_images shards.captions_file=my_images/captions.csv shards.output_dir=data/mine

Runtime on 2 CPU cores: about a second for the tiny world; the default world (6,800 images) ~40 s.
Expected result: <prefix>-NNNNNN.tar shards and a <prefix>-index.json in shards.output_dir
(default <output_dir>/data).
"""

from vlm.cli import main_make_shards

if __name__ == "__main__":
    main_make_shards()
