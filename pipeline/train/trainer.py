"""One SAE being trained: its model, optimizer, schedules, dead-latent counters and logs.

The training loop (pipeline/train/stage.py) hands every variant of a sweep the same batches;
each variant keeps its own state here and checkpoints it next to its outputs.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from pipeline.config import ConfigError, ExperimentConfig, recorded_config
from pipeline.distributed import SINGLE, Ranks
from pipeline.files import append_line, remove_temporaries, write_text_atomically
from pipeline.sae import decode_path
from pipeline.sae.encoder_kernel import kernel_choices, pin_kernel_choices
from pipeline.sae.metrics import ReconstructionMetrics
from pipeline.sae.model import SAEOutput, SparseAutoencoder
from pipeline.train.checkpoint import checkpoint_step, damaged, load_checkpoint, read_info, save_checkpoint
from pipeline.train import aux_k_path
from pipeline.train.aux_k import aux_k_loss
from pipeline.train.losses import l1_sparsity, reconstruction_loss, tanh_sparsity
from pipeline.train.run_record import run_changes
from pipeline.train.schedules import annealed_k, lr_multiplier, sparsity_coefficient
from pipeline.train.trackers import numeric_scalars, open_tracker
from store.dtypes import TORCH_DTYPES


class SAETrainer:
    def __init__(self, name: str, cfg: ExperimentConfig, sae: SparseAutoencoder, out_dir: Path,
                 dataset_mean_out: torch.Tensor, total_steps: int, store_identity: str | None = None, *,
                 ranks: Ranks = SINGLE, writes: bool = True):
        """ranks: the data-parallel ranks this SAE trains on (SINGLE: one process); writes: this
        process writes the logs, checkpoints and tracker (rank 0 of data-parallel ranks)."""
        self.name, self.cfg, self.sae, self.out_dir = name, cfg, sae, out_dir
        self.store_identity = store_identity  # of the store it trains on (reader.identity()), kept in checkpoints
        self.ranks, self.writes = ranks, writes
        self.train_cfg = cfg.train
        self.total_steps = total_steps
        self.log_every_steps = log_every_steps(cfg)
        device = sae.W_dec.device
        # fused: one kernel over all parameters (on the CPU 10x faster than the per-tensor loop,
        # ~10 ms a step at d_sae 3072); same Adam, same state dict.
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                          fused=_fused_adam_supported(sae))
        # fp16 autocast: the loss is scaled so that small fp16 gradients do not flush to zero, and
        # the gradients are unscaled before the decoder projection and clipping (bf16 needs none)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.autocast_dtype == "float16")
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=device)
        self.dead_window = cfg.train.dead_window_tokens()
        self.k_aux = cfg.train.aux_k or max(sae.cfg.d_model // 2, 1)  # Gao et al.'s default
        # No host sync in a step on an accelerator (tests/train/test_sync.py): the CPU keeps
        # AuxK's faster data-dependent selection, where a "sync" costs nothing.
        self.sync_free = device.type != "cpu"
        # a timed path choice (TopK decode, AuxK decode) made the same on every rank: rank 0's
        self._agree = ranks.broadcast_json if ranks.distributed else None
        self.step = 0
        self.tokens = 0
        self._clock = time.perf_counter()
        if cfg.train.decoder_norm == "unit":
            sae.fold_decoder_norms(keep_function=False)  # the init norm survives unit-norm training
            sae.decoder_rows_are_unit = True  # train_step renormalizes after every update
        forward = sae
        if ranks.distributed:  # DDP broadcasts rank 0's parameters and buffers, then averages gradients
            # gradients live in DDP's buckets: no copy between the all-reduce and the optimizer. No
            # buffer broadcast before every forward (a blocking collective a step): the norm factors
            # are constant, and BatchTopK's running threshold is rank 0's own either way (the
            # broadcast comes from rank 0; training's forward does not read it; rank 0 saves it)
            forward = torch.nn.parallel.DistributedDataParallel(sae, device_ids=[device.index] if device.type == "cuda" else None,
                                                                gradient_as_bucket_view=True, forward_sync_buffers=False)
        # FVU's denominator uses the dataset mean of the target, in the SAE's normalized space.
        self.dataset_mean = dataset_mean_out.to(device, torch.float32) * sae.norm_factor_out.float()
        self._window = self._new_window()
        # the same module and parameters, traced and compiled on first use (train.compile)
        self.forward = torch.compile(forward) if cfg.train.compile else forward
        self.log_path = out_dir / "train_log.jsonl"
        self.checkpoint_dir = out_dir / "checkpoints"
        self.tracker = None

    def open_tracker(self) -> None:
        """Start train.logger's tracker (after any resume, so it knows the step to continue at)."""
        if not self.writes:
            return
        self.tracker = open_tracker(self.train_cfg.logger, self.out_dir, self.name,
                                    recorded_config(self.cfg), resume_step=self.step)

    def close_tracker(self, heldout_metrics: dict) -> None:
        if self.tracker is not None:
            self.tracker.log(numeric_scalars(heldout_metrics, "heldout/"), self.step)
            self.tracker.close()
            self.tracker = None

    # --- one step -----------------------------------------------------------------------
    def train_step(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        cfg, sae = self.train_cfg, self.sae
        multiplier = lr_multiplier(self.step, self.total_steps, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * multiplier
        x = sae.normalize_input(x_in)
        target = sae.normalize_target(x_out, x_in)
        k = annealed_k(self.step, sae.cfg.top_k, sae.cfg.d_sae, cfg) if sae.cfg.act.uses_top_k else None
        autocast = (
            torch.autocast(x.device.type, dtype=TORCH_DTYPES[cfg.autocast_dtype]) if cfg.autocast_dtype else nullcontext()
        )
        with autocast:
            # once per problem: which TopK path is faster here, timed outside DDP, the same on every rank
            sae.settle_decode_path(x, k, agree=self._agree)
            x_hat, out = self.forward(x, k) if k is not None else self.forward(x)
        x_hat = x_hat.float()
        # one pass over the activations serves dead-latent tracking and logs; every rank's counts
        # are summed while backward and the optimizer run (they are read after the step)
        counts = out.firing_counts()
        fired = self.ranks.all_reduce_sum_async(counts.clone()) if self.ranks.distributed else None
        # TopK's loss is normalized (Gao et al.); the L1/L0 SAEs keep the sum their coefficients fit
        mse, squared_error = reconstruction_loss(target, x_hat, normalized=sae.cfg.act.uses_top_k)
        terms = {"mse_loss": mse}
        terms.update(self._sparsity_terms(out))
        terms.update(self._aux_terms(x, target, x_hat, out))
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # without fp16 autocast: plain backward, step, no-ops
        self.scaler.unscale_(self.optimizer)
        if cfg.decoder_norm == "unit":
            sae.remove_gradient_parallel_to_decoder_directions()
        grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.clip_grad_norm or math.inf)
        self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()
        if cfg.decoder_norm == "unit":
            sae.set_decoder_norm_to_unit_norm()

        rows = x.shape[0] * self.ranks.world
        fired = fired() if fired is not None else counts  # every rank's rows
        self.tokens_since_fired.add_(rows).masked_fill_(fired > 0, 0)
        self.step += 1
        self.tokens += rows
        if sae.cfg.norm_activation == "token-wise":  # per-row factors do not cancel in FVU: raw units
            with torch.no_grad():
                reconstruction = sae.denormalize_output(x_hat.detach(), x_in)
                self._window.add(terms, loss, grad_norm, x_out, out, counts, (x_out - reconstruction).pow(2).sum())
        else:  # one factor for every row cancels: FVU in the normalized space is the raw one
            self._window.add(terms, loss, grad_norm, target, out, counts, squared_error.detach())
        if self.step % self.log_every_steps == 0 or self.step == self.total_steps:  # a short run logs its end too
            self._log(multiplier * cfg.lr, k)

    def _sparsity_terms(self, out) -> dict[str, torch.Tensor]:
        sae, cfg = self.sae, self.train_cfg
        coefficient = sparsity_coefficient(self.step, cfg)
        if sae.cfg.act.sparsity_loss == "l1":
            norms = sae.decoder_norms() if sae.cfg.sparsity_include_decoder_norm else None
            z = out.dense_feature_acts()
            if cfg.sparsity_penalty == "tanh":
                return {"sparsity_loss": coefficient * tanh_sparsity(z, norms, cfg.tanh_stretch)}
            return {"sparsity_loss": coefficient * l1_sparsity(z, norms, nonnegative=True)}  # ReLU outputs
        if sae.cfg.act.sparsity_loss == "l0":
            return {"sparsity_loss": coefficient * sae.l0_pseudo(out.hidden_pre).mean()}
        return {}

    def _aux_terms(self, x, target, x_hat, out) -> dict[str, torch.Tensor]:
        sae, cfg = self.sae, self.train_cfg
        if not sae.cfg.act.uses_top_k or not cfg.aux_k_coefficient:
            return {}
        residual = (target - x_hat).detach()
        # sparse TopK path: hidden_pre has no graph; the dead latents' gradients go to the
        # encoder directly, not through a second dense (d_model x B x d_sae) encoder matmul
        sparse = out.feature_acts is None and not sae.cfg.use_glu_encoder and x.dim() == 2
        encoder = (x, sae.W_enc, sae.b_enc) if sparse else None
        dead = self.dead_mask()
        # near the table's crossover, the first step of each problem times both decodes (outside DDP)
        columns = None if self.sync_free else aux_k_path.choose(
            residual, out.hidden_pre, dead, sae.W_dec, self.k_aux, encoder, self._agree)
        aux = aux_k_loss(residual, out.hidden_pre, dead, sae.W_dec, self.k_aux, encoder, sync_free=self.sync_free,
                         columns=columns)
        return {"aux_k_loss": cfg.aux_k_coefficient * aux}

    def dead_mask(self) -> torch.Tensor:
        """Latents silent for the dead window: the ones AuxK trains and dead_fraction_train_window counts."""
        return self.tokens_since_fired >= self.dead_window

    def _new_window(self) -> _LogWindow:
        return _LogWindow(ReconstructionMetrics(self.dataset_mean, self.sae.cfg.d_sae))

    # --- logging ------------------------------------------------------------------------
    def _log(self, lr: float, k: int | None) -> None:
        self._window.reduce(self.ranks)
        summary = self._window.summary()  # reads the device: the window's steps have finished
        now = time.perf_counter()
        record = {
            "step": self.step,
            "tokens": self.tokens,
            **summary,
            "dead_fraction_train_window": float(self.dead_mask().float().mean()),
            "lr": lr,
            "tokens_per_second": self._window.rows / max(now - self._clock, 1e-9),
        }
        if k is not None:
            record["k"] = k
        self._clock = now
        self._window = self._new_window()
        self.last_record = record
        if not self.writes:
            return
        append_line(self.log_path, json.dumps(record))
        if self.tracker is not None:
            self.tracker.log(numeric_scalars(record, "train/"), self.step)

    # --- checkpoints --------------------------------------------------------------------
    def save(self, loader_cursors: list[dict]) -> Path | None:
        """Checkpoint after this step; loader_cursors: every rank's loader state, by rank."""
        window_info, window_tensors = self._window.state()
        if self.ranks.distributed:  # rank 0 keeps every rank's window; the others resume with an empty one
            keys = sorted(window_tensors)
            *summed, rows = self.ranks.all_reduce_sums([*(window_tensors[key] for key in keys),
                                                        torch.tensor(window_info["rows"], dtype=torch.int64)])
            window_tensors, window_info = dict(zip(keys, summed)), {**window_info, "rows": int(rows)}
        if not self.writes:
            return None
        info = {
            "tokens": self.tokens,
            "loader_cursors": loader_cursors,
            "config": recorded_config(self.cfg),
            "store_identity": self.store_identity,
            "clock": None,
            "grad_scaler": self.scaler.state_dict(),  # {} unless fp16 autocast
            "log_window": window_info,  # the steps since the last log line: a resumed log matches
            "encoder_kernels": kernel_choices(),  # a resume computes with the same kernels: bitwise
            "topk_decode_paths": decode_path.paths.all(),  # and takes the same TopK paths
            "aux_k_paths": aux_k_path.paths.all(),  # and AuxK decodes
        }
        return save_checkpoint(
            self.checkpoint_dir,
            step=self.step,
            model=self.sae,
            optimizer=self.optimizer,
            tensors={"tokens_since_fired": self.tokens_since_fired,
                     **{f"window.{key}": value for key, value in window_tensors.items()}},
            info=info,
        )

    def restore(self, checkpoint: Path) -> dict:
        """Continue from `checkpoint`, refused unless it is of this run (config without
        locations, store identity: run_record.run_changes) and intact; returns the loader cursor."""
        info = read_info(checkpoint)
        changed = run_changes(self.cfg, self.store_identity, info["config"], info.get("store_identity"))
        if changed:
            raise ConfigError(
                f"{self.out_dir} holds a checkpoint of a different config (changed: {', '.join(changed[:6])}); "
                f"choose another train.out_dir, or delete {self.checkpoint_dir} to start over"
            )
        step, batch = checkpoint_step(checkpoint), self.cfg.loader.batch_size
        if info["step"] != step or info["tokens"] != step * batch or not 0 < step < self.total_steps:
            raise damaged(checkpoint, f"it says step {info['step']} and {info['tokens']} tokens; a checkpoint of step "
                                      f"{step} of this run's {self.total_steps} steps has {step * batch} tokens")
        device = self.sae.W_dec.device
        extras = load_checkpoint(checkpoint, info, model=self.sae, optimizer=self.optimizer, device=device,
                                 extras_like={"tokens_since_fired": self.tokens_since_fired})
        self.tokens_since_fired = extras["tokens_since_fired"].to(device)
        if info.get("grad_scaler"):
            self.scaler.load_state_dict(info["grad_scaler"])
        pin_kernel_choices(info.get("encoder_kernels") or {})
        decode_path.paths.pin(info.get("topk_decode_paths") or {})
        aux_k_path.paths.pin(info.get("aux_k_paths") or {})
        if info.get("log_window"):
            window = {key[len("window."):]: value for key, value in extras.items() if key.startswith("window.")}
            if self.ranks.main:
                self._window.restore(info["log_window"], window)
            else:
                self._window.steps = int(info["log_window"]["steps"])
        self.step, self.tokens = step, step * batch
        if self.writes:
            self._truncate_log()
        cursors = info["loader_cursors"]
        if len(cursors) != self.ranks.world:
            raise ConfigError(f"{checkpoint} was saved by {len(cursors)} rank(s); resume it with as many "
                              f"(torchrun --nproc_per_node {len(cursors)}), not {self.ranks.world}")
        return cursors[self.ranks.rank]

    def check_ranks_agree(self) -> None:
        """Data-parallel ranks end with identical weights; anything else is a bug to report."""
        if not self.ranks.distributed:
            return
        digest = [float(p.detach().double().sum()) for p in self.sae.parameters()]
        digests = self.ranks.gather_json(digest)
        if any(other != digests[0] for other in digests):
            raise RuntimeError(f"{self.name}: the data-parallel ranks ended with different weights")

    def remove_interrupted_writes(self) -> None:
        """Temp files and folders of saves a kill interrupted (train runs one writer per folder)."""
        for folder in (self.out_dir, self.checkpoint_dir, self.out_dir / "saelens", self.out_dir / "plots"):
            if folder.is_dir():
                remove_temporaries(folder)

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint, and a last line a crash tore mid-append,
        so a resumed log reads as one run."""
        if not self.log_path.is_file():
            return
        kept = [line for line in self.log_path.read_text(errors="replace").splitlines()
                if (step := _logged_step(line)) is not None and step <= self.step]
        write_text_atomically(self.log_path, "".join(line + "\n" for line in kept))


def log_every_steps(cfg: ExperimentConfig) -> int:
    """Steps between log lines: train.log_every_tokens in whole batches, else train.log_every_steps."""
    tokens = cfg.train.log_every_tokens
    return max(tokens // cfg.loader.batch_size, 1) if tokens else cfg.train.log_every_steps


def _logged_step(line: str) -> int | None:
    """The step of a train_log.jsonl line; None for a line that is not a whole record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class _LogWindow:
    """The steps since the last log line: loss terms and gradient norms summed as device
    tensors, reconstruction metrics in the one accumulator; nothing is read back until summary()."""

    def __init__(self, metrics: ReconstructionMetrics):
        self.metrics = metrics
        self.steps = 0
        self.sums: dict[str, torch.Tensor] = {}

    @property
    def rows(self) -> int:
        return self.metrics.rows

    def add(self, terms, loss, grad_norm, target, out: SAEOutput, counts, squared_error) -> None:
        """counts: (d_sae,) rows of the batch each latent fired on (out.firing_counts());
        squared_error: the batch's sum of ||target - x_hat||^2."""
        with torch.no_grad():
            for key, value in {**terms, "loss": loss, "grad_norm": grad_norm}.items():
                value = value.detach().double()
                self.sums[key] = value if key not in self.sums else self.sums[key] + value
        self.metrics.update(target, squared_error, out, counts)
        self.steps += 1

    def reduce(self, ranks: Ranks) -> None:
        """Combine the window over data-parallel ranks: loss terms are each rank's batch means
        (averaged), the metrics' sums and counts are added."""
        if not ranks.distributed:
            return
        keys = list(self.sums)  # the same terms in the same order on every rank; the log keeps that order

        def sum_with_terms(metric_tensors: list[torch.Tensor]) -> list[torch.Tensor]:  # one collective per dtype
            summed = ranks.all_reduce_sums([*(self.sums[key] for key in keys), *metric_tensors])
            self.sums = {key: value / ranks.world for key, value in zip(keys, summed)}
            return summed[len(keys):]

        self.metrics.combine(sum_with_terms)

    def state(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        """({"steps", "rows"}, tensors) of the window so far, for a checkpoint."""
        rows, metric_tensors = self.metrics.state()
        tensors = {f"sum.{key}": value for key, value in self.sums.items()}
        tensors.update({f"metrics.{key}": value for key, value in metric_tensors.items()})
        return {"steps": self.steps, "rows": rows}, tensors

    def restore(self, info: dict[str, int], tensors: dict[str, torch.Tensor]) -> None:
        device = self.metrics.dataset_mean.device
        self.steps = int(info["steps"])
        self.sums = {key[len("sum."):]: value.to(device) for key, value in tensors.items() if key.startswith("sum.")}
        self.metrics.restore(int(info["rows"]), {key[len("metrics."):]: value for key, value in tensors.items()
                                                 if key.startswith("metrics.")})

    def summary(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        sums = {key: float(value) / steps for key, value in self.sums.items()}
        grad_norm = sums.pop("grad_norm")
        metrics = self.metrics.result()
        return {
            **sums,
            **{key: metrics[key] for key in ("fvu", "explained_variance", "mse", "l0")},
            "grad_norm": grad_norm,
            "dense_fraction_train_window": self.metrics.dense_fraction(),
            "silent_in_window_fraction": self.metrics.silent_fraction(),
        }


def _fused_adam_supported(sae: SparseAutoencoder) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in sae.parameters())
