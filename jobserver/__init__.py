"""jobserver: a Gearman-compatible job server."""

__version__ = "0.1.0"
