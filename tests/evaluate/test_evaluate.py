"""saeflow evaluate: activation metrics on held-out rows, CE/KL with the SAE spliced into the LM.

The decoder cases run on the seeded random model of configs/tiny.yaml with a store generated in
process (seconds); SAEs are built by hand so the right answer is known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.config import load_config
from pipeline.evaluate.sequences import HELDOUT_STORE_ROWS, HELDOUT_TEXT, first_unused_document, heldout_sequences
from pipeline.evaluate.stage import HISTOGRAM_FILE, METRICS_FILE, evaluate
from pipeline.generate.stage import generate
from pipeline.generate.lm import load_language_model
from pipeline.evaluate.splice import kl_per_token, lm_metrics, next_token_losses, spliced
from pipeline.sae.model import SparseAutoencoder
from pipeline.sae.config import SAEConfig
from pipeline.sae.io import save_sae
from pipeline.generate.text import iter_documents
from pipeline.generate.windows import BOS, PAD
from store.format import read_manifest, write_manifest
from store.reader import StoreReader
from store.split_moments import store_moments
from tests.store_fixtures import make_store, random_rows

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
RESID = "blocks.0.hook_resid_post"
MLP_OUT = "blocks.1.hook_mlp_out"
D = 64  # tiny.yaml's d_model


def tiny_config(tmp: Path, *overrides: str):
    return load_config(TINY, [f"generate.store={tmp / 'tiny.zarr'}", f"train.out_dir={tmp / 'results'}", *overrides])


def relu_sae(d: int, hook_in: str = RESID, hook_out: str = RESID) -> SparseAutoencoder:
    cfg = SAEConfig(hook_point_in=hook_in, hook_point_out=hook_out, d_model=d, expansion_factor=2,
                    act_fn="relu", norm_activation="inference")
    return SparseAutoencoder(cfg).eval()


@torch.no_grad()
def identity_sae(d: int) -> SparseAutoencoder:
    """relu(x) - relu(-x) = x exactly: W_enc = [I, -I], W_dec = [I; -I], zero biases."""
    sae = relu_sae(d)
    eye = torch.eye(d)
    sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
    sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    sae.b_enc.zero_()
    sae.b_dec.zero_()
    return sae


@torch.no_grad()
def constant_sae(d: int, value: torch.Tensor, **hooks: str) -> SparseAutoencoder:
    """Reconstruction = value whatever the input (W_dec = 0, b_dec = value)."""
    sae = relu_sae(d, **hooks)
    sae.W_dec.zero_()
    sae.b_dec.copy_(value)
    return sae


@pytest.fixture(scope="module")
def lm():
    return load_language_model(load_config(TINY).model)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, lm) -> Path:
    tmp = tmp_path_factory.mktemp("evaluate")
    generate(tiny_config(tmp), lm=lm)
    return tmp


@pytest.fixture(scope="module")
def spliced_run(tiny_store, lm) -> tuple[dict, Path]:
    """evaluate over three hand-built variants: identity, zero, and a mean-predicting transcoder."""
    sweep = ('train.sweep=[{name: identity}, {name: zero}, '
             f'{{name: mean-transcoder, sae.hook_point_out: "{MLP_OUT}"}}]')
    cfg = tiny_config(tiny_store, sweep, "evaluate.lm_eval_sequences=6", "evaluate.lm_eval_batch_size=4")
    root = Path(cfg.train.out_dir)
    mlp_mean = store_moments(StoreReader(cfg.generate.store), MLP_OUT, heldout_chunks=cfg.loader.heldout_chunks,
                             track_covariance=False).mean.float()
    save_sae(identity_sae(D), root / "identity")
    save_sae(constant_sae(D, torch.zeros(D)), root / "zero")
    save_sae(constant_sae(D, mlp_mean, hook_in=RESID, hook_out=MLP_OUT), root / "mean-transcoder")
    return evaluate(cfg, lm=lm), root


def test_identity_sae_recovers_all_of_the_loss(spliced_run):
    metrics = spliced_run[0]["identity"]
    assert metrics["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["explained_variance"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["kl_divergence"] == pytest.approx(0.0, abs=1e-7)
    # the ablations did change the model, so recovering all of it means something
    assert metrics["ce_loss_zero_ablation"] - metrics["ce_loss_clean"] > 1e-3
    assert metrics["lm_eval_source"] == HELDOUT_TEXT
    assert metrics["lm_eval_sequences"] == 6
    assert metrics["lm_eval_tokens"] == 6 * 62  # 63 predictions per window, minus the one from BOS


def test_zero_sae_recovers_none_of_the_loss_when_every_position_is_spliced(spliced_run, tiny_store, lm):
    cfg = tiny_config(tiny_store, "evaluate.lm_eval_sequences=6")
    sequences = heldout_sequences(cfg, lm, StoreReader(cfg.generate.store), 6)
    zero = constant_sae(D, torch.zeros(D))
    mean = torch.zeros(D)
    metrics = lm_metrics(lm, sequences, {"zero": zero}, {RESID: mean}, 4, exclude_special_tokens=False)["zero"]
    assert metrics["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["ce_loss_spliced"] == pytest.approx(metrics["ce_loss_zero_ablation"], abs=1e-9)
    assert metrics["kl_divergence"] > 0 and metrics["lm_eval_exclude_special_tokens"] is False
    default = spliced_run[0]["zero"]  # evaluate's default keeps BOS/EOS/pad clean: not a zero ablation any more
    assert default["fvu"] > 1  # worse than predicting the dataset mean
    assert default["lm_eval_exclude_special_tokens"] is True
    assert default["ce_loss_zero_ablation"] == pytest.approx(metrics["ce_loss_zero_ablation"], rel=1e-9)
    assert abs(default["ce_loss_spliced"] - metrics["ce_loss_spliced"]) > 1e-3


def test_by_default_the_splice_keeps_special_token_positions_clean(spliced_run, tiny_store, lm):
    """evaluate's CE with the zero SAE is that of the model with the hook zeroed everywhere but at
    BOS/EOS/pad positions (SAELens' exclude_special_tokens), computed here without the splice."""
    cfg = tiny_config(tiny_store)
    sequences = heldout_sequences(cfg, lm, StoreReader(cfg.generate.store), 6)
    special = torch.isin(sequences.tokens, torch.tensor([lm.bos_id, lm.eos_id, lm.pad_id]))
    assert special[:, 0].all() and special[:, 1:].any()  # BOS first, EOS between documents

    def zero_but_special(activation, hook):
        return activation * special[..., None]

    with torch.inference_mode():
        logits = lm.model.run_with_hooks(sequences.tokens, return_type="logits", fwd_hooks=[(RESID, zero_but_special)])
    losses, _ = next_token_losses(logits, sequences.tokens)
    expected = float(losses[sequences.loss_mask].double().mean())
    assert spliced_run[0]["zero"]["ce_loss_spliced"] == pytest.approx(expected, rel=1e-6)


def test_transcoder_is_spliced_at_its_output_hook(spliced_run, tiny_store, lm):
    results = spliced_run[0]
    transcoder = results["mean-transcoder"]
    # It predicts the dataset mean of blocks.1.hook_mlp_out: a mean ablation there, once every
    # position is spliced (by default special positions keep their clean activation)
    cfg = tiny_config(tiny_store)
    sequences = heldout_sequences(cfg, lm, StoreReader(cfg.generate.store), 6)
    mean = store_moments(StoreReader(cfg.generate.store), MLP_OUT, heldout_chunks=cfg.loader.heldout_chunks,
                         track_covariance=False).mean.float()
    everywhere = lm_metrics(lm, sequences, {"t": constant_sae(D, mean, hook_in=RESID, hook_out=MLP_OUT)}, {MLP_OUT: mean}, 4,
                            exclude_special_tokens=False)["t"]
    assert everywhere["ce_loss_spliced"] == pytest.approx(everywhere["ce_loss_mean_ablation"], abs=1e-9)
    assert everywhere["ce_loss_recovered_vs_mean_ablation"] == pytest.approx(0.0, abs=1e-6)
    assert everywhere["ce_loss_mean_ablation"] == pytest.approx(transcoder["ce_loss_mean_ablation"], rel=1e-9)
    assert transcoder["ce_loss_spliced"] != pytest.approx(transcoder["ce_loss_mean_ablation"], abs=1e-4)
    assert transcoder["ce_loss_zero_ablation"] != pytest.approx(results["identity"]["ce_loss_zero_ablation"])
    assert transcoder["ce_loss_clean"] == results["identity"]["ce_loss_clean"]


def test_metrics_files_are_written(tiny_store, spliced_run):
    results, root = spliced_run
    assert json.loads((root / METRICS_FILE).read_text()) == results
    cfg = tiny_config(tiny_store)
    heldout_rows = sum(r.rows for r in StoreReader(cfg.generate.store).split_ranges("heldout", cfg.loader.heldout_chunks))
    for name, metrics in results.items():
        histogram = json.loads((root / name / HISTOGRAM_FILE).read_text())
        # evaluate.n_tokens, or the whole held-out split (its chunks minus documents training rows hold)
        assert sum(histogram["l0_histogram"].values()) == metrics["rows"] == min(1024, heldout_rows)


def test_clean_ce_matches_transformer_lens_per_token_loss(tiny_store, lm, spliced_run):
    cfg = tiny_config(tiny_store)
    sequences = heldout_sequences(cfg, lm, StoreReader(cfg.generate.store), 6)
    with torch.inference_mode():
        per_token = lm.model(sequences.tokens, return_type="loss", loss_per_token=True)
    expected = float(per_token[sequences.loss_mask].double().mean())
    assert spliced_run[0]["identity"]["ce_loss_clean"] == pytest.approx(expected, rel=1e-5)


def test_transcoder_splice_reads_its_input_hook(tiny_store, lm):
    """Spliced logits equal a run where hook_point_out gets the transcoder's output on the
    hook_point_in activations of a separate clean pass."""
    cfg = tiny_config(tiny_store)
    tokens = heldout_sequences(cfg, lm, StoreReader(cfg.generate.store), 3).tokens
    transcoder = relu_sae(D, hook_in=RESID, hook_out=MLP_OUT)
    with torch.no_grad():
        transcoder.reset_parameters(torch.Generator().manual_seed(1))
        transcoder.b_dec.copy_(torch.randn(D, generator=torch.Generator().manual_seed(2)))
    with torch.inference_mode():
        inputs = lm.run_hooks(tokens, [RESID])[RESID]
        predicted = transcoder.reconstruct(inputs.reshape(-1, D)).reshape(inputs.shape)
        special = torch.isin(tokens, torch.tensor([lm.bos_id, lm.eos_id, lm.pad_id]))[..., None]  # kept clean

        def replace(activation, hook):
            return torch.where(special, activation, predicted)

        expected = lm.model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(MLP_OUT, replace)])
        with spliced(lm, transcoder):
            spliced_logits = lm.model(tokens, return_type="logits")
        clean = lm.model(tokens, return_type="logits")
    torch.testing.assert_close(spliced_logits, expected, rtol=1e-5, atol=1e-5)
    assert (spliced_logits - clean).abs().max() > 1e-2


