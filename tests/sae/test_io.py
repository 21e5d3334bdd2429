"""save_sae / load_sae / export_saelens: exact round trips, folded normalization, SAELens layout."""

import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import SAEConfig
from pipeline.sae.model import SparseAutoencoder
from pipeline.sae.io import SAEFileError, export_saelens, inference_copy, load_sae, save_sae

D = 32
D_SAE = 128
HOOK = "blocks.2.hook_resid_post"


def trained_like_sae(seed: int = 0, **overrides) -> SparseAutoencoder:
    """An SAE with every tensor non-trivial, as after some training."""
    fields = dict(hook_point_in=HOOK, hook_point_out=HOOK, d_model=D, expansion_factor=4, act_fn="topk", top_k=4)
    fields.update(overrides)
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(**fields))
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.1 * torch.randn_like(param))
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
        sae.norm_factor_in.fill_(0.43)
        sae.norm_factor_out.fill_(0.43 if not sae.cfg.is_transcoder else 1.7)
        if sae.cfg.act_fn == "jumprelu":
            sae.log_threshold.fill_(math.log(0.1)).add_(0.1 * torch.randn(D_SAE))
        if sae.cfg.act_fn == "batchtopk":
            sae.batchtopk_threshold.fill_(0.08)
    return sae.eval()


def raw_inputs(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(7)) * 4 + 1


@pytest.mark.parametrize(
    "overrides",
    [
        dict(norm_activation="inference"),
        dict(norm_activation="token-wise", act_fn="jumprelu"),
        dict(norm_activation="inference", act_fn="batchtopk", use_glu_encoder=True),
        dict(norm_activation="inference", act_fn="relu", use_decoder_bias=False, dtype=torch.bfloat16),
    ],
)
def test_round_trip_is_exact(tmp_path, overrides):
    """What is saved is the inference form (unit decoder rows), read back bit for bit; saving a
    loaded SAE again changes nothing."""
    sae = trained_like_sae(**overrides)
    save_sae(sae, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "sae.safetensors"]
    loaded = load_sae(tmp_path / "a")
    assert loaded.cfg == sae.cfg and not loaded.training
    expected, _ = inference_copy(sae)
    saved, restored = expected.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for name in saved:
        assert saved[name].dtype == restored[name].dtype and torch.equal(saved[name], restored[name]), name
    x = raw_inputs()
    assert torch.equal(loaded.reconstruct(x), expected.reconstruct(x))
    before = sae.reconstruct(x).double()  # the same function, up to one rounding per weight
    relative = float((loaded.reconstruct(x).double() - before).norm() / before.norm())
    assert relative < (1e-2 if sae.cfg.dtype == torch.bfloat16 else 1e-6)
    save_sae(loaded, tmp_path / "b")
    again = load_sae(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), again.state_dict().values()))


def test_unfolded_save_keeps_the_training_form(tmp_path):
    sae = trained_like_sae()
    save_sae(sae, tmp_path, fold_normalization=False)
    loaded = load_sae(tmp_path)
    assert loaded.cfg.norm_activation == "dataset-wise" and float(loaded.norm_factor_in) == pytest.approx(0.43)
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize(
    "overrides",
    [dict(act_fn="topk"), dict(act_fn="jumprelu"), dict(act_fn="batchtopk"),
     dict(act_fn="relu", use_glu_encoder=True), dict(act_fn="relu", hook_point_out="blocks.2.hook_mlp_out")],
)
def test_saved_sae_takes_raw_activations(tmp_path, overrides):
    sae = trained_like_sae(dtype=torch.float64, **overrides)
    x = raw_inputs().double()
    expected = sae.reconstruct(x)
    save_sae(sae, tmp_path)
    assert sae.cfg.norm_activation == "dataset-wise"  # the caller's SAE is left as it was
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sae"]["norm_activation"] == "inference" and config["normalization"]["folded"] is True
    assert config["normalization"]["norm_factor_in"] == pytest.approx(0.43)
    loaded = load_sae(tmp_path)
    assert float(loaded.norm_factor_in) == 1.0 and float(loaded.norm_factor_out) == 1.0
    raw_out, _ = loaded(x)  # no normalization step at all
    assert torch.allclose(raw_out, expected, atol=1e-10)


def test_load_rejects_a_directory_without_a_saeflow_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved saeflow SAE"):
        load_sae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="format 'other'"):
        load_sae(tmp_path)


