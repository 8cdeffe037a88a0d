"""Benchmarks: jobserver side by side with gearmand and gear's geard (`python -m bench.run`)."""
