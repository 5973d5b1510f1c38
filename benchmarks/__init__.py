"""editscale's performance harness: `python -m benchmarks` (see benchmarks/RESULTS.md)."""