def _edit_weights(directory, edit) -> None:
    tensors = load_file(str(directory / "sae.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "sae.safetensors"))


def _edit_config(directory, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


# A saved SAE damaged or tampered with: load_sae refuses it in one line naming the file (a pickle
# is never unpickled), instead of a SafetensorError, RuntimeError or pydantic traceback.
DAMAGED_SAES = {
    "pickle named sae.safetensors": (
        lambda d: (d / "sae.safetensors").write_bytes(pickle.dumps({"W_enc": [1.0]})),
        r"sae.safetensors is not a readable safetensors file \(Error while deserializing header"),
    "wrong shape": (
        lambda d: _edit_weights(d, lambda t: t.update(W_enc=t["W_enc"][:, :100].contiguous())),
        r"does not hold the SAE of .*config.json: W_enc is float32 \(32, 100\), not float32 \(32, 128\)"),
    "weights cast to int32": (
        lambda d: _edit_weights(d, lambda t: t.update(W_dec=t["W_dec"].to(torch.int32))),
        r"W_dec is int32 \(128, 32\), not float32 \(128, 32\)"),
    "a tensor missing": (lambda d: _edit_weights(d, lambda t: t.pop("b_dec")), "b_dec is missing"),
    "extra key in config.json": (
        lambda d: _edit_config(d, lambda c: c["sae"].update(bogus=1)), r"config.json: unknown config key 'bogus'"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{sae"), r"config.json is not JSON"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_SAES))
def test_load_refuses_a_damaged_sae_in_one_line(tmp_path, case):
    save_sae(trained_like_sae(norm_activation="inference"), tmp_path)
    damage, message = DAMAGED_SAES[case]
    damage(tmp_path)
    with pytest.raises(SAEFileError, match=message) as error:
        load_sae(tmp_path)
    assert "\n" not in str(error.value) and f"restore {tmp_path} from a copy" in str(error.value)


def saelens_forward(cfg: dict, weights: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, reconstruction) by SAELens 6 inference math for the architectures we export
    (apply_b_dec_to_input=False); tests/sae/test_saelens.py checks it against SAELens itself."""
    scale = math.sqrt(cfg["d_in"]) / x.norm(dim=-1, keepdim=True) if cfg["normalize_activations"] == "constant_norm_rescale" else 1.0
    hidden_pre = (x * scale) @ weights["W_enc"] + weights["b_enc"]
    W_dec = weights["W_dec"]
    if cfg["architecture"] in ("standard", "transcoder"):
        acts = hidden_pre.relu()
    elif cfg["architecture"] in ("jumprelu", "jumprelu_transcoder"):
        acts = hidden_pre.relu() * (hidden_pre > weights["threshold"])
    else:  # topk: encode ranks and returns hidden_pre * ||W_dec row||, decode divides by it
        norms = W_dec.norm(dim=-1)
        if cfg["rescale_acts_by_decoder_norm"]:
            hidden_pre = hidden_pre * norms
        top = hidden_pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
        decoded = (acts / norms if cfg["rescale_acts_by_decoder_norm"] else acts) @ W_dec
        return acts, (decoded + weights["b_dec"]) / scale
    return acts, (acts @ W_dec + weights["b_dec"]) / scale


EXPORTS = [
    (dict(act_fn="relu"), "standard"),
    (dict(act_fn="topk"), "topk"),
    (dict(act_fn="topk", sparsity_include_decoder_norm=False), "topk"),
    (dict(act_fn="jumprelu"), "jumprelu"),
    (dict(act_fn="jumprelu", sparsity_include_decoder_norm=False), "jumprelu"),
    (dict(act_fn="batchtopk"), "jumprelu"),
    (dict(act_fn="topk", norm_activation="token-wise"), "topk"),
    (dict(act_fn="relu", hook_point_out="blocks.2.hook_mlp_out"), "transcoder"),
    (dict(act_fn="jumprelu", hook_point_out="blocks.2.hook_mlp_out"), "jumprelu_transcoder"),
]


@pytest.mark.parametrize(("overrides", "architecture"), EXPORTS)
def test_saelens_export_reproduces_our_latents_and_outputs(tmp_path, overrides, architecture):
    """SAELens' formulas on the export give the latents and reconstructions of the saved SAE;
    its decoder rows are unit-norm (the one case that cannot move its norms keeps them: TopK
    ranked by hidden_pre alone, with unequal norms)."""
    sae = trained_like_sae(dtype=torch.float64, **overrides)
    export_saelens(sae, tmp_path / "saelens", model_name="minilm")
    ours = load_sae(save_sae(sae, tmp_path / "saeflow"))
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    weights = load_file(str(tmp_path / "saelens" / "sae_weights.safetensors"))
    assert cfg["architecture"] == architecture
    assert cfg["d_in"] == D and cfg["d_sae"] == D_SAE and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "minilm"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.") and cfg["metadata"]["training_architecture"] == sae.cfg.act_fn
    expected_names = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if "jumprelu" in architecture else set())
    assert set(weights) == expected_names
    assert weights["W_enc"].shape == (D, D_SAE) and weights["W_dec"].shape == (D_SAE, D)
    if sae.cfg.is_transcoder:
        assert cfg["d_out"] == D and cfg["metadata"]["hook_name_out"] == "blocks.2.hook_mlp_out"
    norms = weights["W_dec"].norm(dim=-1)
    if overrides.get("sparsity_include_decoder_norm") is False and sae.cfg.act_fn == "topk":
        assert torch.equal(weights["W_dec"], ours.W_dec) and norms.std() > 0.1
    else:
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.decoder_norms(), norms, rtol=0, atol=0)
    x = raw_inputs().double()
    latents, reconstruction = saelens_forward(cfg, weights, x)
    assert (latents != 0).sum() > 0
    torch.testing.assert_close(latents, ours.encode(x), rtol=0, atol=1e-9)
    torch.testing.assert_close(reconstruction, sae.reconstruct(x), rtol=0, atol=1e-9)
    torch.testing.assert_close(reconstruction, ours.reconstruct(x), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(act_fn="relu", use_glu_encoder=True), "no GLU encoder"),
        (dict(act_fn="topk", hook_point_out="blocks.2.hook_mlp_out"), "no TopK transcoder"),
        (dict(act_fn="relu", hook_point_out="blocks.2.hook_mlp_out", norm_activation="token-wise"), "do not rescale"),
    ],
)
def test_saelens_export_refuses_what_saelens_cannot_run(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        export_saelens(trained_like_sae(**overrides), tmp_path)


def test_an_sae_saved_on_a_gpu_loads_where_there_is_none(tmp_path):
    sae = trained_like_sae(norm_activation="inference")
    save_sae(sae, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["sae"]["device"] = "cuda"
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_sae(tmp_path)
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert loaded.W_enc.device.type == expected_device
    assert torch.equal(load_sae(tmp_path, device="cpu").W_dec, inference_copy(sae)[0].W_dec)
