"""Train a TopK SAE with SAELens's own trainer on pre-computed activation rows.

Feeding path: SAELens's `SAETrainer(cfg, sae, data_provider=...)`, where a data provider is any
iterator of activation batches (`sae_lens.training.types.DataProvider`). It is the seam
`LanguageModelSAETrainingRunner.run()` uses (it passes its ActivationsStore, an iterator of the
same kind) and the one SAELens's own `synthetic.training.train_toy_sae` uses. So the step is the
one a user gets: `SAETrainer._train_step` (TopKTrainingSAE forward with its dead-latent mask, MSE
+ AuxK loss, clip_grad_norm 1.0, Adam, lr scheduler). The runner config and SAE config are built
with SAELens's defaults (lr 3e-4 constant, Adam betas 0.9/0.999, no warm-up or decay,
rescale_acts_by_decoder_norm, decoder_init_norm 0.1, aux_loss_coefficient 1, dead window 1000
steps) and turned into the trainer config and SAE exactly as the runner does. The runner's
ActivationsStore (LM forward, mixing buffer) is the only part left out: our rows arrive shuffled.

Usage (in bench/.peers-venv):
  python bench/peers/train_saelens.py --acts X.npy --out DIR --k 32 --expansion 8 \
      --batch-size 4096 --tokens N [--lr L] [--normalize expected_average_only_in]
"""

from __future__ import annotations

import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LoggingConfig,
    SAETrainer,
    TopKTrainingSAEConfig,
    TrainingSAE,
)
from sae_lens.saes.sae import TrainingSAEConfig

from peer_cli import parse_args
from peer_export import exported_reconstruction, fold_input_centering, parity, write_run_json, write_sae
from peer_rows import batch_tensor, load_rows
from step_clock import StepClock

NORMALIZATION_NOTES = {
    "none": "SAELens default normalize_activations='none': trains on raw activations; weights are "
    "already in raw space.",
    "expected_average_only_in": "SAELens scales inputs by sqrt(d)/mean||x|| (estimated by its "
    "ActivationScaler on the first batches of the same rows) and folds the factor into "
    "W_enc, W_dec, b_dec at the end of fit(); exported weights are in raw space.",
}
PARITY_ROWS = 2048


class RowProvider:
    """SAELens DataProvider over our rows: batch i is rows [i*B, (i+1)*B), wrapping."""

    def __init__(self, rows, batch_size: int, clock: StepClock | None = None) -> None:
        self.rows, self.batch_size, self.clock, self.step = rows, batch_size, clock, 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.clock is not None:
            self.clock.tick()
        batch = batch_tensor(self.rows, self.step, self.batch_size)
        self.step += 1
        return batch


def add_saelens_args(parser) -> None:
    parser.add_argument("--normalize", choices=sorted(NORMALIZATION_NOTES), default="none")


def build_runner_config(args, d_in: int) -> LanguageModelSAERunnerConfig:
    """The runner config a user would write; fields not given keep SAELens's defaults."""
    optional = {"lr": args.lr} if args.lr is not None else {}
    return LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(
            d_in=d_in, d_sae=args.expansion * d_in, k=args.k, normalize_activations=args.normalize
        ),
        training_tokens=args.steps * args.batch_size,
        train_batch_size_tokens=args.batch_size,
        device="cpu",
        seed=args.seed,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=None,
        verbose=False,
        **optional,
    )


def export(sae: TrainingSAE, native_dir: Path, out_dir: Path, parity_x: torch.Tensor, k: int) -> dict:
    """Save with SAELens's own inference export, convert it; return how it matches SAELens's forward."""
    sae.save_inference_model(native_dir)
    native = load_file(str(native_dir / "sae_weights.safetensors"))
    inference_sae = SAE.load_from_disk(native_dir)
    assert inference_sae.cfg.normalize_activations == "none", "normalization must be folded"
    assert inference_sae.cfg.apply_b_dec_to_input
    W_enc, W_dec, b_dec = native["W_enc"], native["W_dec"], native["b_dec"]
    b_enc = fold_input_centering(W_enc, native["b_enc"], b_dec)
    write_sae(out_dir, W_enc, b_enc, W_dec, b_dec)
    with torch.no_grad():
        theirs = inference_sae(parity_x).double()
    ours = exported_reconstruction(parity_x, W_enc, b_enc, W_dec, b_dec, k)
    return parity(theirs, ours, parity_x)


def training_facts(args, trainer: SAETrainer, d_in: int) -> dict:
    cfg, sae_cfg = trainer.cfg, trainer.sae.cfg
    return {
        "k": args.k,
        "d_in": d_in,
        "d_sae": sae_cfg.d_sae,
        "lr": cfg.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "acts": str(args.acts),
        "optimizer": f"Adam(betas=({cfg.adam_beta1}, {cfg.adam_beta2})), clip_grad_norm 1.0",
        "lr_schedule": f"{cfg.lr_scheduler_name}, warm-up {cfg.lr_warm_up_steps} steps, "
        f"decay {cfg.lr_decay_steps} steps",
        "aux_loss": f"AuxK x {sae_cfg.aux_loss_coefficient}, k_aux = d_in / 2, "
        f"dead after {cfg.dead_feature_window} steps without firing",
        "normalization": args.normalize,
        "normalization_notes": NORMALIZATION_NOTES[args.normalize],
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], add_saelens_args)
    started = time.perf_counter()
    rows = load_rows(args.acts, args.steps * args.batch_size)
    load_seconds = time.perf_counter() - started
    d_in = rows.shape[1]

    runner_cfg = build_runner_config(args, d_in)
    torch.manual_seed(args.seed)
    # Same construction as LanguageModelSAETrainingRunner.__init__ and .run().
    sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(runner_cfg.get_training_sae_cfg_dict()).to_dict())
    clock = StepClock(args.warmup_steps)
    trainer = SAETrainer(
        cfg=runner_cfg.to_sae_trainer_config(),
        sae=sae,
        data_provider=RowProvider(rows, args.batch_size, clock),
    )
    if args.normalize == "expected_average_only_in":
        # Estimate from a separate pass over the same leading rows, so the training stream still
        # starts at row 0 (fit() keeps a factor that is already set and folds it at the end).
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=d_in,
            data_provider=RowProvider(rows, args.batch_size),
            n_batches_for_norm_estimate=min(trainer.cfg.n_batches_for_norm_estimate, args.steps),
        )
    scaling_factor = trainer.activation_scaler.scaling_factor

    trainer.fit()
    clock.stop()

    parity_x = batch_tensor(rows, 0, min(PARITY_ROWS, len(rows)))
    parity_facts = export(trainer.sae, args.out / "native", args.out, parity_x, args.k)
    timing = clock.summary(args.batch_size)
    write_run_json(
        args.out,
        {
            "tool": "sae-lens",
            "version": version("sae-lens"),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            **timing,
            "load_seconds": load_seconds,
            **training_facts(args, trainer, d_in),
            "scaling_factor": scaling_factor,
            **parity_facts,
            "native_dir": "native (SAELens save_inference_model: sae_weights.safetensors, cfg.json)",
        },
    )
    print(f"sae-lens: {timing['tokens_per_second']:.0f} tokens/s, parity {parity_facts}")

if __name__ == "__main__":
    main()
