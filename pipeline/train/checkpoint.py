"""Training checkpoints as safetensors + JSON (no pickle): everything a bitwise resume needs.

A checkpoint is a directory `checkpoints/step-<N>/` holding
  state.safetensors : model parameters and buffers ("model.*"), optimizer tensors
                      ("optim.<param index>.<key>"), RNG state, dead-latent counters
  state.json        : optimizer param_groups, step and token counts, loader cursor, extras
It is written to a temp directory and renamed, so a kill mid-save leaves the previous one (and
a temp directory, which the next start removes). A checkpoint is only restored when every
tensor has the shape and dtype of what it restores into.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError
from pipeline.files import build_dir_atomically
from pipeline.sae.io import tensor_mismatches
from store.dtypes import dtype_name

_PREFIX = "step-"
INFO_KEYS = ("step", "tokens", "param_groups", "loader_cursors", "config")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from as it is: one line naming it and what to delete."""


def damaged(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is damaged ({problem}); delete it to resume from the one before, "
                           f"or delete {path.parent} to start over")


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    directory: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    info: dict[str, Any],
    keep: int = 2,
) -> Path:
    optim_tensors, groups = _optimizer_tensors(optimizer)
    all_tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    all_tensors.update(optim_tensors)
    all_tensors["rng.torch"] = torch.get_rng_state()
    all_tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()})

    def build(temp: Path) -> None:
        save_file(all_tensors, str(temp / "state.safetensors"))
        (temp / "state.json").write_text(json.dumps({"step": step, "param_groups": groups, **info}, indent=1))

    final = build_dir_atomically(checkpoint_path(directory, step), build, replace=True)
    for old in sorted(directory.glob(f"{_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"{_PREFIX}{step:09d}"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory is named for."""
    return int(path.name[len(_PREFIX):])


def saved_steps(directory: Path) -> set[int]:
    """The steps of the complete checkpoints in `directory`."""
    return {checkpoint_step(p) for p in directory.glob(f"{_PREFIX}*") if (p / "state.json").is_file()}


def read_info(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json (CheckpointError if it is unreadable or lacks a key)."""
    try:
        info = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(path, f"state.json is unreadable: {error}") from None
    missing = [key for key in INFO_KEYS if key not in info] if isinstance(info, dict) else list(INFO_KEYS)
    if missing:
        raise damaged(path, f"state.json lacks {', '.join(missing)}")
    return info


def load_checkpoint(
    path: Path, info: dict[str, Any], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    extras_like: dict[str, torch.Tensor], device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Restore model, optimizer and RNG in place from the checkpoint whose read_info is `info`;
    return its extra tensors, those named in `extras_like` checked against them."""
    try:
        tensors = load_file(str(path / "state.safetensors"), device="cpu")
    except (SafetensorError, OSError) as error:
        raise damaged(path, f"state.safetensors is unreadable: {error}") from None
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    extras = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    problems = tensor_mismatches(model.state_dict(), weights) + _optimizer_mismatches(optimizer, tensors)
    problems += [problem for problem in tensor_mismatches(extras_like, extras) if "is not part of it" not in problem]
    if "rng.torch" not in tensors:
        problems.append("rng.torch is missing")
    if problems:
        raise damaged(path, "; ".join(problems[:3]))
    model.load_state_dict(weights)
    optim = {k: v.to(device) if not k.endswith(".step") else v for k, v in tensors.items() if k.startswith("optim.")}
    _restore_optimizer(optimizer, optim, info["param_groups"])
    torch.set_rng_state(tensors["rng.torch"])
    return extras


def _optimizer_mismatches(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Optimizer state (exp_avg, ...) whose shape or dtype is not its parameter's."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    problems = []
    for name, value in tensors.items():
        if not name.startswith("optim.") or name.endswith(".step"):
            continue
        index = name.split(".")[1]
        param = params[int(index)] if index.isdigit() and int(index) < len(params) else None
        if param is None:
            problems.append(f"{name} belongs to no parameter")
        elif value.shape != param.shape or value.dtype != param.dtype:
            problems.append(f"{name} is {dtype_name(value.dtype)} {tuple(value.shape)}, "
                            f"not {dtype_name(param.dtype)} {tuple(param.shape)}")
    return problems
