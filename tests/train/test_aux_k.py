"""AuxK on the real tiny store: it acts with the default settings, and its loss and gradients
equal a naive dense computation."""

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.train.aux_k import aux_k_loss
from pipeline.train.stage import build_trainer, open_store
from store.loader import ActivationLoader

REPO = Path(__file__).resolve().parents[2]
PLANTED = torch.arange(0, 256, 32)  # 8 of tiny's 256 latents


def tiny_trainer(store: Path, out_dir: Path, *overrides: str):
    """configs/tiny.yaml's trainer (its AuxK settings the defaults) and its training batches."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"generate.store={store}", f"train.out_dir={out_dir}", *overrides])
    reader = open_store(str(store))
    steps = cfg.train.total_tokens // cfg.loader.batch_size
    trainer = build_trainer("sae", cfg, reader, out_dir, steps)
    hook = cfg.sae.hook_point_in
    loader = ActivationLoader(reader, [hook], batch_size=cfg.loader.batch_size, split="train", seed=cfg.loader.seed,
                              heldout_chunks=cfg.loader.heldout_chunks, dtype=torch.float32,
                              max_rows=steps * cfg.loader.batch_size)
    return trainer, (batch[hook] for batch in loader)


def plant_dead_latents(trainer) -> None:
    """Latents whose pre-activation is a small positive constant: never among a row's top k (they
    never fire), so only AuxK can move their decoder rows (Adam moves nothing without gradient)."""
    with torch.no_grad():
        trainer.sae.W_enc[:, PLANTED] = 0.0
        trainer.sae.b_enc[PLANTED] = 1e-3


def test_planted_dead_latents_get_aux_gradient_in_a_default_run(store, tmp_path):
    moved = {}
    for coefficient in ("1/32 (default)", "0"):
        overrides = [] if coefficient.startswith("1/32") else ["train.aux_k_coefficient=0"]
        trainer, batches = tiny_trainer(store, tmp_path / coefficient[:1], *overrides)
        plant_dead_latents(trainer)
        before = trainer.sae.W_dec[PLANTED].detach().clone()
        for x in batches:
            trainer.train_step(x, x)
        assert trainer.step == 64 and trainer.dead_window == 16384 // 100  # the default window: a hundredth of the run
        assert bool(trainer.dead_mask()[PLANTED].all())  # they never fired: dead after the window
        moved[coefficient] = (trainer.sae.W_dec[PLANTED].detach() - before).norm(dim=-1)
    assert bool((moved["1/32 (default)"] > 1e-3).all()), moved  # every planted row trained by AuxK
    assert bool((moved["0"] < 1e-6).all()), moved  # without AuxK only the renormalization's rounding


def naive_aux_k(x, W_enc, b_enc, W_dec, residual, dead, k_aux):
    """The definition, densely: a (B, d_sae) matrix of each row's k_aux largest dead
    pre-activations (ReLU'd), times W_dec, against the residual."""
    hidden_pre = x @ W_enc + b_enc
    if not bool(dead.any()):
        return hidden_pre.sum() * 0
    top = hidden_pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, int(dead.sum())), dim=1).indices
    latents = torch.zeros_like(hidden_pre).scatter(1, top, hidden_pre.gather(1, top).relu())
    e_hat = latents @ W_dec
    return (residual - e_hat).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()


def aux_k_gradients(loss_of, sae) -> tuple[float, list[torch.Tensor]]:
    params = [sae.W_enc, sae.b_enc, sae.W_dec]
    for p in params:
        p.grad = None
    loss = loss_of()
    if loss.requires_grad:
        loss.backward()
    return float(loss), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("n_dead,k_aux", [(0, 32), (5, 32), (60, 32), (60, 4), (256, 4)])
def test_every_aux_k_path_gives_the_naive_loss_and_gradients(store, tmp_path, n_dead, k_aux):
    """On tiny's rows and initialized SAE: few dead (no top-k needed), more dead than k_aux,
    crowded rows (more positive dead pre-activations than k_aux), every latent dead."""
    trainer, batches = tiny_trainer(store, tmp_path)
    sae, x = trainer.sae, next(batches)
    x = sae.normalize_input(x)
    with torch.no_grad():
        x_hat, out = sae(x)
        residual = x - x_hat
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[torch.randperm(sae.cfg.d_sae, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
    expected, expected_grads = aux_k_gradients(
        lambda: naive_aux_k(x, sae.W_enc, sae.b_enc, sae.W_dec, residual, dead, k_aux), sae)
    encoder = (x, sae.W_enc, sae.b_enc)
    paths = {
        "dead columns, sparse TopK encoder": lambda: aux_k_loss(residual, out.hidden_pre, dead, sae.W_dec, k_aux, encoder,
                                                                columns=True),
        "gathered, sparse TopK encoder": lambda: aux_k_loss(residual, out.hidden_pre, dead, sae.W_dec, k_aux, encoder,
                                                            columns=False),
        "fixed shapes, sparse TopK encoder": lambda: aux_k_loss(residual, out.hidden_pre, dead, sae.W_dec, k_aux, encoder,
                                                                sync_free=True),
        "dead columns, autograd": lambda: aux_k_loss(residual, sae.encode_pre(x), dead, sae.W_dec, k_aux,
                                                     columns=True),
        "gathered, autograd": lambda: aux_k_loss(residual, sae.encode_pre(x), dead, sae.W_dec, k_aux,
                                                 columns=False),
        "fixed shapes, autograd": lambda: aux_k_loss(residual, sae.encode_pre(x), dead, sae.W_dec, k_aux, sync_free=True),
    }
    assert (expected > 0) == (n_dead > 0)
    for name, loss_of in paths.items():
        loss, grads = aux_k_gradients(loss_of, sae)
        assert loss == pytest.approx(expected, abs=1e-5), name
        for grad, want in zip(grads, expected_grads):
            assert torch.allclose(grad, want, atol=1e-5, rtol=1e-4), (name, float((grad - want).abs().max()))
        live = ~dead
        assert float(grads[2][live].abs().sum()) == 0, name  # only dead latents learn from AuxK
