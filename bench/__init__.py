"""Benchmarks (`make bench`): Taskgate against pgqueuer, procrastinate and the hardware."""
