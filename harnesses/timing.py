"""Timing and peak memory of training steps, shared by the harnesses (benchmark, GPU acceptance)."""
from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from typing import Any

GIB = 2 ** 30


def peak_memory_gib(device: str) -> float:
    """Peak allocated GPU memory of this process; on the CPU (tests) the peak resident set."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def timed_steps(step: Callable[[], Any], device: str, warmup: int, iters: int,
                deadline: float = math.inf) -> list[float]:
    """Seconds of each of up to `iters` steps after `warmup` untimed ones; from the third step on, stops at
    `deadline` (time.time()), so a slow row still reports what it measured."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times: list[float] = []
    while len(times) < iters and (len(times) < 2 or time.time() < deadline):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times
