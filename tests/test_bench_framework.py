"""perceiver-bench plumbing: configs, overrides, records, the results table, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perceiver_bench import TASKS, BenchConfig, TaskConfigs, load_task_config
from perceiver_bench.cli import main
from perceiver_bench.common import TaskResult, update_results_table, write_record
from perceiver_bench.config import CONFIG_DIR
from resampler.config import from_dict, load_config


def test_every_task_has_a_config_with_both_sizes():
    for task in TASKS:
        for size in ("smoke", "full"):
            cfg = load_task_config(task, size)
            assert cfg.task == task and cfg.size == size
    yamls = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert yamls == set(TASKS), f"configs without a task or tasks without a config: {yamls ^ set(TASKS)}"


def test_yaml_mirrors_the_dataclass_1to1():
    for path in CONFIG_DIR.glob("*.yaml"):
        configs = load_config(TaskConfigs, path)
        assert isinstance(configs.smoke, BenchConfig) and isinstance(configs.full, BenchConfig)


def test_overrides_and_bad_fields():
    cfg = load_task_config("digits", "smoke", ["train.steps=7", "model.num_latents=4"])
    assert cfg.train.steps == 7 and cfg.model.num_latents == 4
    with pytest.raises(ValueError, match="unknown config field"):
        load_task_config("digits", "smoke", ["model.num_latentz=4"])
    with pytest.raises(TypeError, match="train.steps"):
        load_task_config("digits", "smoke", ["train.steps=many"])
    with pytest.raises(ValueError, match="size must be"):
        load_task_config("digits", "huge")
    with pytest.raises(ValueError, match="no config for task"):
        load_task_config("nope", "smoke")
    with pytest.raises(ValueError, match="batch_size"):
        from_dict(BenchConfig, {"train": {"batch_size": 0}})


def _result(metric: float) -> TaskResult:
    return TaskResult("top-1", metric, "majority", 0.1, ">= 96%", metric >= 0.96, parameters=1234, train_seconds=1.5)


def test_record_and_table_row_replacement(tmp_path: Path):
    cfg = load_task_config("digits", "smoke")
    path = write_record(_result(0.5), cfg, tmp_path / "runs")
    record = json.loads(path.read_text())
    for key in ("task", "config", "metric", "baseline", "parameters", "train_seconds", "library_version", "seed"):
        assert key in record
    assert record["config"]["train"]["steps"] == cfg.train.steps

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Title\n\nintro\n\n<!-- results-table:begin -->\n<!-- results-table:end -->\n\nafter\n")
    update_results_table(doc, "B1", _result(0.5), cfg)
    update_results_table(doc, "B3", _result(0.7), load_task_config("point_clouds", "smoke"))
    update_results_table(doc, "B1", _result(0.97), cfg)  # replaces the B1 smoke row
    text = doc.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| B")]
    assert len(rows) == 2 and rows[0].startswith("| B1 ") and "0.97" in rows[0] and "| yes |" in rows[0]
    assert text.startswith("# Title\n\nintro") and text.rstrip().endswith("after")


def test_cli_list_and_errors(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in TASKS)
    with pytest.raises(SystemExit):
        main(["run", "no_such_task"])
    with pytest.raises(SystemExit):
        main(["run", "digits", "--bogus"])


def test_cli_run_writes_record_and_table(tmp_path: Path):
    rc = main(
        ["run", "mirror_copy", "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), "train.steps=5"]
    )
    assert rc == 0
    record = json.loads((tmp_path / "runs" / "mirror_copy-smoke.json").read_text())
    assert record["config"]["train"]["steps"] == 5
    assert "| B11 | mirror_copy | smoke |" in (tmp_path / "docs" / "benchmarks.md").read_text()
    assert (tmp_path / "docs" / "figures" / "B11-mirror-copy-smoke.png").is_file()


def test_fit_slope_recovers_a_power_law():
    from perceiver_bench.scaling import fit_slope

    lengths = [1024 * 2**i for i in range(6)]
    assert abs(fit_slope(lengths, [3e-6 * m**1.0 for m in lengths]) - 1.0) < 1e-9
    assert abs(fit_slope(lengths, [1e-9 * m**2.0 for m in lengths]) - 2.0) < 1e-9


def test_generators_are_deterministic_and_well_formed():
    import torch

    from perceiver_bench.entities import make_sets
    from perceiver_bench.mirror_copy import make_sequences
    from perceiver_bench.point_clouds import sample_shape

    gen = torch.Generator().manual_seed(0)
    sphere = sample_shape("sphere", 100, gen)
    assert torch.allclose(sphere.norm(dim=-1), torch.ones(100), atol=1e-5)
    cube = sample_shape("cube", 100, gen)
    assert torch.allclose(cube.abs().amax(dim=-1), torch.ones(100))  # every point on a face
    cfg = load_task_config("mirror_copy", "smoke")
    seq = make_sequences(cfg, 4, seed=3)
    n = cfg.data.length
    assert torch.equal(seq[:, 1 : n + 1].flip(1), seq[:, n + 2 :]) and torch.equal(seq, make_sequences(cfg, 4, seed=3))
    ent = make_sets(load_task_config("entities", "full"), 16, seed=1)
    assert ((ent["labels"] == -1) == ~ent["mask"]).all()  # labels exactly on real entities
