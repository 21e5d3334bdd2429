"""The public splice API (pipeline.spliced, pipeline.run_with_latents) with a trained tiny SAE: the
error term leaves the model's output exactly unchanged, the plain splice gives evaluate's CE,
and the latents on new text are the SAE's latents of the hook's activations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import run_with_latents, spliced
from pipeline.config import load_config
from pipeline.evaluate.sequences import heldout_sequences
from pipeline.evaluate.splice import next_token_losses
from pipeline.evaluate.stage import evaluate
from pipeline.generate.lm import load_language_model
from pipeline.generate.stage import generate
from pipeline.sae.io import load_sae
from pipeline.train.stage import train
from store.reader import StoreReader
from tests.evaluate.test_evaluate import MLP_OUT, RESID, TINY, D, relu_sae, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lm):
    tmp = tmp_path_factory.mktemp("splice")
    cfg = tiny_config(tmp, "train.total_tokens=4096")
    generate(cfg, lm=lm)
    train(cfg)
    metrics = evaluate(cfg, lm=lm)["sae"]
    sae = load_sae(Path(cfg.train.out_dir) / "sae")
    tokens = heldout_sequences(cfg, lm, StoreReader(cfg.generate.store), cfg.evaluate.lm_eval_sequences)
    return cfg, sae, metrics, tokens


@pytest.fixture(scope="module")
def lm():
    return load_language_model(load_config(TINY).model)


@torch.no_grad()
def test_the_error_term_reproduces_the_clean_logits_exactly(trained, lm):
    _, sae, _, sequences = trained
    transcoder = relu_sae(D, hook_in=RESID, hook_out=MLP_OUT)
    transcoder.reset_parameters(torch.Generator().manual_seed(1))
    clean = lm.model(sequences.tokens, return_type="logits")
    for module in (sae, transcoder):
        with spliced(lm, module, keep_error=True) as splice:
            kept = lm.model(sequences.tokens, return_type="logits")
        with spliced(lm.model, {module.cfg.hook_point_out: module}):  # the bare TransformerLens model too
            replaced = lm.model(sequences.tokens, return_type="logits")
        assert torch.equal(kept, clean)
        assert (replaced - clean).abs().max() > 1e-3  # the reconstruction is not exact: the term mattered
        assert splice.latents[module.cfg.hook_point_out].shape == (*sequences.tokens.shape, module.cfg.d_sae)
    assert torch.equal(lm.model(sequences.tokens, return_type="logits"), clean)  # hooks gone after the block


@torch.no_grad()
def test_without_the_error_term_it_gives_evaluates_spliced_ce(trained, lm):
    cfg, sae, metrics, sequences = trained
    with spliced(lm, {sae.cfg.hook_point_out: sae}):
        losses, _ = next_token_losses(lm.model(sequences.tokens, return_type="logits"), sequences.tokens)
    mask = sequences.loss_mask
    assert float(losses[mask].double().mean()) == pytest.approx(metrics["ce_loss_spliced"], rel=1e-6)
    assert metrics["ce_loss_spliced"] > metrics["ce_loss_clean"]


def test_run_with_latents_returns_the_latents_of_new_text(trained, lm):
    """The SAE's latents of the hook's activations, 0 at the special tokens ([CLS] ... [SEP] here)
    where the SAE is not applied, unless asked for every position."""
    _, sae, _, _ = trained
    text = "Return the number of items in the container, or raise TypeError."
    logits, latents = run_with_latents(lm, sae, text)
    tokens = lm.model.to_tokens(text)
    special = torch.isin(tokens, torch.tensor([lm.bos_id, lm.eos_id, lm.pad_id]))
    assert special[0, 0] and special[0, -1] and not special[0, 1:-1].any()
    hook = sae.cfg.hook_point_in
    activations = lm.run_hooks(tokens, [hook])[hook]
    with torch.no_grad():
        expected = sae.encode(activations.reshape(-1, sae.cfg.d_model)).reshape(*tokens.shape, -1)
        clean = lm.model(tokens, return_type="logits")
    assert latents[hook].shape == (1, tokens.shape[1], sae.cfg.d_sae)
    torch.testing.assert_close(latents[hook][~special], expected[~special], rtol=1e-5, atol=1e-5)
    assert ((latents[hook][~special] != 0).sum(-1) == sae.cfg.top_k).all()
    assert not latents[hook][special].any()
    assert torch.equal(logits, clean)
    _, everywhere = run_with_latents(lm, sae, tokens, exclude_special_tokens=False)
    torch.testing.assert_close(everywhere[hook], expected, rtol=1e-5, atol=1e-5)
    spliced_logits, _ = run_with_latents(lm, {hook: sae}, tokens, keep_error=False)
    assert (spliced_logits - clean).abs().max() > 1e-3


@torch.no_grad()
def test_special_token_positions_pass_on_their_clean_activation(trained, lm):
    """BOS, EOS and pad positions keep the clean activation (SAELens' exclude_special_tokens);
    every other position gets the reconstruction; exclude_special_tokens=False replaces all."""
    _, sae, _, sequences = trained
    tokens = sequences.tokens[:2].clone()
    tokens[1, -3:] = lm.pad_id  # the held-out windows are packed: add padding by hand
    special = torch.isin(tokens, torch.tensor([lm.bos_id, lm.eos_id, lm.pad_id]))
    assert all((tokens == i).any() for i in (lm.bos_id, lm.eos_id, lm.pad_id))
    hook = sae.cfg.hook_point_out
    clean = lm.run_hooks(tokens, [hook])[hook]
    reconstruction = sae.reconstruct(clean.reshape(-1, sae.cfg.d_model)).reshape(clean.shape)
    passed_on = {}

    def record(activation, hook):
        passed_on["value"] = activation.clone()

    for exclude in (True, False):
        with spliced(lm, sae, exclude_special_tokens=exclude), lm.model.hooks(fwd_hooks=[(hook, record)]):
            lm.model(tokens, return_type="logits")
        value = passed_on["value"]
        if exclude:
            assert torch.equal(value[special], clean[special])
        else:
            torch.testing.assert_close(value[special], reconstruction[special], rtol=1e-5, atol=1e-5)
            assert (value[special] - clean[special]).abs().max() > 1e-2
        torch.testing.assert_close(value[~special], reconstruction[~special], rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_latents_through_the_error_term(trained, lm):
    _, sae, _, sequences = trained
    sae.zero_grad()
    with spliced(lm, sae, keep_error=True) as splice:
        logits = lm.model(sequences.tokens[:1], return_type="logits")
    logits[0, -1].logsumexp(-1).backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    assert splice.latents[sae.cfg.hook_point_out].requires_grad


def test_a_transcoder_keyed_by_its_input_hook_is_refused(lm):
    transcoder = relu_sae(D, hook_in=RESID, hook_out=MLP_OUT)
    with pytest.raises(ValueError, match=f"key it by '{MLP_OUT}'"):
        with spliced(lm, {RESID: transcoder}):
            pass
    with pytest.raises(ValueError, match="has no hook 'blocks.7.hook_resid_post'"):
        with spliced(lm, relu_sae(D, hook_in="blocks.7.hook_resid_post", hook_out="blocks.7.hook_resid_post")):
            pass
