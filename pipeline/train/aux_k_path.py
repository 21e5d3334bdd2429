"""Which decode AuxK takes on the CPU: the dead columns by matmul, or each row's k_aux largest
gathered (pipeline/train/aux_k.py). The two give the same loss and gradients.

The table (aux_k.DENSE_COLUMNS_PER_K_AUX) switches at n_dead = 4 k_aux, measured on an AMD EPYC;
an Intel Xeon put the crossover between 6.4 and 9.6 k_aux (bench/sae_step.py --aux). So where
n_dead / k_aux is within a factor PROBE_BAND of the table's 4 (1 to 16), the first step of each
problem times one AuxK forward + backward of each decode on its whole batch (parameters' .grad
untouched) and keeps the faster for the rest of the process, through pipeline/sae/path_choice.py
(its log line, margin and checkpoint pinning: `paths`). The whole batch, because a quarter of it
misjudged the gathered decode by a fifth: its sorts and gathers grow faster than the rows. The
number of dead latents changes as training goes, so it is kept by its power-of-two class: a run
times a handful of classes. Problems below the encoder probe's PROBE_MIN_MACS (rows * d_model * n_dead) are not
timed. The accelerators' fixed-shape AuxK has no choice to make.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.sae.encoder_kernel import PROBE_MIN_MACS
from pipeline.sae.path_choice import PathChoices, power_of_two_class
from pipeline.train.aux_k import DENSE_COLUMNS_PER_K_AUX, aux_k_loss, table_says_columns

PROBE_BAND = 4  # timed while n_dead / k_aux is within [4 / 4, 4 * 4]
# no untimed call first: the faster of two calls each already drops a first call's set-up, and
# each call is a whole batch's AuxK (~0.1-0.2 s at 4096 rows and 6144 latents)
paths = PathChoices("aux-k decode", rounds=2, margin=0.9, warmup=False)


@dataclass(frozen=True)
class Problem:
    device_type: str
    dtype: str  # the pre-activations'
    d_model: int
    d_sae: int
    k_aux: int
    n_dead: int

    @property
    def key(self) -> str:
        return (f"{self.device_type} {self.dtype} {self.d_model}->{self.d_sae} k_aux={self.k_aux} "
                f"dead<={power_of_two_class(self.n_dead)}")


def needs_probe(problem: Problem, rows: int) -> bool:
    if rows * problem.d_model * problem.n_dead < PROBE_MIN_MACS:
        return False
    return DENSE_COLUMNS_PER_K_AUX / PROBE_BAND <= problem.n_dead / problem.k_aux <= DENSE_COLUMNS_PER_K_AUX * PROBE_BAND


def uses_columns(problem: Problem) -> bool:
    """The decode for this problem: the one timed (or pinned) for its key, else the table's."""
    chosen = paths.get(problem.key)
    return table_says_columns(problem.n_dead, problem.k_aux) if chosen is None else chosen == "columns"


def choose(residual: Tensor, hidden_pre: Tensor, dead_mask: Tensor, W_dec: Tensor, k_aux: int,
           encoder: tuple[Tensor, Tensor, Tensor] | None, agree: Callable[[str], str] | None = None) -> bool:
    """Whether aux_k_loss decodes these dead columns by matmul; times both decodes on the first
    step of an undecided problem (agree: every rank's choice made the same). The dead mask must
    be the same on every rank (it is: the firing counts are summed over ranks)."""
    n_dead = int(dead_mask.sum())
    problem = Problem(hidden_pre.device.type, str(hidden_pre.dtype).removeprefix("torch."), W_dec.shape[1],
                      W_dec.shape[0], k_aux, n_dead)
    if paths.get(problem.key) is None and needs_probe(problem, hidden_pre.shape[0]):
        step = _probe_step(residual, hidden_pre.detach(), dead_mask, W_dec, k_aux,
                           None if encoder is None else (encoder[0].detach(), *encoder[1:]))
        paths.settle(problem.key, "columns" if table_says_columns(n_dead, k_aux) else "gathered",
                     {"columns": lambda: step(True), "gathered": lambda: step(False)}, problem.device_type,
                     agree, detail=f"one forward + backward of {hidden_pre.shape[0]} rows")
    return uses_columns(problem)


def _probe_step(residual, hidden_pre, dead_mask, W_dec, k_aux, encoder) -> Callable[[bool], None]:
    """One AuxK forward + backward on a decode, its gradients returned, not accumulated. Without
    the encoder, the gradient stops at a leaf copy of the pre-activations: the part after it (the
    main forward's graph) is the same for both decodes."""
    if encoder is None:
        hidden_pre = hidden_pre.requires_grad_()
        inputs = [hidden_pre, W_dec]
    else:
        inputs = [W_dec, encoder[1], encoder[2]]

    def step(columns: bool) -> None:
        loss = aux_k_loss(residual, hidden_pre, dead_mask, W_dec, k_aux, encoder, columns=columns)
        if loss.requires_grad:  # a loss with no column used is a constant
            torch.autograd.grad(loss, inputs, allow_unused=True)
    return step

