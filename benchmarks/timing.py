"""The side-by-side timing the benchmark scripts share: warm up each, then alternate."""

import math
import statistics
import time


def best_of_alternating(functions, repeats, calls=1):
    """Seconds per call of each function, best of `repeats` rounds.

    Each function is called once first (tracing, compilation), then the rounds
    alternate between them, so load on the machine hits all of them alike. A round
    times `calls` calls of each (for functions too fast to time one call at a time).
    """
    for function in functions:
        function()
    best = [math.inf] * len(functions)
    for _ in range(repeats):
        for k, function in enumerate(functions):
            start = time.perf_counter()
            for _ in range(calls):
                function()
            best[k] = min(best[k], (time.perf_counter() - start) / calls)
    return best


def median_of_alternating(functions, repeats):
    """Seconds per call of each function, the median of `repeats` alternating rounds (after one warm-up call each)."""
    for function in functions:
        function()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for k, function in enumerate(functions):
            start = time.perf_counter()
            function()
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]
