"""Benchmarks: `python -m benchmarks` prints the weight-analysis table (see __main__)."""
