"""Re-running ``pvlm-train`` on a run directory: finished, continued, refused when the config changed;
the loss it reports; validation during training; the launch line."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from test_cli import TINY, shared_assets

from vlm.cli import main_train, run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = root / "run"
    args = ["--config", str(TINY / "train.yaml"), *shared_assets(root), "train.max_steps=6", "train.log_every=3"]
    main_train([*args, f"output_dir={out}"])
    return root, out, args


def _losses(run: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader((run / "metrics.csv").read_text().splitlines())]


def test_rerunning_a_finished_run_says_so_and_rewrites_nothing(finished_run, capsys):
    _, out, args = finished_run
    adapter = out / "adapter" / "adapter.safetensors"
    before = adapter.stat().st_mtime_ns, adapter.read_bytes()
    capsys.readouterr()
    main_train([*args, f"output_dir={out}"])
    printed = capsys.readouterr().out
    assert "is finished (step 6 of 6" in printed and "last loss nan" not in printed
    assert (adapter.stat().st_mtime_ns, adapter.read_bytes()) == before


def test_a_changed_learning_rate_is_refused_with_the_field_named(finished_run):
    _, out, args = finished_run
    with pytest.raises(ValueError, match=r"differs in train\.lr \(train\.lr: 0\.003 -> 0\.01") as err:
        run("train", [*args, f"output_dir={out}", "train.lr=0.01"])
    assert "train.allow_config_change=true" in str(err.value) and "finished" in str(err.value)
    with pytest.raises(ValueError, match=r"model\.resampler\.depth"):
        run("train", [*args, f"output_dir={out}", "model.resampler.depth=2"])


def test_more_steps_continue_the_run_and_the_last_loss_is_the_last_steps(finished_run, capsys, tmp_path):
    root, out, args = finished_run
    run = tmp_path / "longer"
    shutil.copytree(out, run)
    capsys.readouterr()
    main_train([*args, f"output_dir={run}", "train.max_steps=8", "train.log_every=1"])
    printed = capsys.readouterr().out
    assert "resuming from step 6 of 8 (checkpoint " in printed
    losses = _losses(run)
    assert len(losses) == 8 and losses[:6] == _losses(out)
    assert f"last step's loss {losses[-1]:.4f}" in printed
    assert [x.split()[1] for x in printed.splitlines() if x.startswith("step ")] == ["7/8", "8/8"]


def test_allow_config_change_continues_and_names_the_change(finished_run, capsys, tmp_path):
    _, out, args = finished_run
    run = tmp_path / "changed"
    shutil.copytree(out, run)
    capsys.readouterr()
    main_train([*args, f"output_dir={run}", "train.max_steps=7", "train.lr=0.01", "train.allow_config_change=true"])
    printed = capsys.readouterr().out
    assert "with a changed config: train.lr: 0.003 -> 0.01" in printed
    assert len(_losses(run)) == 7


def test_a_shorter_budget_than_the_run_is_refused(finished_run):
    _, out, args = finished_run
    with pytest.raises(ValueError, match=r"past train\.max_steps=4"):
        run("train", [*args, f"output_dir={out}", "train.max_steps=4"])


def test_validation_loss_and_cider_during_training(finished_run, capsys):
    root, _, args = finished_run
    out = root / "validated"
    capsys.readouterr()
    main_train([*args, f"output_dir={out}", "train.eval_every=3", "train.eval_cider_samples=4", "train.eval_batches=1"])
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / "eval_metrics.csv").read_text().splitlines()))
    assert [r["step"] for r in rows] == ["3", "6"]
    assert all(0 < float(r["loss"]) < 20 and float(r["CIDEr"]) >= 0 for r in rows)
    assert "val loss" in printed and "val CIDEr" in printed
    assert _losses(out) == _losses(root / "run")  # validating changes nothing in the training run
    assert "launch: single process, 1 process (no process group); batch 8 per rank x 1 accumulation step x 1 = 8" in (
        printed
    )


def test_eval_every_without_a_validation_split_is_a_clear_error(finished_run, tmp_path):
    _, _, args = finished_run
    root = finished_run[0]
    with pytest.raises(ValueError, match="data.val_shards"):
        run("train", [*args, f"output_dir={tmp_path / 'r'}", "train.eval_every=2", "make_synthetic=false",
                    f"data.train_shards={root / 'data' / 'train-*.tar'}", f"shards.output_dir={tmp_path / 'none'}",
                    "data.use_cached_features=false"])  # fmt: skip
