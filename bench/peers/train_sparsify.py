"""Train a TopK SAE with EleutherAI sparsify's own Trainer on pre-computed activation rows.

sparsify's Trainer pulls activations from a forward hook on a Hugging Face model. Rather than
re-implement its step, this adapter runs `sparsify.Trainer.fit()` unmodified on a stand-in
"model" whose hooked module returns our rows: input_ids are row indices, and the module
`rows` maps them to activations (float16 -> float32). Everything else is sparsify's: SparseCoder
init (seeded), b_dec set to the first batch's mean, decoder renormalized to unit norm before each
forward, fvu loss (+ auxk_alpha * AuxK, 0 by default), remove_gradient_parallel_to_decoder_
directions, its optimizer (default: ScheduleFree-wrapped SignSGD, lr 5e-3 / sqrt(d_sae / 2^14)),
and its final save, which stores the ScheduleFree averaged ("eval") weights.

Batches: sparsify counts batch_size in sequences; our B rows per step are sent as B/L sequences
of L consecutive rows, so each step sees rows [i*B, (i+1)*B) in order (L = gcd(B, 256)).

Usage (in bench/.peers-venv):
  python bench/peers/train_sparsify.py --acts X.npy --out DIR --k 32 --expansion 8 \
      --batch-size 4096 --tokens N [--lr L] [--optimizer signum|adam] [--auxk-alpha A] [--dead-feature-threshold T]
"""

from __future__ import annotations

import math
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file
from sparsify import SparseCoder, SparseCoderConfig, Trainer, TrainConfig
from torch import nn

from peer_cli import parse_args
from peer_export import exported_reconstruction, fold_input_centering, parity, write_run_json, write_sae
from peer_rows import batch_tensor, load_rows
from step_clock import StepClock

HOOKPOINT = "rows"
RUN_NAME = "sparsify"
PARITY_ROWS = 2048
NORMALIZATION_NOTES = (
    "sparsify does no input normalization: it trains on raw activations (its fvu loss divides "
    "by the batch's total variance, so the loss is scale-free, but weights live in raw space). "
    "b_dec starts at the first batch's mean; exported weights are in raw space as saved."
)


class RowLookup(nn.Module):
    """The hooked module: row indices in, activations out, shaped (sequences, L, d)."""

    def __init__(self, rows, clock: StepClock) -> None:
        super().__init__()
        self.rows = torch.from_numpy(rows)
        self.clock = clock
        self.training_started = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.training_started:
            self.clock.tick()
        return self.rows[input_ids % len(self.rows)].float()


class RowModel(nn.Module):
    """Just enough of a PreTrainedModel for sparsify.Trainer: base_model, device, dummy_inputs."""

    def __init__(self, lookup: RowLookup) -> None:
        super().__init__()
        self.rows = lookup

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rows(input_ids)


class RowSequences(torch.utils.data.Dataset):
    """Sequence i = row indices [i*L, (i+1)*L); sparsify's DataLoader does not shuffle."""

    def __init__(self, n_sequences: int, seq_len: int) -> None:
        self.n_sequences, self.seq_len = n_sequences, seq_len

    def __len__(self) -> int:
        return self.n_sequences

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.arange(i * self.seq_len, (i + 1) * self.seq_len)}


def add_sparsify_args(parser) -> None:
    parser.add_argument("--optimizer", choices=["signum", "adam"], help="default: sparsify's (signum)")
    parser.add_argument("--auxk-alpha", type=float, help="default: sparsify's (0.0, AuxK off)")
    parser.add_argument("--dead-feature-threshold", type=int,
                        help="tokens without firing before a latent counts as dead (AuxK); default: sparsify's (10M)")


def build_config(args, save_dir: Path, seq_len: int) -> TrainConfig:
    """The TrainConfig a user would write; fields not given keep sparsify's defaults."""
    given = {"lr": args.lr, "optimizer": args.optimizer, "auxk_alpha": args.auxk_alpha,
             "dead_feature_threshold": args.dead_feature_threshold}
    optional = {name: value for name, value in given.items() if value is not None}
    return TrainConfig(
        sae=SparseCoderConfig(expansion_factor=args.expansion, k=args.k),
        batch_size=args.batch_size // seq_len,
        hookpoints=[HOOKPOINT],
        init_seeds=[args.seed],
        log_to_wandb=False,
        save_dir=str(save_dir),
        run_name=RUN_NAME,
        # It saves when (step + 1) % save_every == 0 with step <= steps: only the final save.
        save_every=args.steps + 2,
        **optional,
    )


