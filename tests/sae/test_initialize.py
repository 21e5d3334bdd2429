"""initialize_sae: the seed's InitializerConfig semantics, measured on synthetic activations."""

import math

import pytest
import torch
import yaml

from pipeline import InitializerConfig, SAEConfig
from pipeline.config import ConfigError, validate_config
from pipeline.sae.initialize import (
    COARSE_STEP,
    FINE_STEPS,
    GRID_SEARCH_ROWS,
    _apply_norm,
    check_against_store,
    covariance,
    grid_search_decoder_norm,
    initialize_sae,
    reconstruction_mse,
    scoring_rows,
)
from pipeline.sae.geometry import geometric_median, principal_components
from store.reader import StoreReader
from store.sampling import sample_rows
from tests.store_fixtures import make_store

D = 32
HOOK = "blocks.0.hook_resid_post"
MLP_OUT = "blocks.0.hook_mlp_out"


def sae_cfg(**overrides) -> SAEConfig:
    fields = dict(hook_point_in=HOOK, hook_point_out=HOOK, d_model=D, expansion_factor=4, act_fn="topk", top_k=4)
    fields.update(overrides)
    return SAEConfig(**fields)


def init_cfg(**overrides) -> InitializerConfig:
    fields = dict(bias_init_method="geometric_median", grid_search_init_norm=True,
                  init_encoder_bias_with_mean_hidden_pre=True)
    fields.update(overrides)
    return InitializerConfig(**fields)


