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


def interleaved_times(fns: dict, reps: int, warmup: int = 1, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds of ``reps`` rounds, each calling every function of ``fns`` once in turn.

    On a shared machine the speed drifts by 10-30% over seconds; timing the things to be
    compared side by side, round after round, exposes them to the same drift, so their
    ratio is far steadier than that of two separate timing loops. ``clock=time.process_time``
    counts the process's CPU time (all threads) instead of wall-clock: it leaves out the time
    spent waiting for a core on a machine busy with other jobs."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return times
