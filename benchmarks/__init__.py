"""tether's benchmarks: `make bench` (python -m benchmarks.run) writes BENCHMARKS.md."""
