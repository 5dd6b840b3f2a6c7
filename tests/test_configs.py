"""Every YAML under configs/ and perceiver_bench/configs/ loads into its dataclass (without building any model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from perceiver_bench.config import CONFIG_DIR as BENCH_CONFIGS
from resampler.config import from_dict, load_config, to_dict
from vlm import RunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN = sorted(p for p in CONFIGS.rglob("*.yaml"))
BENCH = sorted(BENCH_CONFIGS.glob("*.yaml"))


def test_configs_exist():
    names = {str(p.relative_to(CONFIGS)) for p in RUN}
    assert {"default.yaml", "vitb32_1b_lora.yaml", "vitb32_1b_qlora.yaml"} <= names
    assert {"tiny/train.yaml", "tiny/make_shards.yaml", "local.yaml"} <= names  # tiny/train.yaml serves every command


def test_no_two_configs_are_byte_identical():
    seen = {}
    for path in RUN:
        assert path.read_bytes() not in seen, (path, seen.get(path.read_bytes()))
        seen[path.read_bytes()] = path


@pytest.mark.parametrize("path", RUN, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_run_config_loads_and_round_trips(path):
    cfg = load_config(RunConfig, path)
    data = yaml.safe_load(path.read_text())
    assert isinstance(cfg, RunConfig)
    again = from_dict(RunConfig, to_dict(cfg))  # YAML mirrors the dataclass 1:1: nothing lost
    assert to_dict(again) == to_dict(cfg)
    for section, values in data.items():  # every key written in the file arrived in the dataclass
        if isinstance(values, dict):
            assert set(values) <= set(to_dict(getattr(cfg, section)))


def test_standin_sizes_agree_in_embedded_configs():
    for path in RUN:
        cfg = load_config(RunConfig, path)
        if not cfg.standin.enabled:
            continue
        v = cfg.standin.vision
        assert v.image_size == cfg.data.image_size == cfg.synthetic.image_size, path
        positions = cfg.model.resampler.num_patch_positions
        assert positions in (None, (v.image_size // v.patch_size) ** 2), path


def test_every_benchmark_task_ships_a_config():
    from perceiver_bench import TASKS

    assert {p.stem for p in BENCH} == set(TASKS)


@pytest.mark.parametrize("path", BENCH, ids=lambda p: p.name)
def test_perceiver_bench_config_loads(path):
    from perceiver_bench.config import BenchConfig, TaskConfigs

    configs = from_dict(TaskConfigs, yaml.safe_load(path.read_text()), where=path.name)
    assert isinstance(configs.smoke, BenchConfig) and isinstance(configs.full, BenchConfig)


def test_unknown_field_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ValueError, match="train.max_step"):
        load_config(RunConfig, bad)


def test_override_wrong_type_names_the_field():
    with pytest.raises(TypeError, match="train.max_steps"):
        load_config(RunConfig, CONFIGS / "tiny" / "train.yaml", ["train.max_steps=lots"])
