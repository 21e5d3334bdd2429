"""The BatchTopK inference threshold, calibrated once training ends.

In training BatchTopK keeps the k * B largest gates of each batch; at inference a latent fires
where its gate exceeds one threshold. The running estimate training keeps (an EMA of the
smallest gate each batch kept, as SAELens does) lags and sits low: after a short run on
configs/tiny.yaml it gave a held-out L0 of 12.4 for k = 8. So at the end the threshold is set
from a sample of training rows instead: between the (k * N)-th and (k * N + 1)-th largest gate
over the N rows, so that exactly k * N gates pass it, i.e. mean L0 = k on those rows (0 when
fewer than k * N gates are positive). save_sae and the SAELens (JumpReLU) export take it along.
"""

from __future__ import annotations

import torch

from pipeline.config import ExperimentConfig
from pipeline.sae.model import SparseAutoencoder
from store.reader import StoreReader
from store.sampling import sample_rows


def calibrate_after_training(sae: SparseAutoencoder, cfg: ExperimentConfig, reader: StoreReader) -> dict | None:
    """Calibrate a BatchTopK SAE's threshold on train.batchtopk_calibration_rows training rows
    (drawn with loader.seed); returns what was done, for train_metrics.json (None: nothing to do)."""
    rows = cfg.train.batchtopk_calibration_rows
    if sae.cfg.act.threshold != "batchtopk_threshold" or rows == 0:
        return None
    x_in = sample_rows(reader, sae.cfg.hook_point_in, rows, seed=cfg.loader.seed, heldout_chunks=cfg.loader.heldout_chunks)
    running = float(sae.batchtopk_threshold)
    threshold = calibrate_batchtopk_threshold(sae, x_in, cfg.evaluate.batch_size)
    return {"rows": int(x_in.shape[0]), "running_estimate": running, "calibrated": threshold,
            "l0_on_calibration_rows": mean_l0(sae, x_in, cfg.evaluate.batch_size)}


@torch.no_grad()
def calibrate_batchtopk_threshold(sae: SparseAutoencoder, x_in: torch.Tensor, batch_size: int) -> float:
    """Set sae.batchtopk_threshold so that mean L0 on the raw rows x_in is top_k; returns it.
    Streams x_in in batches, keeping the k * N + 1 largest gates seen so far."""
    keep = sae.cfg.top_k * x_in.shape[0] + 1
    largest = torch.empty(0, device=sae.W_dec.device)
    for start in range(0, x_in.shape[0], batch_size):
        gates = _gates(sae, x_in[start : start + batch_size]).reshape(-1)
        candidates = torch.cat([largest, gates.topk(min(keep, gates.numel())).values])
        largest = candidates.topk(min(keep, candidates.numel())).values  # sorted, largest first
    if largest.numel() < keep:  # fewer gates than k per row: every positive one passes
        threshold = 0.0
    else:
        threshold = max(float((largest[-2].double() + largest[-1].double()) / 2), 0.0)
    sae.batchtopk_threshold.fill_(threshold)
    return float(sae.batchtopk_threshold)


@torch.no_grad()
def mean_l0(sae: SparseAutoencoder, x_in: torch.Tensor, batch_size: int) -> float:
    """Mean active latents per row of the raw rows x_in, in eval mode (the learned threshold)."""
    training = sae.training
    sae.eval()
    try:
        active = sum(int((sae.encode(x_in[start : start + batch_size].to(sae.W_dec.device)) != 0).sum())
                     for start in range(0, x_in.shape[0], batch_size))
    finally:
        sae.train(training)
    return active / max(x_in.shape[0], 1)


def _gates(sae: SparseAutoencoder, x_raw: torch.Tensor) -> torch.Tensor:
    """What the threshold compares, float32: the gate of hidden_pre (model.SparseAutoencoder.gate)."""
    hidden_pre = sae.encode_pre(sae.normalize_input(x_raw.to(sae.W_dec.device)))
    return sae.gate(hidden_pre).float()
