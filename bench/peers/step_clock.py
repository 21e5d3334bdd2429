"""Wall-clock timing of a training loop, excluding its first few (warm-up) steps.

The adapters call `tick()` as each step starts and `stop()` when the loop ends; throughput is
measured from the start of step `warmup_steps` to the end, so allocator and thread-pool warm-up
do not count, and neither does any load or setup before the loop. CPU time and the host's load
average are kept too: on a shared 2-core machine, other work shows up as cpu_seconds well
below timed_seconds x threads, or as a load average above the thread count.
"""

from __future__ import annotations

import os
import time


class StepClock:
    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.step_starts: list[float] = []
        self.step_cpu: list[float] = []
        self.end: float | None = None
        self.end_cpu = 0.0
        self.load_before = os.getloadavg()[0]
        self.load_after = 0.0

    def tick(self) -> None:
        self.step_starts.append(time.perf_counter())
        self.step_cpu.append(time.process_time())

    def stop(self) -> None:
        self.end = time.perf_counter()
        self.end_cpu = time.process_time()
        self.load_after = os.getloadavg()[0]

    def summary(self, batch_size: int) -> dict[str, float | int]:
        if self.end is None or not self.step_starts:
            raise RuntimeError("the training loop never ran")
        steps = len(self.step_starts)
        warmup = min(self.warmup_steps, steps - 1)
        timed_seconds = self.end - self.step_starts[warmup]
        timed_tokens = (steps - warmup) * batch_size
        return {
            "steps": steps,
            "tokens_trained": steps * batch_size,
            "train_seconds": self.end - self.step_starts[0],
            "warmup_steps_excluded": warmup,
            "timed_tokens": timed_tokens,
            "timed_seconds": timed_seconds,
            "tokens_per_second": timed_tokens / timed_seconds,
            "timed_cpu_seconds": self.end_cpu - self.step_cpu[warmup],
            "host_load_1min_before_after": [self.load_before, self.load_after],
        }
