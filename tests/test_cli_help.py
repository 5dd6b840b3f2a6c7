"""``--help`` of every command lists the config fields it reads, generated from the dataclasses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlm.cli import COMMANDS, fields_help, main, main_caption, main_demo, main_eval, main_train

MAINS = {"train": main_train, "eval": main_eval, "caption": main_caption, "demo": main_demo}


def _help(capsys, entry, argv=("--help",)) -> str:
    with pytest.raises(SystemExit) as exit_:
        entry(list(argv))
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_its_sections_and_fields(capsys):
    out = _help(capsys, main_train)
    assert "usage: pvlm-train" in out
    for field in ("train.lr", "train.lora_lr", "data.train_shards", "model.resampler.num_latents", "output_dir"):
        assert f"    {field}: " in out, field
    assert "train.lr: float = 0.001  -- the connector" in out  # type, default and the field's comment
    assert "train.precision: {fp32,bf16,fp16} = 'fp32'" in out  # Literal choices
    assert "  train: Optimisation and bookkeeping" in out  # the section's docstring
    assert "    eval.splits: " not in out  # training reads no eval section


def test_each_command_lists_what_it_reads_and_nothing_else(capsys):
    out = _help(capsys, main_caption)
    assert "--images" in out and "--adapter" in out
    assert "eval.max_new_tokens: int = 48" in out and "standin.dir" in out
    assert "    train.lr: " not in out and "    data.train_shards: " not in out
    out = _help(capsys, main_eval)
    assert "    eval.ablation: " in out and "--adapter" in out and "    train.lr: " not in out
    out = _help(capsys, main_demo)
    assert (
        "shipped embedded default" in " ".join(out.split()) and "    train.lr: " in out and "    eval.splits: " in out
    )


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_a_help_that_resolves(name, capsys):
    out = _help(capsys, main, [name, "-h"])
    assert f"usage: pvlm-{name}" in out and "config fields this command reads" in out
    assert fields_help(COMMANDS[name].reads) in out


def test_a_field_a_command_reads_must_exist():
    with pytest.raises(KeyError, match="max_stepz"):
        fields_help(("train.max_stepz",))


def test_module_entry_point_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "vlm.cli"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and all(name in proc.stderr for name in COMMANDS)


def test_demo_reads_the_packaged_default_unless_given_a_config(tmp_path):
    import yaml

    from vlm.cli import parse
    from vlm.pipeline.config import default_config_file

    with default_config_file() as path:
        shipped = yaml.safe_load(path.read_text())
    cfg, _ = parse("demo", [f"output_dir={tmp_path}"])
    assert cfg.train.max_steps == shipped["train"]["max_steps"] and cfg.standin.enabled
    other = tmp_path / "other.yaml"
    other.write_text("train: {max_steps: 3}\n")
    cfg, _ = parse("demo", ["--config", str(other)])
    assert cfg.train.max_steps == 3 and not cfg.standin.enabled
