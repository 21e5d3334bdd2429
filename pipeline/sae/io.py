"""Saving, loading and exporting SAEs: safetensors + JSON only, never pickle.

saeflow layout (save_sae / load_sae), a directory with
  sae.safetensors : the state dict (W_enc, b_enc, W_dec, b_dec, [W_enc_glu, b_enc_glu],
                    [log_threshold | batchtopk_threshold], norm_factor_in, norm_factor_out)
  config.json     : {"format", "version", "sae": SAEConfig as JSON, "normalization": {...}}
By default the SAE is saved in its inference form (inference_copy): dataset-wise normalization
folded into the weights, so it reads raw activations (config norm_activation="inference"; the
factors it had are recorded), and decoder rows at unit norm (SparseAutoencoder.fold_decoder_norms),
so a latent's value is the norm of its contribution to the raw reconstruction, as in SAELens.

SAELens layout (export_saelens): cfg.json + sae_weights.safetensors with W_enc, W_dec, b_enc,
b_dec and, for jumprelu/batchtopk, threshold; the same inference form, so SAELens' encode,
decode and forward equal load_sae's (tests/sae/test_saelens.py runs SAELens itself).
Architectures as SAELens 6.54 saves them: standard | topk | jumprelu for SAEs (batchtopk as
jumprelu with its threshold per latent, as SAELens saves its own BatchTopK SAEs) and
transcoder | jumprelu_transcoder for transcoders.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError, describe_validation_error
from pipeline.files import write_file_atomically, write_text_atomically
from pipeline.sae.config import SAEConfig
from pipeline.sae.model import SparseAutoencoder
from store.dtypes import dtype_name

FORMAT_NAME = "saeflow.sae"
FORMAT_VERSION = 1
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"
# The SAELens release whose cfg.json schema we write (and test against); SAELens converts
# configs that claim a version before 6.0.
SAELENS_FORMAT_VERSION = "6.54.12"


class SAEFileError(ConfigError):
    """A saved SAE that cannot be read back as the SAE it claims to be: one line naming the file."""


def save_sae(sae: SparseAutoencoder, directory: str | Path, *, fold_normalization: bool = True) -> Path:
    """Write sae.safetensors + config.json into directory (created); returns the directory.
    fold_normalization=False keeps the training-time form (buffers hold the factors, decoder
    rows as trained); True saves inference_copy(sae)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    factors = {"norm_factor_in": float(sae.norm_factor_in), "norm_factor_out": float(sae.norm_factor_out)}
    folded = fold_normalization and sae.cfg.norm_activation == "dataset-wise"
    unit_rows = False
    if fold_normalization:
        sae, unit_rows = inference_copy(sae)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in sae.state_dict().items()}
    config = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "sae": sae.cfg.model_dump(mode="json"),
        "normalization": {"folded": folded, "unit_decoder_rows": unit_rows, **factors},
    }
    write_file_atomically(directory / WEIGHTS_FILE, lambda path: save_file(tensors, str(path)))
    write_text_atomically(directory / CONFIG_FILE, json.dumps(config, indent=2))
    return directory


