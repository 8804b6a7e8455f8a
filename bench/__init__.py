"""Benchmarks of retrain (not tests): ``python -m bench.run`` or ``make bench``."""
