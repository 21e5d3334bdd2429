"""BatchTopK's inference threshold, calibrated at the end of training so that mean L0 = top_k on
training rows (pipeline/train/calibrate.py), and carried into the saved SAE and its export."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline import SAEConfig
from pipeline.sae.io import load_sae
from pipeline.sae.model import SparseAutoencoder
from pipeline.train.calibrate import calibrate_batchtopk_threshold, mean_l0
from pipeline.train.stage import train
from store.reader import StoreReader
from store.sampling import sample_rows
from tests.sae.test_io import saelens_forward
from tests.train.test_train import tiny_config

K = 8


@pytest.fixture(scope="module")
def batchtopk_run(store, tmp_path_factory):
    cfg = tiny_config(store, tmp_path_factory.mktemp("batchtopk"), "sae.act_fn=batchtopk", f"sae.top_k={K}")
    return cfg, train(cfg)[0]


@torch.no_grad()
def test_trained_threshold_gives_mean_l0_k_on_training_and_heldout_rows(batchtopk_run):
    cfg, run = batchtopk_run
    metrics = json.loads((run / "train_metrics.json").read_text())
    calibration = metrics["batchtopk_threshold"]
    reader = StoreReader(cfg.generate.store)
    rows = sample_rows(reader, cfg.sae.hook_point_in, cfg.train.batchtopk_calibration_rows, seed=cfg.loader.seed,
                       heldout_chunks=cfg.loader.heldout_chunks)
    assert calibration["rows"] == rows.shape[0] > 1000
    assert calibration["calibrated"] != pytest.approx(calibration["running_estimate"], rel=1e-3)
    sae = load_sae(run)  # the saved SAE, folded for raw activations, reads the rows it was calibrated on
    l0 = float((sae.encode(rows) != 0).sum(-1).double().mean())
    assert l0 == pytest.approx(K, abs=0.01)
    assert calibration["l0_on_calibration_rows"] == pytest.approx(K, abs=0.01)
    assert metrics["heldout"]["l0"] == pytest.approx(K, rel=0.1)  # the running estimate gave ~12 here
    # the SAELens export (a JumpReLU) gates the same latents
    export = run / "saelens"
    latents, _ = saelens_forward(json.loads((export / "cfg.json").read_text()), load_file(str(export / "sae_weights.safetensors")),
                                 rows)
    assert float((latents != 0).sum(-1).double().mean()) == pytest.approx(K, abs=0.01)


@torch.no_grad()
def test_calibration_passes_exactly_k_gates_per_row_on_average():
    cfg = SAEConfig(hook_point_in="h", hook_point_out="h", d_model=16, expansion_factor=4, act_fn="batchtopk", top_k=3,
                    norm_activation="inference")
    sae = SparseAutoencoder(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(1))
    threshold = calibrate_batchtopk_threshold(sae, x, batch_size=64)  # batches smaller than the budget of k * N gates
    gates = (x @ sae.W_enc + sae.b_enc) * sae.decoder_norms()
    assert int((gates > threshold).sum()) == 3 * 500
    assert mean_l0(sae, x, batch_size=64) == 3.0 and sae.training  # measured in eval mode, mode restored
    sae.b_enc.fill_(-100.0)  # hardly any positive gate: every positive one passes, none of the rest
    assert calibrate_batchtopk_threshold(sae, x, batch_size=64) == 0.0
