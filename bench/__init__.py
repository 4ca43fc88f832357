"""Benchmarks: each `bench/bench_<name>.py` measures one thing side by side in one run."""
