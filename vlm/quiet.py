"""Known-harmless third-party messages, silenced at import of vlm, each by its exact source and text.

- transformers 5 deprecates ``is_gradient_checkpointing`` / ``gradient_checkpointing_enable`` (FutureWarning
  from ``transformers.modeling_utils``); peft reads the first whenever it wraps a model and calls the second
  in ``prepare_model_for_kbit_training``, so every LoRA build printed it. The behaviour is unchanged.
- bitsandbytes' CPU backend logs "Failed to load CPU gemm_4bit_forward from kernels-community ... `pip install
  kernels`" on CPUs with AVX-512 BF16, then uses its own kernel: the optional ``kernels`` package would
  download code from the Hub at run time, which this project never does.

Every other warning of the same category, module or logger still shows (tests/test_quiet.py).
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["install", "BNB_LOGGER"]

BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_TRANSFORMERS_DEPRECATIONS = (
    r"`is_gradient_checkpointing` is deprecated and will be removed in v6",
    r"`gradient_checkpointing_enable` is deprecated and will be removed in v6",
)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Add the filters (idempotent)."""
    for message in _TRANSFORMERS_DEPRECATIONS:
        warnings.filterwarnings(
            "ignore", message=message, category=FutureWarning, module=r"transformers\.modeling_utils"
        )
    logger = logging.getLogger(BNB_LOGGER)  # the same object bitsandbytes gets later with getLogger(__name__)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(_BNB_MESSAGE))


install()
