"""The known-harmless third-party messages are gone, and only they: the same category, module and logger
still report anything else."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import vlm.quiet

ROOT = Path(__file__).resolve().parents[1]


def test_building_a_lora_vlm_prints_no_transformers_deprecation():
    code = "import vlm; from vlm.testing import tiny_vlm; tiny_vlm('llama')"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is_gradient_checkpointing" not in proc.stderr and "FutureWarning" not in proc.stderr


def test_other_future_warnings_of_transformers_still_show():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        vlm.quiet.install()  # the filters go in front again, as at import
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use x",
                               FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")  # fmt: skip
        warnings.warn_explicit("something else is deprecated", FutureWarning, "modeling_utils.py", 2,
                               module="transformers.modeling_utils")  # fmt: skip
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6", FutureWarning,
                               "mine.py", 3, module="mine")  # fmt: skip
    assert [str(w.message) for w in seen] == [
        "something else is deprecated",
        "`is_gradient_checkpointing` is deprecated and will be removed in v6",
    ]


def test_bitsandbytes_kernels_hint_is_dropped_and_nothing_else(caplog):
    logger = logging.getLogger(vlm.quiet.BNB_LOGGER)
    with caplog.at_level(logging.WARNING, logger=vlm.quiet.BNB_LOGGER):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1",
            "no module named kernels",
        )
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