def test_heldout_text_starts_after_the_stored_documents(tiny_store, lm):
    cfg = tiny_config(tiny_store)
    reader = StoreReader(cfg.generate.store)
    sequences = heldout_sequences(cfg, lm, reader, 2)
    first = first_unused_document(reader)
    assert sequences.first_doc == first > int(np.max(np.asarray(reader.read_rows("doc", 0, reader.n_rows))))
    text = next(iter_documents(cfg.dataset, start=first))
    stream = lm.encode([text])[0] + [lm.eos_id]
    assert sequences.tokens[0, 0] == lm.bos_id and sequences.role[0, 0] == BOS
    assert sequences.tokens[0, 1:].tolist() == stream[: cfg.generate.context_size - 1]


def test_exhausted_dataset_falls_back_to_heldout_token_rows(tmp_path, lm):
    cfg = tiny_config(tmp_path, "dataset.max_docs=40", "generate.chunk_rows=256", "loader.heldout_chunks=2")
    generate(cfg, lm=lm)
    reader = StoreReader(cfg.generate.store)
    assert reader.n_rows < cfg.generate.target_tokens  # the data ran out
    sequences = heldout_sequences(cfg, lm, reader, 1000)
    assert sequences.source == HELDOUT_STORE_ROWS and sequences.first_doc is None
    # The windows hold exactly the held-out chunks' tokens, minus the documents training rows touch.
    tokens, docs = (np.asarray(reader.read_rows(name, 0, reader.n_rows)) for name in ("tokens", "doc"))
    chunk_of_row = np.arange(reader.n_rows) // reader.chunk_rows
    held = np.isin(chunk_of_row, reader.split_chunks("heldout", 2))
    expected = tokens[held & ~np.isin(docs, docs[~held])].tolist()
    kept = (sequences.role != BOS) & (sequences.role != PAD)
    assert sequences.tokens[kept].tolist() == expected


