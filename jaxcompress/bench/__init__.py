"""Benchmark jobs: run through launch.main with configs under configs/bench/."""
