"""The commands under faults (issue 20): one run per output_dir, I/O errors that name the path and the
cause, no temporaries left behind, one-line errors with exit codes, skip counts on the console."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import make, quiet

from vlm.cli import describe_error, main_eval, main_make_shards, main_train
from vlm.lock import DirectoryLocked, run_lock
from vlm.training import latest_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
SMALL_WORLD = "synthetic.split_sizes={train: 16, val: 8, test: 8, compositional: 8}"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


HOLDER = textwrap.dedent(
    """
    import sys, time
    from vlm.lock import run_lock
    with run_lock(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        time.sleep(600)
    """
)


def _hold(directory: Path, command: str) -> subprocess.Popen:
    """Another process holding ``directory``'s lock as ``command`` (prints "held" once it does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), command], env=_env(),
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


# ----------------------------------------------------------------------------------------------
# One run per output_dir


def test_a_second_command_on_a_locked_output_dir_exits_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold(out, "train")
    try:
        start = time.monotonic()
        with pytest.raises(SystemExit) as stop:
            main_train(["--config", str(TINY / "train.yaml"), f"output_dir={out}", "train.lr=0"])
        assert stop.value.code == 1 and time.monotonic() - start < 30
        err = capsys.readouterr().err
        assert f"pvlm-train: error: {out} is in use by pid {holder.pid} (train)" in err
        assert sorted(p.name for p in out.iterdir()) == [".pvlm.lock"]  # nothing prepared, nothing rewritten
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = _hold(tmp_path, "demo")
    with pytest.raises(DirectoryLocked, match=f"pid {holder.pid} \\(demo\\)"), run_lock(tmp_path, "train"):
        pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with run_lock(tmp_path, "train"), pytest.raises(DirectoryLocked, match=f"pid {os.getpid()} \\(train\\)"):  # noqa: SIM117
        with run_lock(tmp_path, "eval"):  # the kernel dropped the dead holder's lock; this process holds it now
            pass


def test_eval_of_a_directory_being_trained_says_which_adapter_step_it_scores(tmp_path, capsys):
    from vlm.cli import _command_lock, parse
    from vlm.testing import tiny_vlm

    out = tmp_path / "run"
    from vlm.checkpoint import save_adapter

    save_adapter(tiny_vlm("llama"), out / "adapter", step=20)
    cfg, options = parse("eval", [f"output_dir={out}"])
    holder = _hold(out, "train")
    try:
        with _command_lock("eval", cfg, options):
            pass
        printed = capsys.readouterr().out
        assert f"{out} is being trained by pid {holder.pid}; scoring the adapter saved at step 20" in printed
    finally:
        holder.kill()
        holder.wait()
    other = _hold(out, "eval")  # a second evaluation of the same directory is refused like any command
    try:
        with pytest.raises(DirectoryLocked, match=f"pid {other.pid} \\(eval\\)"), _command_lock("eval", cfg, options):
            pass
    finally:
        other.kill()
        other.wait()


# ----------------------------------------------------------------------------------------------
# I/O errors name the path and the cause; no temporaries survive


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_failing_disk_during_a_checkpoint_names_the_file_and_the_cause(tmp_path, monkeypatch, code):
    model, loader = make()
    config = quiet(max_steps=4, checkpoint_every=2)
    train(model, loader, config, tmp_path, stop_after=2)
    before = (latest_checkpoint(tmp_path) / "trainable.safetensors").read_bytes()
    real_fsync = os.fsync

    def failing_fsync(fd):  # delayed allocation: a full disk is reported when the data is flushed
        if ".tmp_step_0000004" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    model, loader = make()
    with pytest.raises(OSError) as err:
        train(model, loader, config, tmp_path)
    assert err.value.errno == code and ".tmp_step_0000004" in err.value.filename
    line = describe_error(err.value)
    assert line.endswith(f"{os.strerror(code)} ({errno.errorcode[code]})") and line.startswith(str(tmp_path))
    assert Path(err.value.filename).name in ("optimizer.pt", "rng.pt", "state.json", "trainable.safetensors")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_0000002"]  # no temporary left, the previous checkpoint intact
    assert (tmp_path / "checkpoints" / "step_0000002" / "trainable.safetensors").read_bytes() == before
    monkeypatch.undo()
    model, loader = make()
    assert train(model, loader, config, tmp_path).resumed_from == 2  # and it resumes once the disk is fine


FSIZE_WORKER = textwrap.dedent(
    """
    import resource, signal, sys
    from test_train import make, quiet
    from vlm.cli import describe_error
    from vlm.training import train
    out = sys.argv[1]
    model, loader = make()
    train(model, loader, quiet(max_steps=4, checkpoint_every=2), out, stop_after=2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit now fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    model, loader = make()
    try:
        train(model, loader, quiet(max_steps=4, checkpoint_every=2), out)
    except Exception as err:
        print(type(err).__name__, describe_error(err))
    """
)


def test_a_real_write_failure_from_the_kernel_names_the_file(tmp_path):
    """No patching: ``RLIMIT_FSIZE`` makes the kernel refuse the write itself (EFBIG), as a full disk
    does. The probe saw ``RuntimeError: basic_ios::clear: iostream error`` from torch.save here."""
    proc = subprocess.run([sys.executable, "-c", FSIZE_WORKER, str(tmp_path)], env=_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("OSError ") and line.endswith("File too large (EFBIG)"), line
    assert ".tmp_step_0000004" in line and ("optimizer.pt" in line or "trainable.safetensors" in line), line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000002"]


def test_atomic_writes_name_the_path_on_an_os_error(tmp_path, monkeypatch):
    from vlm.io import atomic_write

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        atomic_write(tmp_path / "metrics.json", "{}")
    assert err.value.filename == str(tmp_path / "metrics.json") and err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Errors on the console: one line, exit 2 for usage, 1 for failures, --debug for the traceback


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["train.device=cuda:7"], "train.device='cuda:7' is not usable on this machine"),
        (["train.device=tpu"], "train.device='tpu' is not a device"),
        (["train.lr=.nan"], "train.lr: must be a finite number"),
        (["synthetic.split_sizes={train: abc}"], r"synthetic.split_sizes\['train'\]: expected an int, got 'abc'"),
        (["--config", "/nonexistent.yaml"], r"/nonexistent.yaml: No such file or directory \(ENOENT\)"),
    ],
)
def test_usage_errors_print_one_line_and_exit_2_before_any_work(tmp_path, capsys, args, pattern):
    import re

    out = tmp_path / "run"
    argv = ["--config", str(TINY / "train.yaml"), f"output_dir={out}", *args]
    with pytest.raises(SystemExit) as stop:
        main_train(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("pvlm-train: error: ") and re.search(pattern, err), err
    assert not out.exists()  # nothing was written, not even the world


def test_debug_prints_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["--config", str(TINY / "train.yaml"), f"output_dir={tmp_path}", "train.device=tpu"]
    with pytest.raises(SystemExit):
        main_train([*argv, "--debug"])
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("PVLM_DEBUG", "1")
    with pytest.raises(SystemExit):
        main_train(argv)
    assert "Traceback" in capsys.readouterr().err


def test_make_shards_validates_dict_values_before_writing_the_world(tmp_path, capsys):
    argv = ["--config", str(TINY / "make_shards.yaml"), f"output_dir={tmp_path}", "synthetic.split_sizes={train: abc}"]
    with pytest.raises(SystemExit) as stop:
        main_make_shards(argv)
    assert stop.value.code == 2 and not (tmp_path / "data").exists()
    assert "synthetic.split_sizes['train']: expected an int" in capsys.readouterr().err


def test_a_failure_while_running_exits_1_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # an eval of a directory that holds no adapter
        main_eval([f"output_dir={tmp_path}", "eval.splits=[test]", "data.test_shards=" + str(tmp_path / "none-*.tar")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1 and err[0].startswith("pvlm-eval: error: "), err


def test_an_unknown_command_is_a_usage_error(capsys):
    from vlm.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["trian"])
    assert stop.value.code == 2 and "usage: python -m vlm.cli" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Skip and conversion counts on the console


def _damage_first_shard(data_dir: Path) -> None:
    """Replace one image of the first training shard by garbage bytes and another by a grayscale PNG."""
    shard = data_dir / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    images = [i for i, (m, _) in enumerate(members) if m.name.endswith(".png")]
    members[images[0]] = (members[images[0]][0], b"\x89PNG not really an image")
    gray = io.BytesIO()
    Image.new("L", (32, 32), 128).save(gray, "PNG")
    members[images[1]] = (members[images[1]][0], gray.getvalue())
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_skip_and_conversion_counts_are_printed_by_the_train_command(tmp_path, capsys):
    common = [f"output_dir={tmp_path}", SMALL_WORLD]
    main_make_shards(["--config", str(TINY / "make_shards.yaml"), *common])
    _damage_first_shard(tmp_path / "data")
    torch.manual_seed(0)
    main_train(["--config", str(TINY / "train.yaml"), *common, "train.max_steps=4", "standin.lm.steps=2",
                "standin.vision.steps=1", "data.use_cached_features=false"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "data pass done: skipped {'corrupt_image': 1}, converted {'L': 1}" in printed  # each full pass
    assert "train data: skipped {'corrupt_image':" in printed and "converted {'L':" in printed  # the run's total


def test_only_rank_zero_of_a_torchrun_job_takes_the_lock(tmp_path, monkeypatch):
    from vlm.lock import try_lock

    holder = _hold(tmp_path, "train")
    try:
        monkeypatch.setenv("RANK", "1")  # the other ranks of the holder's own job share the directory
        assert try_lock(tmp_path, "train") == (None, None)
        monkeypatch.setenv("RANK", "0")
        fd, refused = try_lock(tmp_path, "train")
        assert fd is None and refused.pid == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    from vlm.io import remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".tmp_step_0000004_{dead_pid}_deadbeef").mkdir()
    (tmp_path / f".tmp_latest_{dead_pid}_0badf00d").write_text("x")
    live = tmp_path / f".tmp_step_0000006_{os.getpid()}_12345678"
    live.mkdir()
    (tmp_path / "step_0000002").mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert len(removed) == 2 and sorted(p.name for p in tmp_path.iterdir()) == [live.name, "step_0000002"]
