"""Writes a peer's trained SAE in the one format our evaluator reads.

sae.safetensors holds float32 W_enc (d, d_sae), b_enc (d_sae,), W_dec (d_sae, d), b_dec (d,) for
raw (un-normalized) activations, with this forward:
    z = topk_k(relu(x @ W_enc + b_enc));  x_hat = z @ W_dec + b_dec
Both peers subtract b_dec from the input before encoding; that is folded into b_enc here
(b_enc - b_dec @ W_enc), so the evaluator needs no per-tool convention.
run.json holds the run's facts (tool, version, throughput, hyperparameters, normalization).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ENCODE_CONVENTION = "z = topk_k(relu(x @ W_enc + b_enc)); x_hat = z @ W_dec + b_dec (raw activation space)"


def fold_input_centering(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """b_enc for an encoder that no longer subtracts b_dec from its input."""
    return b_enc.double() - b_dec.double() @ W_enc.double()


def write_sae(out_dir: Path, W_enc, b_enc, W_dec, b_dec) -> Path:
    tensors = {
        "W_enc": W_enc,
        "b_enc": b_enc,
        "W_dec": W_dec,
        "b_dec": b_dec,
    }
    # safetensors refuses views (a transposed weight): store contiguous float32 copies.
    tensors = {name: t.detach().to(torch.float32).contiguous().clone() for name, t in tensors.items()}
    path = out_dir / "sae.safetensors"
    save_file(tensors, str(path))
    return path


def write_run_json(out_dir: Path, facts: dict) -> Path:
    path = out_dir / "run.json"
    path.write_text(json.dumps({**facts, "encode_convention": ENCODE_CONVENTION}, indent=2) + "\n")
    return path


@torch.no_grad()
def exported_reconstruction(x: torch.Tensor, W_enc, b_enc, W_dec, b_dec, k: int) -> torch.Tensor:
    """The forward that sae.safetensors promises, to check an export against the peer's own."""
    pre = torch.relu(x.double() @ W_enc.double() + b_enc.double())
    values, indices = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter_(-1, indices, values)
    return z @ W_dec.double() + b_dec.double()


def parity(theirs: torch.Tensor, ours: torch.Tensor, x: torch.Tensor) -> dict[str, float | int]:
    """How far the exported forward is from the peer's own, on the same rows.

    A row can differ legitimately when its k-th and (k+1)-th pre-activations tie to within
    float32 rounding (seen with near-initial weights), so count differing rows rather than
    trusting a max alone.
    """
    theirs, ours = theirs.double(), ours.double()
    row_error = (theirs - ours).abs().amax(dim=1) / x.abs().max().double()
    return {
        "parity_rows": len(x),
        "parity_rows_differing": int((row_error > 1e-4).sum()),
        "parity_rel_frobenius": float((theirs - ours).norm() / theirs.norm()),
    }
