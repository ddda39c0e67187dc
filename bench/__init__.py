"""Benchmarks: Conveyor against peers measured in the same run (see RESULTS.md)."""