def export(native_dir: Path, out_dir: Path, parity_x: torch.Tensor, k: int) -> dict:
    """Convert sparsify's saved SparseCoder; return how the export matches sparsify's own forward."""
    native = load_file(str(native_dir / "sae.safetensors"))
    W_enc, W_dec, b_dec = native["encoder.weight"].T, native["W_dec"], native["b_dec"]
    b_enc = fold_input_centering(W_enc, native["encoder.bias"], b_dec)
    write_sae(out_dir, W_enc, b_enc, W_dec, b_dec)
    coder = SparseCoder.load_from_disk(native_dir)
    with torch.no_grad():
        theirs = coder(parity_x).sae_out.double()
    ours = exported_reconstruction(parity_x, W_enc, b_enc, W_dec, b_dec, k)
    return parity(theirs, ours, parity_x)


def training_facts(args, trainer: Trainer, seq_len: int) -> dict:
    cfg, sae = trainer.cfg, trainer.saes[HOOKPOINT]
    optimizer = trainer.optimizers[0]
    base_optimizer = getattr(optimizer, "base", optimizer)  # ScheduleFreeWrapper wraps SignSGD
    group = optimizer.param_groups[0]
    schedule = "none (ScheduleFree)" if cfg.optimizer == "signum" else (
        f"linear warm-up {cfg.lr_warmup_steps} steps, linear decay to 0"
    )
    return {
        "k": args.k,
        "d_in": sae.d_in,
        "d_sae": sae.num_latents,
        "lr": group.get("initial_lr", group["lr"]),  # a scheduler keeps the base lr as initial_lr
        "batch_size": args.batch_size,
        "sequences_per_batch": cfg.batch_size,
        "sequence_length": seq_len,
        "seed": args.seed,
        "acts": str(args.acts),
        "optimizer": f"{cfg.optimizer}: {type(optimizer).__name__}({type(base_optimizer).__name__})",
        "lr_schedule": schedule,
        "loss": f"fvu + {cfg.auxk_alpha} * auxk (dead after {cfg.dead_feature_threshold} tokens)",
        # latents AuxK counts as dead when training ends (whether it had any to work on)
        "dead_latents_at_end": int((trainer.num_tokens_since_fired[HOOKPOINT] > cfg.dead_feature_threshold).sum()),
        "normalization": "none",
        "normalization_notes": NORMALIZATION_NOTES,
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], add_sparsify_args)
    started = time.perf_counter()
    rows = load_rows(args.acts, args.steps * args.batch_size)
    load_seconds = time.perf_counter() - started

    seq_len = math.gcd(args.batch_size, 256)
    clock = StepClock(args.warmup_steps)
    lookup = RowLookup(rows, clock)
    cfg = build_config(args, args.out / "native", seq_len)
    steps_sequences = args.steps * (args.batch_size // seq_len)
    trainer = Trainer(cfg, RowSequences(steps_sequences, seq_len), RowModel(lookup))

    # The final save follows the loop: its start ends the timed region.
    final_save = trainer.save

    def timed_save() -> None:
        clock.stop()
        final_save()

    trainer.save = timed_save
    lookup.training_started = True
    trainer.fit()

    parity_x = batch_tensor(rows, 0, min(PARITY_ROWS, len(rows)))
    parity_facts = export(args.out / "native" / RUN_NAME / HOOKPOINT, args.out, parity_x, args.k)
    timing = clock.summary(args.batch_size)
    write_run_json(
        args.out,
        {
            "tool": "eai-sparsify",
            "version": version("eai-sparsify"),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            **timing,
            "load_seconds": load_seconds,
            **training_facts(args, trainer, seq_len),
            **parity_facts,
            "native_dir": f"native/{RUN_NAME}/{HOOKPOINT} (sparsify save_to_disk: sae.safetensors, cfg.json)",
        },
    )
    print(f"eai-sparsify: {timing['tokens_per_second']:.0f} tokens/s, parity {parity_facts}")

if __name__ == "__main__":
    main()
