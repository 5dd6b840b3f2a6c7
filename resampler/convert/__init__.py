"""Weight converters from outside implementations; each one is proven by a parity test."""
