"""Converters from the field's pretrained VLMs to a normal `vlm.VisionLanguageModel` (same logits).

    from_idefics(hf, tokenizer)        # transformers IdeficsForVisionText2Text (IDEFICS v1)
    from_idefics2(hf, tokenizer)       # transformers Idefics2ForConditionalGeneration
    from_open_flamingo(flamingo, tok)  # an open_flamingo Flamingo object
    load_open_flamingo("checkpoint.pt", open_clip_model, lm, tokenizer, cross_attn_every_n_layers=k)

The resampler-only converters live in `resampler.convert`; docs/pretrained_vlms.md has the hub ids
and the loading code.
"""

from .idefics import from_idefics, idefics_config, idefics_parts
from .idefics2 import from_idefics2, idefics2_config, idefics2_parts
from .open_flamingo import OPEN_FLAMINGO_MODELS, from_open_flamingo, load_flamingo_state, load_open_flamingo

__all__ = [
    "from_idefics",
    "idefics_config",
    "idefics_parts",
    "from_idefics2",
    "idefics2_config",
    "idefics2_parts",
    "from_open_flamingo",
    "load_open_flamingo",
    "load_flamingo_state",
    "OPEN_FLAMINGO_MODELS",
]
