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

The timing and the kept choices (`paths`) are pipeline/sae/path_choice.py's. A checkpoint
records the choices (paths.all()) and a resumed run pins them (paths.pin): the paths round
differently, and a resume must stay bitwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.sae.encoder_kernel import PROBE_MIN_MACS  # rows * d_model * d_sae: the same floor as that probe
from pipeline.sae.path_choice import PathChoices, power_of_two_class

SPARSE_TOPK_MIN_RATIO = {"cpu": 8}
PROBE_BAND = 4  # timed when d_sae / k is within [ratio / 4, ratio * 4] of the table's crossover
PROBE_ROWS = 1024  # both paths scale with the rows alike: a quarter of a 4096-row batch is enough
PROBE_ROUNDS = 2  # timed calls of each path (the fastest counts), after one untimed call
PROBE_MARGIN = 0.9  # the other path must take < 90% of the table's path's time to replace it

Step = Callable[[bool], None]  # one forward + backward on a path (True: sparse)
paths = PathChoices("topk decode", rounds=PROBE_ROUNDS, margin=PROBE_MARGIN)


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
        return (f"{self.device_type} {self.dtype} {self.d_model}->{self.d_sae} k<={power_of_two_class(self.k)}"
                + (" glu" if self.glu else ""))


def table_says_sparse(problem: Problem) -> bool:
    return problem.k * SPARSE_TOPK_MIN_RATIO.get(problem.device_type, SPARSE_TOPK_MIN_RATIO["cpu"]) <= problem.d_sae


def is_sparse(problem: Problem) -> bool:
    """The path for this problem: the one timed (or pinned) for its key, else the table's."""
    chosen = paths.get(problem.key)
    return table_says_sparse(problem) if chosen is None else chosen == "sparse"


def needs_probe(problem: Problem, rows: int) -> bool:
    if rows * problem.d_model * problem.d_sae < PROBE_MIN_MACS:
        return False
    ratio = SPARSE_TOPK_MIN_RATIO.get(problem.device_type)
    return ratio is None or ratio / PROBE_BAND <= problem.d_sae / problem.k <= ratio * PROBE_BAND


def undecided(problem: Problem, rows: int) -> bool:
    """Whether settle would time this problem: no choice kept for it, and needs_probe."""
    return paths.get(problem.key) is None and needs_probe(problem, rows)


def settle(problem: Problem, rows: int, step: Step, agree: Callable[[str], str] | None = None) -> None:
    """Time both paths with `step` once per problem key where undecided (agree: every rank's choice
    made the same, e.g. rank 0's broadcast), then keep the result."""
    if not undecided(problem, rows):
        return
    paths.settle(problem.key, "sparse" if table_says_sparse(problem) else "dense",
                 {"sparse": lambda: step(True), "dense": lambda: step(False)}, problem.device_type, agree,
                 detail=f"one forward + backward of {min(rows, PROBE_ROWS)} rows")

