"""The one error type of deleaker-bench: a benchmark request that cannot be run as asked."""


class BenchError(ValueError):
    """A benchmark request cannot be run as asked; the message says why."""
