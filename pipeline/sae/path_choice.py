"""Choices between ways of computing one result whose speeds cross over on a machine-dependent
point, made by timing them on the running device.

A table measured on one machine decides far from its crossover; near it (or on a device type it
has no entry for) the first call of each problem times every path on that call's own inputs,
interleaved so a burst of load hits all alike, keeps the fastest for the rest of the process
and says so in one line. The table's path stays unless another takes less than `margin` of its
time: a near tie is not worth a choice that timing noise would make differently in each process.

Users: the TopK decode (decode_path.py), AuxK's decode (pipeline/train/aux_k_path.py), and the
encoder kernel's timing (encoder_kernel.py, which also checks its kernels agree). A checkpoint
records the choices and a resumed run pins them: the paths round differently, and a resume must
stay bitwise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch


def fastest(paths: dict[str, Callable[[], object]], default: str, *, rounds: int, margin: float,
            device_type: str = "cpu", warmup: bool = True) -> tuple[str, dict[str, float]]:
    """(the path to use, the best seconds of each path). warmup: one untimed call of each first
    (first-call allocations and kernel set-up)."""
    if warmup:
        for run in paths.values():
            run()
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(rounds):
        for name, run in paths.items():
            _sync(device_type)
            started = time.perf_counter()
            run()
            _sync(device_type)
            best[name] = min(best[name], time.perf_counter() - started)
    winner = min(best, key=best.get)
    return (winner if best[winner] < margin * best[default] else default), best


class PathChoices:
    """One kind of choice in this process: {problem key: path}, timed here or pinned from a
    checkpoint. `what` names it in the log line ("topk decode", "aux-k decode")."""

    def __init__(self, what: str, *, rounds: int, margin: float, warmup: bool = True):
        self.what, self.rounds, self.margin, self.warmup = what, rounds, margin, warmup
        self._chosen: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self._chosen.get(key)

    def settle(self, key: str, default: str, paths: dict[str, Callable[[], object]], device_type: str,
               agree: Callable[[str], str] | None = None, detail: str = "") -> str:
        """Time `paths` once for `key` and keep the result (agree: makes every rank's choice the
        same, e.g. rank 0's broadcast). detail: what was timed, for the log line."""
        path, timings = fastest(paths, default, rounds=self.rounds, margin=self.margin, device_type=device_type,
                                warmup=self.warmup)
        if agree is not None:
            path = agree(path)
        times = ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in timings.items())
        say(f"{self.what} for {key}: {path} ({times}{': ' + detail if detail else ''})")
        self._chosen[key] = path
        return path

    def all(self) -> dict[str, str]:
        """Every choice made (or pinned) in this process, for a checkpoint."""
        return dict(self._chosen)

    def pin(self, choices: dict[str, str]) -> None:
        """Use a checkpoint's choices for those problems instead of timing them again."""
        self._chosen.update(choices)

    def forget(self) -> None:
        """Drop every choice (tests)."""
        self._chosen.clear()


def power_of_two_class(n: int) -> int:
    """The power of two at or above n: a key's size class, so a varying size times a handful of
    classes instead of every value it passes through."""
    return 1 << max(0, n - 1).bit_length()


def say(message: str) -> None:
    print(f"saeflow: {message}", file=sys.stderr, flush=True)


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()