def sparse_activations(n: int = 3000, seed: int = 0, shift: float = 0.0, rank: int | None = None) -> torch.Tensor:
    """Rows made of a few of 64 feature directions (in a rank-`rank` subspace if given), plus a
    constant offset `shift` along a fixed direction and a little noise."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank or D, D, generator=gen)
    features = torch.randn(64, rank or D, generator=gen) @ basis
    features = features / features.norm(dim=-1, keepdim=True)
    coefficients = torch.rand(n, 64, generator=gen) * (torch.rand(n, 64, generator=gen) < 0.06)
    offset = shift * torch.ones(D) / math.sqrt(D)
    noise = 0.0 if rank else 0.01 * torch.randn(n, D, generator=gen)
    return 3 * coefficients @ features + offset + noise


def initial_mse(sae, x) -> float:
    return reconstruction_mse(sae, sae.normalize_input(x), sae.normalize_target(x))


def test_dataset_wise_factor_from_the_sample_gives_mean_norm_sqrt_d():
    x = sparse_activations(shift=20)
    sae = initialize_sae(sae_cfg(), init_cfg(grid_search_init_norm=False), x)
    assert math.isclose(float(sae.normalize_input(x).norm(dim=-1).mean()), math.sqrt(D), rel_tol=1e-4)
    given = initialize_sae(sae_cfg(), init_cfg(grid_search_init_norm=False), x, norm_factor_in=0.25)
    assert float(given.norm_factor_in) == 0.25 and float(given.norm_factor_out) == 0.25


def test_geometric_median_bias_is_the_real_median_and_beats_all_zero_on_shifted_data():
    x = sparse_activations(shift=20)
    x[:150] += 200 * torch.randn(150, D)  # outliers pull the mean, not the median
    init = dict(grid_search_init_norm=False, init_decoder_norm=0.5)
    median_sae = initialize_sae(sae_cfg(), init_cfg(bias_init_method="geometric_median", **init), x)
    mean_sae = initialize_sae(sae_cfg(), init_cfg(bias_init_method="mean", **init), x)
    zero_sae = initialize_sae(sae_cfg(), init_cfg(bias_init_method="all_zero", **init), x)
    normalized = median_sae.normalize_input(x)
    expected = geometric_median(normalized.double()).float()
    assert torch.allclose(median_sae.b_dec, expected, atol=1e-4)
    assert torch.allclose(mean_sae.b_dec, normalized.mean(0), atol=1e-4)
    assert (median_sae.b_dec - mean_sae.b_dec).norm() > 0.1  # lm_saes' "median" was this mean
    assert torch.equal(zero_sae.b_dec, torch.zeros(D))
    bulk = x[150:]
    assert initial_mse(median_sae, bulk) < 0.5 * initial_mse(zero_sae, bulk)


@pytest.mark.parametrize("act_fn", ["topk", "relu", "jumprelu"])
def test_grid_search_lowers_initial_mse_against_the_fixed_default_norm(act_fn):
    x = sparse_activations(shift=5)
    extra = dict(init_log_jumprelu_threshold_value=math.log(0.05)) if act_fn == "jumprelu" else {}
    cfg = sae_cfg(act_fn=act_fn)
    searched = initialize_sae(cfg, init_cfg(**extra), x)
    fixed = initialize_sae(cfg, init_cfg(grid_search_init_norm=False, **extra), x)
    assert torch.allclose(fixed.decoder_norms(), torch.full((cfg.d_sae,), 0.1))
    norms = searched.decoder_norms()
    assert torch.allclose(norms, norms[0].expand_as(norms)) and 0.01 <= float(norms[0]) <= 18
    assert initial_mse(searched, x) < 0.9 * initial_mse(fixed, x)


@pytest.mark.parametrize(("act_fn", "glu", "transcoder"), [
    ("topk", False, False), ("topk", False, True), ("batchtopk", False, False), ("relu", False, False),
    ("relu", True, False), ("topk", True, False),
])
def test_closed_form_norm_is_the_grid_optimum_within_its_resolution(act_fn, glu, transcoder):
    x = sparse_activations(n=6000, shift=5)
    x_out = 3 * sparse_activations(n=6000, seed=1, shift=2) + 0.5 * x if transcoder else None
    cfg = sae_cfg(act_fn=act_fn, use_glu_encoder=glu, hook_point_out=MLP_OUT if transcoder else HOOK)
    said = []
    sae = initialize_sae(cfg, init_cfg(), x, x_out, say=said.append)
    assert any("closed form" in line for line in said) and not any("grid search" in line for line in said)
    norm = float(sae.decoder_norms()[0])
    with torch.no_grad():  # as initialize_sae searches
        grid, closed_mse, grid_mse = _grid_answer(sae, norm, x, x_out)
    # the fine grid around coarse c steps c (r - 1/r) / 20 (r = 1.78), and c <= r * grid
    assert abs(norm - grid) <= 0.5 * COARSE_STEP * grid * (COARSE_STEP - 1 / COARSE_STEP) / (FINE_STEPS - 1)
    assert closed_mse <= grid_mse * (1 + 1e-5)  # the exact optimum


def _grid_answer(sae, norm: float, x, x_out) -> tuple[float, float, float]:
    """(the grid's norm from the SAE's unit weights on the rows initialize_sae scored, the MSE
    there at the SAE's norm, the MSE at the grid's)."""
    directions, unit_encoder, unit_b_enc = sae.W_dec / norm, sae.W_enc / norm, sae.b_enc / norm
    rows = scoring_rows(x.shape[0], seed=0)
    scored_x = sae.normalize_input(x)[rows]
    scored_target = sae.normalize_target(x if x_out is None else x_out, x)[rows]
    grid = grid_search_decoder_norm(sae, directions, unit_encoder, unit_b_enc, scored_x, scored_target)
    _apply_norm(sae, directions, unit_encoder, unit_b_enc, grid)
    grid_mse = reconstruction_mse(sae, scored_x, scored_target)
    _apply_norm(sae, directions, unit_encoder, unit_b_enc, norm)
    return grid, reconstruction_mse(sae, scored_x, scored_target), grid_mse


def test_jumprelu_keeps_the_grid_search():
    said = []
    initialize_sae(sae_cfg(act_fn="jumprelu"), init_cfg(init_log_jumprelu_threshold_value=math.log(0.05)),
                   sparse_activations(), say=said.append)
    assert any("grid search of 34 norms" in line for line in said) and not any("closed form" in line for line in said)


def test_norm_search_scores_random_rows_of_the_whole_sample_not_its_first_chunk(tmp_path):
    """sample_rows concatenates its rows chunk by chunk: in this geometry (as at MiniLM's: ~3.5k
    rows a chunk in a 100k-row sample) the first GRID_SEARCH_ROWS rows come from 3 of 12 chunks."""
    chunk, chunks = 4096, 13  # 12 training chunks and 1 held out
    ids = torch.arange(chunk * chunks, dtype=torch.float32)[:, None].repeat(1, 4).numpy()
    reader = StoreReader(make_store(tmp_path / "ids.zarr", {HOOK: ids}, chunk, store_dtype="float32"))
    sample = sample_rows(reader, HOOK, 4 * GRID_SEARCH_ROWS, seed=0, heldout_chunks=1)

    def chunks_of(rows: torch.Tensor) -> set[int]:
        return {int(row) // chunk for row in rows[:, 0]}

    assert len(chunks_of(sample[:GRID_SEARCH_ROWS])) <= 3  # what the search scored before
    rows = scoring_rows(sample.shape[0], seed=0)
    assert len(rows) == GRID_SEARCH_ROWS == len(set(rows.tolist()))
    assert len(chunks_of(sample[rows])) == 12
    assert torch.equal(rows, scoring_rows(sample.shape[0], seed=0))
    assert not torch.equal(rows, scoring_rows(sample.shape[0], seed=1))
    assert len(scoring_rows(100, seed=0)) == 100  # a smaller sample is scored whole


def test_encoder_starts_as_decoder_transpose_with_centered_pre_activations():
    x = sparse_activations(shift=5)
    sae = initialize_sae(sae_cfg(), init_cfg(), x)
    assert torch.allclose(sae.W_enc, sae.W_dec.t())
    mean_pre = sae.encode_pre(sae.normalize_input(x)).mean(0)
    assert mean_pre.abs().max() < 1e-4 * sae.encode_pre(sae.normalize_input(x)).abs().mean()
    untied = initialize_sae(sae_cfg(), init_cfg(init_encoder_with_decoder_transpose=False), x)
    assert not torch.allclose(untied.W_enc, untied.W_dec.t())
    assert torch.allclose(untied.W_enc.norm(dim=0), untied.decoder_norms(), atol=1e-5)
    uncentered = initialize_sae(sae_cfg(), init_cfg(init_encoder_bias_with_mean_hidden_pre=False), x)
    assert torch.equal(uncentered.b_enc, torch.zeros(uncentered.cfg.d_sae))


def test_glu_encoder_bias_centers_the_gated_pre_activation():
    x = sparse_activations(shift=5)
    sae = initialize_sae(sae_cfg(act_fn="relu", use_glu_encoder=True), init_cfg(), x)
    hidden_pre = sae.encode_pre(sae.normalize_input(x))
    assert torch.isfinite(sae.b_enc).all() and sae.b_enc.abs().sum() > 0
    assert hidden_pre.mean(0).abs().max() < 1e-4 * hidden_pre.abs().mean()


def test_active_subspace_puts_decoder_rows_in_the_principal_span():
    rank = 6
    x = sparse_activations(rank=rank)
    x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    cfg = init_cfg(initialize_W_D_with_active_subspace=True, d_active_subspace=rank)
    sae = initialize_sae(sae_cfg(), cfg, x)
    target = sae.normalize_target(x)
    components, ratio = principal_components(covariance(target), rank)
    assert float(ratio.sum()) > 0.999
    directions = (sae.W_dec / sae.decoder_norms()[:, None]).double()
    residual = directions - (directions @ components.t()) @ components
    assert residual.norm(dim=-1).max() < 1e-5
    plain = initialize_sae(sae_cfg(), init_cfg(), x)
    plain_dirs = (plain.W_dec / plain.decoder_norms()[:, None]).double()
    assert (plain_dirs - (plain_dirs @ components.t()) @ components).norm(dim=-1).mean() > 0.5


def test_transcoder_uses_the_target_space_for_b_dec_and_its_own_norm_factor():
    x_in = sparse_activations(seed=0, shift=3)
    x_out = 7 * sparse_activations(seed=1, shift=30)
    cfg = sae_cfg(act_fn="relu", hook_point_out=MLP_OUT)
    sae = initialize_sae(cfg, init_cfg(init_encoder_with_decoder_transpose=False), x_in, x_out)
    assert float(sae.norm_factor_in) != pytest.approx(float(sae.norm_factor_out))
    target = sae.normalize_target(x_out, x_in)
    assert math.isclose(float(target.norm(dim=-1).mean()), math.sqrt(D), rel_tol=1e-4)
    assert torch.allclose(sae.b_dec, geometric_median(target.double()).float(), atol=1e-4)
    with pytest.raises(ValueError, match="x_out"):
        initialize_sae(cfg, init_cfg(), x_in)


def test_jumprelu_threshold_is_set_and_required():
    x = sparse_activations()
    sae = initialize_sae(sae_cfg(act_fn="jumprelu"), init_cfg(init_log_jumprelu_threshold_value=-2.0), x)
    assert torch.equal(sae.log_threshold, torch.full((sae.cfg.d_sae,), -2.0))
    with pytest.raises(ConfigError, match="init_log_jumprelu_threshold_value"):
        initialize_sae(sae_cfg(act_fn="jumprelu"), init_cfg(), x)


def test_batchtopk_threshold_starts_unset_after_the_grid_search():
    sae = initialize_sae(sae_cfg(act_fn="batchtopk"), init_cfg(), sparse_activations())
    assert float(sae.batchtopk_threshold) == 0.0


def test_same_seed_same_sae():
    x = sparse_activations()
    first, second = (initialize_sae(sae_cfg(), init_cfg(seed=3), x) for _ in range(2))
    third = initialize_sae(sae_cfg(), init_cfg(seed=4), x)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.W_dec, third.W_dec)


# --- config errors ----------------------------------------------------------------------------
def experiment(sae: dict, initializer: dict | None = None) -> dict:
    return {
        "generate": {"hook_points": [HOOK]},
        "sae": {"hook_point_in": HOOK, "hook_point_out": HOOK, "d_model": D, **sae},
        "initializer": initializer or {},
    }


@pytest.mark.parametrize(
    ("sae", "initializer", "message"),
    [
        (dict(expansion_factor=2.5, d_model=33), None, "82.5 is not a positive integer"),
        (dict(act_fn="topk", top_k=200, expansion_factor=4), None, "top_k=200 must be in 1..d_sae=128"),
        (dict(act_fn="jumprelu"), None, "needs initializer.init_log_jumprelu_threshold_value"),
        (dict(), dict(initialize_W_D_with_active_subspace=True), "needs initializer.d_active_subspace"),
        (dict(), dict(initialize_W_D_with_active_subspace=True, d_active_subspace=64), "exceeds sae.d_model=32"),
    ],
)
def test_config_errors_are_one_clear_line(sae, initializer, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate_config(yaml.safe_load(yaml.safe_dump(experiment(sae, initializer))))
    assert "\n" not in str(error.value)


def test_check_against_store():
    check_against_store(sae_cfg(), {HOOK: D})
    check_against_store(sae_cfg(hook_point_out=MLP_OUT), {HOOK: D, MLP_OUT: D})
    with pytest.raises(ConfigError, match=r"hook_point_out='blocks.0.hook_mlp_out' \(transcoder target hook\) is not in the store"):
        check_against_store(sae_cfg(hook_point_out=MLP_OUT), {HOOK: D})
    with pytest.raises(ConfigError, match=r"sae.d_model=32 but the store's 'blocks.0.hook_resid_post' has d=384; set sae.d_model=384"):
        check_against_store(sae_cfg(), {HOOK: 384})
    with pytest.raises(ConfigError, match="hook_point_in"):
        check_against_store(sae_cfg(), {MLP_OUT: D})