def load_sae(directory: str | Path, device: str | torch.device | None = None) -> SparseAutoencoder:
    """The SAE saved in directory, in eval mode, on `device` (default: the saved cfg.device, or
    the CPU when that was a GPU this machine lacks)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: {directory} is not a saved saeflow SAE")
    damaged = f"retrain the SAE or restore {directory} from a copy"
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SAEFileError(f"{config_path} is not JSON ({error}); {damaged}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME or config.get("version") != FORMAT_VERSION:
        config = config if isinstance(config, dict) else {}
        raise SAEFileError(
            f"{config_path} is format {config.get('format')!r} v{config.get('version')}; "
            f"this saeflow reads {FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    cfg_data = dict(config.get("sae") or {})
    if device is None and str(cfg_data.get("device", "cpu")).startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    if device is not None:
        cfg_data["device"] = str(device)
    try:
        cfg = SAEConfig.model_validate(cfg_data)
    except ValidationError as error:
        raise SAEFileError(f"{config_path}: {describe_validation_error(error, SAEConfig)}; {damaged}") from None
    sae = SparseAutoencoder(cfg)
    try:
        tensors = load_file(str(weights_path), device=str(sae.W_enc.device))
    except (SafetensorError, OSError) as error:  # never a pickle: anything but safetensors is refused here
        raise SAEFileError(f"{weights_path} is not a readable safetensors file ({error}); {damaged}") from None
    problems = tensor_mismatches(sae.state_dict(), tensors)
    if problems:
        raise SAEFileError(f"{weights_path} does not hold the SAE of {config_path}: {'; '.join(problems[:3])}; {damaged}")
    sae.load_state_dict(tensors, strict=True)
    return sae.eval()


def tensor_mismatches(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    """How tensors read from a file differ from a module's state dict (`expected`): missing or
    unexpected names, other shapes or dtypes ([] = they fit; load_state_dict would cast silently)."""
    problems = [f"{name} is missing" for name in expected if name not in found]
    problems += [f"{name} is not part of it" for name in found if name not in expected]
    for name, want in expected.items():
        got = found.get(name)
        if got is not None and (got.shape != want.shape or got.dtype != want.dtype):
            problems.append(f"{name} is {dtype_name(got.dtype)} {tuple(got.shape)}, not {dtype_name(want.dtype)} {tuple(want.shape)}")
    return problems


def export_saelens(sae: SparseAutoencoder, directory: str | Path, *, model_name: str | None = None,
                   provenance: dict | None = None) -> Path:
    """Write the SAELens 6 layout (cfg.json + sae_weights.safetensors) into directory.
    provenance: SAELens metadata keys known from the store (context_size, prepend_bos,
    dataset_path), merged into cfg.json's metadata."""
    cfg = sae.cfg
    if cfg.use_glu_encoder:
        raise ValueError("SAELens has no GLU encoder; export an SAE trained with use_glu_encoder=False")
    sae, _ = inference_copy(sae)
    normalize = "constant_norm_rescale" if cfg.norm_activation == "token-wise" else "none"
    architecture, extra = _saelens_architecture(cfg)
    if cfg.is_transcoder and normalize != "none":
        raise ValueError("SAELens transcoders do not rescale outputs; export a dataset-wise or inference transcoder")
    with torch.no_grad():
        weights = {
            "W_enc": sae.W_enc,
            "W_dec": sae.W_dec,
            "b_enc": sae.b_enc,
            "b_dec": sae.b_dec,
        }
        if cfg.act.threshold is not None:
            weights["threshold"] = _threshold_on_hidden_pre(sae)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "hook_name": cfg.hook_point_in,
        "model_name": model_name,
        "training_architecture": cfg.act_fn,
        "exported_by": "saeflow",
        **(provenance or {}),
    }
    if cfg.is_transcoder:
        metadata["hook_name_out"] = cfg.hook_point_out
    saelens_cfg = {
        "architecture": architecture,
        "d_in": cfg.d_model,
        "d_sae": cfg.d_sae,
        "dtype": dtype_name(cfg.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": False,  # our encoder reads x, not x - b_dec
        "normalize_activations": normalize,
        # heads of attn.hook_z arrive as (..., n_heads, d_head) in SAELens; we trained on them flattened
        "reshape_activations": "hook_z" if cfg.hook_point_in.endswith("hook_z") else "none",
        "metadata": metadata,
        **extra,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_file_atomically(directory / SAELENS_WEIGHTS_FILE, lambda path: save_file(tensors, str(path)))
    write_text_atomically(directory / SAELENS_CONFIG_FILE, json.dumps(saelens_cfg, indent=2))
    return directory


def _saelens_architecture(cfg: SAEConfig) -> tuple[str, dict]:
    architecture = cfg.act.saelens_architecture
    if cfg.is_transcoder:
        if architecture == "topk":
            raise ValueError("SAELens has no TopK transcoder; export topk SAEs or relu/jumprelu/batchtopk transcoders")
        return ("transcoder" if architecture == "standard" else "jumprelu_transcoder"), {"d_out": cfg.d_model}
    if architecture == "topk":
        # SAELens ranks hidden_pre * ||W_dec row|| and decodes acts / norm: our gate exactly (a
        # no-op on the unit rows of the inference form, as on SAELens' own saved TopK SAEs)
        return "topk", {"k": cfg.top_k, "rescale_acts_by_decoder_norm": cfg.sparsity_include_decoder_norm}
    return architecture, {}


def _threshold_on_hidden_pre(sae: SparseAutoencoder) -> torch.Tensor:
    """SAELens gates hidden_pre itself; ours gates hidden_pre * ||W_dec row|| when
    sparsity_include_decoder_norm, i.e. hidden_pre > threshold / norm."""
    threshold = sae.threshold.detach().clone()
    if sae.cfg.sparsity_include_decoder_norm:
        threshold = threshold / sae.decoder_norms().detach()
    return threshold


def inference_copy(sae: SparseAutoencoder) -> tuple[SparseAutoencoder, bool]:
    """(copy of sae in its inference form, whether its decoder rows are unit-norm): dataset-wise
    normalization folded, then decoder norms folded (fold_decoder_norms; rows already unit to
    rounding are left alone, so saving a loaded SAE again changes nothing). The SAE computes
    the same reconstructions; latents scale by their rows' norms."""
    folded = copy.deepcopy(sae)
    folded.fold_normalization()
    norms = folded.decoder_norms().detach().double()
    norms = norms[norms > 0]  # zero rows stay zero
    if norms.numel() == 0 or float((norms - 1).abs().max()) <= 8 * torch.finfo(folded.W_dec.dtype).eps:
        return folded, True
    return folded, folded.fold_decoder_norms()
