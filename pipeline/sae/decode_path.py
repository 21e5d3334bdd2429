"""Which path a TopK forward takes under topk_decode "auto": sparse (the k selected latents per
row, embedding_bag; pipeline/sae/sparse_topk.py) or dense (a (B, d_sae) matmul).

The paths compute the same function; their cost crosses over at a ratio d_sae / k that depends
on the device. SPARSE_TOPK_MIN_RATIO holds the crossover `bench/sae_step.py --scan` measured (8
on the CPUs measured). Far from it the table decides. Within a factor PROBE_BAND of it, or on a
device type with no measured ratio (no CUDA run is on record), the first training step of each
problem times one forward and backward of each path on the batch it was given (up to
PROBE_ROWS rows, interleaved rounds, parameters' .grad untouched), keeps the faster for the rest
of the process and says so in one line; the table's path stays unless the other is faster by
PROBE_MARGIN. Evaluation and other forwards without a training step use the choice made for
their problem, else the table. Problems below PROBE_MIN_MACS are not timed: there the choice costs little, and a
choice made by timing noise would differ between processes (and between a test's two runs).

A checkpoint records the choices (decode_choices) and a resumed run pins them
(pin_decode_choices): the paths round differently, and a resume must stay bitwise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.sae.encoder_kernel import PROBE_MIN_MACS  # rows * d_model * d_sae: the same floor as that probe

SPARSE_TOPK_MIN_RATIO = {"cpu": 8}
PROBE_BAND = 4  # timed when d_sae / k is within [ratio / 4, ratio * 4] of the table's crossover
PROBE_ROWS = 1024  # both paths scale with the rows alike: a quarter of a 4096-row batch is enough
PROBE_ROUNDS = 2  # timed calls of each path (the fastest counts), after one untimed call
PROBE_MARGIN = 0.9  # the other path must take < 90% of the table's path's time to replace it

Step = Callable[[bool], None]  # one forward + backward on a path (True: sparse)
_chosen: dict[str, bool] = {}  # problem key -> sparse?, timed here or pinned from a checkpoint


@dataclass(frozen=True)
class Problem:
    """What the choice depends on. k is kept by its power-of-two class, so a k schedule times a
    handful of classes, not every k it passes through."""

    device_type: str
    dtype: str  # the SAE's, or the autocast dtype
    d_model: int
    d_sae: int
    k: int
    glu: bool

    @property
    def key(self) -> str:
        k_class = 1 << max(0, self.k - 1).bit_length()
        return f"{self.device_type} {self.dtype} {self.d_model}->{self.d_sae} k<={k_class}" + (" glu" if self.glu else "")


def table_says_sparse(problem: Problem) -> bool:
    return problem.k * SPARSE_TOPK_MIN_RATIO.get(problem.device_type, SPARSE_TOPK_MIN_RATIO["cpu"]) <= problem.d_sae


def is_sparse(problem: Problem) -> bool:
    """The path for this problem: the one timed (or pinned) for its key, else the table's."""
    return _chosen.get(problem.key, table_says_sparse(problem))


def needs_probe(problem: Problem, rows: int) -> bool:
    if rows * problem.d_model * problem.d_sae < PROBE_MIN_MACS:
        return False
    ratio = SPARSE_TOPK_MIN_RATIO.get(problem.device_type)
    return ratio is None or ratio / PROBE_BAND <= problem.d_sae / problem.k <= ratio * PROBE_BAND


def undecided(problem: Problem, rows: int) -> bool:
    """Whether settle would time this problem: no choice kept for it, and needs_probe."""
    return problem.key not in _chosen and needs_probe(problem, rows)


def settle(problem: Problem, rows: int, step: Step, agree: Callable[[bool], bool] | None = None) -> None:
    """Time both paths with `step` once per problem key where undecided (agree: every rank's choice
    made the same, e.g. rank 0's broadcast), then keep the result."""
    if not undecided(problem, rows):
        return
    sparse, timings = probe(step, table_says_sparse(problem), problem.device_type)
    if agree is not None:
        sparse = agree(sparse)
    times = ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in timings.items())
    _say(f"topk decode for {problem.key}: {'sparse' if sparse else 'dense'} ({times}: one forward + backward "
         f"of {min(rows, PROBE_ROWS)} rows)")
    _chosen[problem.key] = sparse


def probe(step: Step, default_sparse: bool, device_type: str) -> tuple[bool, dict[str, float]]:
    """(sparse?, the best seconds of each path). Interleaved, so a burst of load hits both alike."""
    paths = {"sparse": True, "dense": False}
    for sparse in paths.values():
        step(sparse)  # untimed: first-call allocations and kernel set-up
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(PROBE_ROUNDS):
        for name, sparse in paths.items():
            _sync(device_type)
            started = time.perf_counter()
            step(sparse)
            _sync(device_type)
            best[name] = min(best[name], time.perf_counter() - started)
    default, other = ("sparse", "dense") if default_sparse else ("dense", "sparse")
    return (other if best[other] < PROBE_MARGIN * best[default] else default) == "sparse", best


def decode_choices() -> dict[str, str]:
    """This process's timed (and pinned) choices, {problem key: "sparse" | "dense"}, for a checkpoint."""
    return {key: "sparse" if sparse else "dense" for key, sparse in _chosen.items()}


def pin_decode_choices(choices: dict[str, str]) -> None:
    """Use a checkpoint's choices for those problems instead of timing them again."""
    _chosen.update({key: path == "sparse" for key, path in choices.items()})


def forget_decode_choices() -> None:
    """Drop every choice (tests)."""
    _chosen.clear()


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def _say(message: str) -> None:
    print(f"saeflow: {message}", file=sys.stderr, flush=True)
