"""Training checkpoints as safetensors + JSON (no pickle): everything a bitwise resume needs.

A checkpoint is a directory `checkpoints/step-<N>/` holding
  state.safetensors : model parameters and buffers ("model.*"), optimizer tensors
                      ("optim.<param index>.<key>"), RNG state, dead-latent counters
  state.json        : optimizer param_groups, step and token counts, loader cursor, extras
It is written to a temp directory and renamed, so a kill mid-save leaves the previous one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.files import build_dir_atomically

_PREFIX = "step-"


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


def saved_steps(directory: Path) -> set[int]:
    """The steps of the complete checkpoints in `directory`."""
    return {int(p.name[len(_PREFIX):]) for p in directory.glob(f"{_PREFIX}*") if (p / "state.json").is_file()}


def load_checkpoint(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore model, optimizer and RNG in place; return (extra tensors, info)."""
    tensors = load_file(str(path / "state.safetensors"), device="cpu")
    info = json.loads((path / "state.json").read_text())
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    optim = {k: v.to(device) if not k.endswith(".step") else v for k, v in tensors.items() if k.startswith("optim.")}
    _restore_optimizer(optimizer, optim, info.pop("param_groups"))
    torch.set_rng_state(tensors["rng.torch"])
    extras = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return extras, info
