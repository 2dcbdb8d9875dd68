"""Wall-clock timing shared by the benchmark scripts (run them as `python benchmarks/X.py`)."""

import time


def run_times(fn, reps: int, warmup: int = 1) -> list[float]:
    """Seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times
