"""No host sync in a training step, so a GPU never waits on the CPU between steps.

On CUDA the step runs under torch.cuda.set_sync_debug_mode("error"). Everywhere (CI has no GPU)
a TorchDispatchMode watches every aten op of the step, backward included, and fails on the ops
that force a device->host sync: reading a value (.item(), float(), bool()) and ops whose output
shape depends on values (nonzero, masked_select, boolean indexing, bincount, unique). The step
runs with the trainer's accelerator settings (sync_free) on whatever device is here.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import validate_config
from pipeline.sae.initialize import initialize_sae
from pipeline.train.aux_k import aux_k_loss
from pipeline.train.trainer import SAETrainer

HOOK = "blocks.0.hook_resid_post"
aten = torch.ops.aten
SYNCING_OPS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten.is_nonzero.default,
    aten.equal.default, aten.repeat_interleave.Tensor,
}


class SyncGuard(TorchDispatchMode):
    """Records every op of `SYNCING_OPS`, and boolean-mask indexing, that runs inside it."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        masks = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None)
        if func in SYNCING_OPS or masks:
            self.syncs.append(str(func))
        return func(*args, **kwargs)


def trainer_for(act_fn: str, tmp_path, sae: dict | None = None, **train) -> SAETrainer:
    cfg = validate_config({
        "generate": {"store": str(tmp_path / "none.zarr"), "hook_points": [HOOK]},
        "sae": {"hook_point_in": HOOK, "hook_point_out": HOOK, "d_model": 32, "expansion_factor": 8,
                "act_fn": act_fn, "top_k": 4, "device": "cuda" if torch.cuda.is_available() else "cpu", **(sae or {})},
        "initializer": {"n_samples": 512, **({"init_log_jumprelu_threshold_value": -2.0} if act_fn == "jumprelu" else {})},
        "train": {"log_every_steps": 1000, "aux_k": 16, **train},
    })
    x = 3 * torch.randn(512, 32, generator=torch.Generator().manual_seed(0)) + 1  # mean norm ~ 3 sqrt(d)
    model = initialize_sae(cfg.sae, cfg.initializer, x)
    trainer = SAETrainer("sae", cfg, model, tmp_path, x.mean(0).double(), total_steps=100)
    trainer.sync_free = True  # the accelerator path, on any device
    return trainer


@pytest.mark.parametrize("act_fn,train", [
    ("topk", {}),  # sparse TopK path (k * 8 <= d_sae), AuxK on
    ("topk", {"k_anneal_steps": 50}),  # dense path while k is large
    ("batchtopk", {}),
    ("relu", {}),
    ("jumprelu", {}),
])
def test_a_training_step_never_syncs_with_the_host(tmp_path, act_fn, train):
    trainer = trainer_for(act_fn, tmp_path, **train)
    device = trainer.sae.W_dec.device
    batches = [torch.randn(256, 32, generator=torch.Generator().manual_seed(i)).to(device) for i in range(4)]
    trainer.train_step(batches[0], batches[0])  # first step: lazy initializations may read values
    trainer.tokens_since_fired[:40] += 10**6  # planted dead latents: AuxK selects among them
    guard = SyncGuard()
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        with guard:
            for x in batches[1:]:
                trainer.train_step(x, x)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert guard.syncs == [], f"host syncs in a step: {sorted(set(guard.syncs))}"
    assert ("aux_k_loss" in trainer._window.sums) == trainer.sae.cfg.act.uses_top_k  # the AuxK path ran


def test_the_sync_free_aux_loss_equals_the_cpu_one():
    generator = torch.Generator().manual_seed(3)
    residual = torch.randn(64, 16, generator=generator)
    decoder = torch.randn(96, 16, generator=generator)
    for n_dead in (0, 5, 40):  # none, fewer than k_aux, more than k_aux
        dead = torch.zeros(96, dtype=torch.bool)
        dead[torch.randperm(96, generator=generator)[:n_dead]] = True
        grads = []
        for sync_free in (False, True):
            hidden_pre = torch.randn(64, 96, generator=torch.Generator().manual_seed(n_dead), requires_grad=True)
            loss = aux_k_loss(residual, hidden_pre, dead, decoder, k_aux=16, sync_free=sync_free)
            loss.backward() if loss.requires_grad else None
            grads.append((float(loss), hidden_pre.grad))
        (slow, slow_grad), (fast, fast_grad) = grads
        assert fast == pytest.approx(slow, rel=1e-6, abs=1e-9)
        if n_dead:
            assert torch.allclose(fast_grad, slow_grad, atol=1e-7)


def test_a_compiled_step_gives_the_eager_losses(tmp_path):
    """train.compile: torch.compile (inductor, here on the CPU) of the SAE's forward."""
    losses = {}
    for compiled in (False, True):
        trainer = trainer_for("topk", tmp_path / str(compiled), compile=compiled)
        trainer.sync_free = False
        for i in range(3):
            x = torch.randn(256, 32, generator=torch.Generator().manual_seed(i))
            trainer.train_step(x, x)
        losses[compiled] = float(trainer._window.sums["loss"]) / trainer._window.steps
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


@pytest.mark.parametrize("norm_activation", ["dataset-wise", "token-wise"])
def test_the_training_log_fvu_is_the_held_out_fvu_of_the_same_rows(tmp_path, norm_activation):
    from pipeline.sae.metrics import heldout_metrics

    trainer = trainer_for("topk", tmp_path, sae={"norm_activation": norm_activation})
    device = trainer.sae.W_dec.device
    x = (3 * torch.randn(256, 32, generator=torch.Generator().manual_seed(7)) + 1).to(device)
    raw_mean = trainer.dataset_mean.double().cpu() / float(trainer.sae.norm_factor_out)
    expected = heldout_metrics(trainer.sae, [{HOOK: x}], raw_mean).result()["fvu"]  # before the step's update
    trainer.train_step(x, x)
    assert trainer._window.summary()["fvu"] == pytest.approx(expected, rel=1e-4)
