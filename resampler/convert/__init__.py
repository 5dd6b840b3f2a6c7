"""Weight converters from outside implementations; each one is proven by a parity test."""

from .hf_perceiver import from_hf_perceiver

__all__ = ["from_hf_perceiver"]
