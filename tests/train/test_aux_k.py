"""AuxK on the real tiny store: it acts with the default settings, and its loss and gradients
equal a naive dense computation."""

from pathlib import Path

import torch

from pipeline.config import load_config
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
        assert trainer.step == 64 and trainer.dead_window == 16384 // 10  # the default window: a tenth of the run
        assert bool(trainer.dead_mask()[PLANTED].all())  # they never fired: dead after the window
        moved[coefficient] = (trainer.sae.W_dec[PLANTED].detach() - before).norm(dim=-1)
    assert bool((moved["1/32 (default)"] > 1e-3).all()), moved  # every planted row trained by AuxK
    assert bool((moved["0"] < 1e-6).all()), moved  # without AuxK only the renormalization's rounding