def test_activation_metrics_match_numpy_and_encoders_skip_lm_metrics(tmp_path):
    d, chunk_rows, heldout_chunks, n_tokens = 8, 64, 2, 100
    rows = random_rows(5 * chunk_rows, d, seed=3)
    store = make_store(tmp_path / "enc.zarr", {RESID: rows}, chunk_rows)
    manifest = read_manifest(store)  # an encoder checkpoint without an LM head, as MiniLM's store says
    manifest["model"] = {"name": "minilm", "has_lm_head": False, "is_causal": False}
    write_manifest(zarr.open_group(str(store), mode="r+"), manifest)
    cfg = load_config(TINY, [f"generate.store={store}", f"train.out_dir={tmp_path / 'out'}",
                             f"loader.heldout_chunks={heldout_chunks}", f"evaluate.n_tokens={n_tokens}",
                             "evaluate.batch_size=32"])
    sae = relu_sae(d)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.reset_parameters(generator)
        sae.b_enc.copy_(torch.randn(2 * d, generator=generator) * 0.5)
        sae.b_enc[0], sae.b_enc[1] = -100.0, 100.0  # one latent never fires, one always does
        sae.b_dec.copy_(torch.randn(d, generator=generator))
    save_sae(sae, tmp_path / "out" / "sae")

    metrics = evaluate(cfg)["sae"]

    x_all = rows.astype(np.float64)
    held = np.isin(np.arange(len(rows)) // chunk_rows, StoreReader(store).split_chunks("heldout", heldout_chunks))
    mean = x_all[~held].mean(0)  # the training split's mean
    x = x_all[held][:n_tokens]
    w_enc, b_enc, w_dec, b_dec = (t.detach().double().numpy() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    z = np.maximum(x @ w_enc + b_enc, 0)
    x_hat = z @ w_dec + b_dec
    error = ((x - x_hat) ** 2).sum()
    fired = (z > 0).mean(0)
    assert metrics["rows"] == n_tokens
    assert metrics["fvu"] == pytest.approx(error / ((x - mean) ** 2).sum(), rel=1e-5)
    assert metrics["mse"] == pytest.approx(error / n_tokens, rel=1e-5)
    assert metrics["l0"] == pytest.approx((z > 0).sum(1).mean(), rel=1e-9)
    assert metrics["dead_latents"] == int((fired == 0).sum()) >= 1
    assert metrics["dense_latents"] == int((fired > 0.1).sum()) >= 1
    assert metrics["dead_fraction_heldout"] == pytest.approx((fired == 0).mean())
    assert metrics["dense_fraction_heldout"] == pytest.approx((fired > 0.1).mean())
    written = json.loads((tmp_path / "out" / METRICS_FILE).read_text())["sae"]  # one dead figure, named for its rows
    assert written["dead_fraction_heldout"] == metrics["dead_fraction_heldout"] and "dead_fraction" not in written
    assert written["dense_fraction_heldout"] == metrics["dense_fraction_heldout"] and "dense_fraction" not in written
    histogram = json.loads((tmp_path / "out" / "sae" / HISTOGRAM_FILE).read_text())["l0_histogram"]
    counts = np.bincount((z > 0).sum(1))
    assert histogram == {str(l0): int(c) for l0, c in enumerate(counts) if c}
    assert "has no language-model head" in metrics["lm_metrics_skipped"]
    assert not any(key.startswith("ce_loss") for key in metrics)


def test_kl_and_ce_match_numpy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)
    other = torch.randn(2, 5, 7, generator=generator)
    tokens = torch.randint(0, 7, (2, 5), generator=generator)
    losses, log_probs = next_token_losses(logits, tokens)
    _, other_log_probs = next_token_losses(other, tokens)

    def log_softmax(values: np.ndarray) -> np.ndarray:
        shifted = values - values.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    p, q = log_softmax(logits.double().numpy()[:, :-1]), log_softmax(other.double().numpy()[:, :-1])
    expected_ce = -np.take_along_axis(p, tokens.numpy()[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(losses.numpy(), expected_ce, rtol=1e-5)
    np.testing.assert_allclose(kl_per_token(log_probs, other_log_probs).numpy(), (np.exp(p) * (p - q)).sum(-1), rtol=1e-5)
    assert torch.equal(kl_per_token(log_probs, log_probs), torch.zeros(2, 4))  # identical logits: exactly 0
