"""Runs SAEs exported by saeflow through SAELens itself; run by tests/sae/test_saelens.py under the
peers' python (bench/.peers-venv, which has sae_lens but not saeflow), so it imports only sae_lens,
torch and safetensors.

    python saelens_compare.py CASE_DIR [CASE_DIR ...]

Each CASE_DIR holds saelens/ (export_saelens' output) and inputs.safetensors with x (raw input
rows) and latents (saeflow's latents of x). Writes CASE_DIR/outputs.safetensors: encode (SAELens'
latents of x), decode (SAELens' decode of saeflow's latents) and forward (SAELens' forward of x),
plus architecture.json (the SAELens class that loaded it). Tensors in and out: safetensors only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE


@torch.no_grad()
def run_case(case: Path) -> None:
    sae = SAE.load_from_disk(case / "saelens", device="cpu")
    inputs = load_file(str(case / "inputs.safetensors"))
    x, latents = inputs["x"].to(sae.dtype), inputs["latents"].to(sae.dtype)
    encoded = sae.encode(x)  # also sets the per-row factor constant_norm_rescale's decode undoes
    decoded = sae.decode(latents)
    outputs = {"encode": encoded, "decode": decoded, "forward": sae(x)}
    save_file({name: value.contiguous() for name, value in outputs.items()}, str(case / "outputs.safetensors"))
    (case / "architecture.json").write_text(json.dumps({"class": type(sae).__name__, "architecture": sae.cfg.architecture()}))


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        run_case(Path(argument))
