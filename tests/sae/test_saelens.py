"""The SAELens export loaded by SAELens itself (sae_lens.SAE.load_from_disk, in the peers' venv
bench/.peers-venv): its encode, decode and forward equal ours for every architecture we export.

sae_lens is not a saeflow dependency; tests/sae/saelens_compare.py runs under the peers' python
in a subprocess, and tensors travel as safetensors both ways. Skipped, saying why, where that
venv has not been built (bench/make_peers_env.sh builds it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.sae.io import export_saelens, load_sae, save_sae
from tests.sae.test_io import raw_inputs, trained_like_sae

REPO = Path(__file__).resolve().parents[2]
PEERS_PY = REPO / "bench" / ".peers-venv" / "bin" / "python"
SCRIPT = Path(__file__).with_name("saelens_compare.py")
MLP_OUT = "blocks.2.hook_mlp_out"

CASES = {  # name: (SAEConfig overrides, the SAELens class that must load it)
    "topk": (dict(act_fn="topk"), "TopKSAE"),
    "topk-token-wise": (dict(act_fn="topk", norm_activation="token-wise"), "TopKSAE"),
    "topk-ranked-by-hidden-pre": (dict(act_fn="topk", sparsity_include_decoder_norm=False), "TopKSAE"),
    "relu": (dict(act_fn="relu"), "StandardSAE"),
    "jumprelu": (dict(act_fn="jumprelu"), "JumpReLUSAE"),
    "batchtopk": (dict(act_fn="batchtopk"), "JumpReLUSAE"),
    "transcoder": (dict(act_fn="relu", hook_point_out=MLP_OUT), "Transcoder"),
    "jumprelu-transcoder": (dict(act_fn="jumprelu", hook_point_out=MLP_OUT), "JumpReLUTranscoder"),
}


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> dict[str, tuple]:
    """{case: (our SAE as load_sae reads it, x, SAELens' outputs, SAELens' class)}, one subprocess."""
    if not PEERS_PY.exists():
        pytest.skip(f"{PEERS_PY} is missing: build the peers' venv with bench/make_peers_env.sh "
                    "to check the SAELens export against sae_lens itself")
    root = tmp_path_factory.mktemp("saelens")
    ours = {}
    for name, (overrides, _) in CASES.items():
        case = root / name
        sae = trained_like_sae(**overrides)
        export_saelens(sae, case / "saelens", model_name="minilm")
        loaded = load_sae(save_sae(sae, case / "saeflow"))
        x = raw_inputs()
        with torch.no_grad():
            latents = loaded.encode(x)
        save_file({"x": x, "latents": latents}, str(case / "inputs.safetensors"))
        ours[name] = (loaded, x)
    run = subprocess.run([str(PEERS_PY), str(SCRIPT), *(str(root / name) for name in CASES)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return {name: (*ours[name], load_file(str(root / name / "outputs.safetensors")),
                   json.loads((root / name / "architecture.json").read_text())["class"]) for name in CASES}


@pytest.mark.parametrize("name", sorted(CASES))
@torch.no_grad()
def test_saelens_reads_the_export_as_our_sae(compared, name):
    sae, x, theirs, loaded_as = compared[name]
    assert loaded_as == CASES[name][1]
    latents = sae.encode(x)
    assert 0 < int((latents != 0).sum(-1).min())  # every row has active latents: the comparison means something
    torch.testing.assert_close(theirs["encode"], latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs["decode"], sae.denormalize_output(sae.decode(latents), x), rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs["forward"], sae.reconstruct(x), rtol=0, atol=1e-5)
