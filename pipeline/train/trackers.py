"""Optional experiment trackers (train.logger: tensorboard | wandb) beside train_log.jsonl.

Neither package is a dependency of saeflow: asking for one that is not installed is a config
error that names the pip command. Every log record of a variant (the JSONL line) goes to the
tracker as scalars at its step; the held-out metrics at the end go under "heldout/".

Resume: TensorBoard purges the events logged after the checkpoint (purge_step), like the
JSONL log is truncated; a wandb run keeps its id in <out_dir>/wandb_run_id and is resumed with
it (wandb ignores steps it has already seen).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pipeline.config import ConfigError

_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'wandb>=0.19.10'"}


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def open_tracker(kind: str, out_dir: Path, name: str, config: dict, resume_step: int) -> Tracker | None:
    """The tracker train.logger asks for, or None for "none". resume_step: the checkpoint's
    step when resuming (0 for a fresh run)."""
    if kind == "none":  # the config allows only none, tensorboard and wandb
        return None
    try:
        if kind == "tensorboard":
            return _TensorBoard(out_dir, resume_step)
        return _Wandb(out_dir, name, config, resume_step)
    except ImportError as error:
        raise ConfigError(
            f"train.logger={kind!r} needs the {kind} package ({error}): run `{_INSTALL[kind]}` "
            "or set train.logger=none"
        ) from None


def numeric_scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The record's int/float entries (bools and strings dropped), keys prefixed."""
    return {f"{prefix}{key}": float(value) for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


class _TensorBoard:
    def __init__(self, out_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard

        # purge_step drops events at or after it: those logged after the checkpoint we resume from
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out_dir: Path, name: str, config: dict, resume_step: int):
        import wandb  # ImportError without wandb

        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else None
        # create_new: a sweep's variants are separate runs that live side by side in one process
        self.run = wandb.init(project="saeflow", name=name, dir=str(out_dir), config=config, id=run_id,
                              resume="allow" if run_id else None, reinit="create_new")
        id_file.write_text(self.run.id)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
