"""Config files from anywhere (issue 20): YAML aliases (billion laughs), duplicate keys, empty files,
non-UTF-8 bytes and bad values inside dict fields are refused with a message naming the file or
field, before any work starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resampler.config import load_config, load_yaml
from vlm.pipeline import RunConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"

# The probe's 541 bytes: nine levels of nine aliases each expand to 9**9 = 387 million strings.
LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{b}: &{b} [{','.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
)


def test_the_billion_laughs_config_is_refused_at_once_by_the_command(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(f"output_dir: {tmp_path / 'run'}\nshards:\n  source: synthetic\n{LAUGHS}\n")
    assert len(path.read_bytes()) < 1000
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    start = time.monotonic()
    try:  # today's code grew past 2 GB here and never returned: bound both time and memory
        proc = subprocess.run(
            ["bash", "-c", f'ulimit -v 6000000; exec "{sys.executable}" -m vlm.cli make-shards --config "{path}"'],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("pvlm-make-shards did not return within 120 s on a 541-byte YAML")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "YAML aliases (*a) are not allowed in configs" in proc.stderr and time.monotonic() - start < 120
    assert not (tmp_path / "run").exists()


def test_aliases_are_refused_even_where_they_would_be_valid(tmp_path):
    path = tmp_path / "aliased.yaml"
    path.write_text("eval:\n  splits: &s [test]\nfeatures:\n  splits: *s\n")
    with pytest.raises(ValueError, match=r"aliased.yaml: line 4: YAML aliases \(\*s\) are not allowed"):
        load_config(RunConfig, path)


def test_an_alias_in_an_override_is_refused():
    with pytest.raises(ValueError, match="YAML aliases"):
        load_config(RunConfig, None, ["eval.splits=*x"])


def test_a_duplicate_section_is_refused_not_silently_replaced(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 0.1\n  max_steps: 5\nseed: 1\ntrain:\n  lr: 0.0\n")
    with pytest.raises(ValueError, match=r"twice.yaml: line 5: duplicate key 'train'"):
        load_config(RunConfig, path)
    path.write_text("train: {lr: 0.1, lr: 0.2}\n")  # inside a section too
    with pytest.raises(ValueError, match="duplicate key 'lr'"):
        load_config(RunConfig, path)


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_config_file_is_refused_instead_of_meaning_all_defaults(tmp_path, content):
    path = tmp_path / "empty.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match="empty.yaml: the config file is empty"):
        load_config(RunConfig, path)


def test_an_empty_config_file_exits_2_before_any_download(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "vlm.cli", "eval", "--config", str(path), f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 2 and "the config file is empty" in proc.stderr, proc.stderr[-2000:]
    assert "ViT-B-32" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_config_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("eval:\n  splits: [t\u00e9st]\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.yaml: not UTF-8"):
        load_config(RunConfig, path)


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("synthetic.split_sizes={train: abc}", r"synthetic.split_sizes\['train'\]: expected an int, got 'abc'"),
        ("synthetic.split_sizes={1: 5}", r"synthetic.split_sizes: expected a string, got 1"),
        ("synthetic.split_sizes={train: 1.5}", r"expected an int, got 1.5"),
        ("synthetic.noise=.inf", r"synthetic.noise: must be a finite number"),
        ("model.resampler.ff_mult=.nan", r"model.resampler.ff_mult: must be a finite number"),
    ],
)
def test_values_inside_dict_fields_and_every_number_are_checked_when_the_config_is_read(override, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        load_config(RunConfig, TINY / "make_shards.yaml", [override])


def test_every_shipped_config_still_reads_with_the_strict_loader():
    configs = sorted((ROOT / "configs").rglob("*.yaml")) + [ROOT / "vlm" / "configs" / "default.yaml"]
    assert len(configs) > 5
    for path in configs:
        assert isinstance(load_yaml(path.read_text(), str(path)), dict), path
