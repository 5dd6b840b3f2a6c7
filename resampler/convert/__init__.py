"""Weight converters from outside implementations; each one is proven by a parity test."""

from .flamingo import from_flamingo_pytorch
from .hf_perceiver import from_hf_perceiver
from .idefics import from_idefics_perceiver
from .idefics2 import from_idefics2
from .perceiver_pytorch import from_perceiver_pytorch

__all__ = [
    "from_flamingo_pytorch",
    "from_idefics2",
    "from_idefics_perceiver",
    "from_hf_perceiver",
    "from_perceiver_pytorch",
]
