"""SparseAutoencoder: shapes, sparsity, gradients, normalization and the sparse TopK path."""

import math

import pytest
import torch

from pipeline import SAEConfig
from pipeline.sae.model import SparseAutoencoder
from pipeline.sae.sparse_topk import LatentGroups, sparse_decode

D = 32
EXPANSION = 4
D_SAE = D * EXPANSION
K = 4


def make_cfg(**overrides) -> SAEConfig:
    fields = dict(hook_point_in="blocks.0.hook_resid_post", hook_point_out="blocks.0.hook_resid_post",
                  d_model=D, expansion_factor=EXPANSION, act_fn="topk", top_k=K)
    fields.update(overrides)
    return SAEConfig(**fields)


def make_sae(seed: int = 0, **overrides) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(make_cfg(**overrides))
    with torch.no_grad():  # non-trivial biases and decoder norms, so every term is exercised
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    return sae


def test_seed_example_builds_an_sae():
    cfg = SAEConfig(hook_point_in="blocks.6.hook_resid_post", hook_point_out="blocks.6.hook_resid_post",
                    use_glu_encoder=False, d_model=768, expansion_factor=8, act_fn="topk", top_k=64,
                    dtype=torch.float32, device="cpu")
    sae = SparseAutoencoder(cfg)
    assert sae.W_enc.shape == (768, 6144) and sae.W_dec.shape == (6144, 768)
    assert sae.b_enc.shape == (6144,) and sae.b_dec.shape == (768,)
    x_hat, out = sae(torch.randn(3, 768))
    assert x_hat.shape == (3, 768) and (out.l0 <= 64).all()


@pytest.mark.parametrize("act_fn", ["relu", "topk", "batchtopk", "jumprelu"])
def test_shapes_and_sparsity(act_fn):
    sae = make_sae(act_fn=act_fn)
    if act_fn == "jumprelu":
        with torch.no_grad():
            sae.log_threshold.fill_(math.log(0.3))
    x = torch.randn(64, D) * math.sqrt(1)
    x_hat, out = sae(x)
    z = out.dense_feature_acts()
    assert x_hat.shape == (64, D) and z.shape == (64, D_SAE) and out.hidden_pre.shape == (64, D_SAE)
    assert (z >= 0).all()
    l0 = (z != 0).sum(-1)
    assert torch.equal(out.l0, l0.float())
    if act_fn == "relu":
        assert torch.equal(z, out.hidden_pre.relu())
    if act_fn == "topk":
        assert (l0 <= K).all() and l0.float().mean() > K - 1
    if act_fn == "batchtopk":
        assert l0.sum() <= K * 64 and l0.max() > l0.min()  # shared budget: rows differ
    if act_fn == "jumprelu":
        gate = out.hidden_pre * sae.decoder_norms()
        assert torch.equal(z != 0, gate > 0.3)
        assert 0 < l0.float().mean() < D_SAE
    assert torch.allclose(x_hat, z @ sae.W_dec + sae.b_dec, atol=1e-5)


def test_topk_ranks_by_decoder_norm_when_asked():
    sae = make_sae(act_fn="topk", topk_decode="dense")
    x = torch.randn(16, D)
    hidden_pre = sae.encode_pre(x)
    chosen = sae.encode(x) != 0
    expected = (hidden_pre * sae.decoder_norms()).topk(K, dim=-1).indices
    assert torch.equal(chosen, torch.zeros_like(chosen).scatter(-1, expected, True) & (hidden_pre > 0))
    plain = make_sae(act_fn="topk", topk_decode="dense", sparsity_include_decoder_norm=False)
    plain_expected = plain.encode_pre(x).topk(K, dim=-1).indices
    plain_chosen = plain.encode(x) != 0
    assert torch.equal(plain_chosen, torch.zeros_like(plain_chosen).scatter(-1, plain_expected, True) & (plain.encode_pre(x) > 0))


@pytest.mark.parametrize("act_fn", ["topk", "batchtopk", "jumprelu"])
def test_unit_decoder_rows_flag_only_skips_a_multiply_by_one(act_fn):
    sae = make_sae(act_fn=act_fn, topk_decode="dense", jumprelu_window=0.1)
    with torch.no_grad():
        if act_fn == "jumprelu":
            sae.log_threshold.fill_(math.log(0.05))
        if act_fn == "batchtopk":
            sae.batchtopk_threshold.fill_(0.05)
    sae.set_decoder_norm_to_unit_norm()
    x = torch.randn(16, D)
    for training in (True, False):
        sae.train(training)
        sae.decoder_rows_are_unit = False
        reference = sae.encode(x)
        sae.decoder_rows_are_unit = True
        assert torch.equal((sae.encode(x) != 0), (reference != 0))
        assert torch.allclose(sae.encode(x), reference)
    folded = make_sae(act_fn=act_fn, norm_activation="dataset-wise")
    folded.decoder_rows_are_unit = True
    folded.norm_factor_out.fill_(2.0)
    folded.fold_normalization()  # rows shrink by the factor: the flag no longer holds
    assert not folded.decoder_rows_are_unit


def test_transcoder_reads_one_space_and_writes_another():
    sae = make_sae(act_fn="relu", hook_point_out="blocks.0.hook_mlp_out")
    assert sae.cfg.is_transcoder
    with torch.no_grad():
        sae.norm_factor_in.fill_(2.0)
        sae.norm_factor_out.fill_(0.5)
    x_in, x_out = torch.randn(8, D), torch.randn(8, D)
    assert torch.allclose(sae.normalize_input(x_in), 2 * x_in)
    assert torch.allclose(sae.normalize_target(x_out, x_in), 0.5 * x_out)
    x_hat, _ = sae(sae.normalize_input(x_in))
    loss = (x_hat - sae.normalize_target(x_out, x_in)).pow(2).sum()
    loss.backward()
    assert sae.W_enc.grad.abs().sum() > 0 and sae.W_dec.grad.abs().sum() > 0
    assert torch.allclose(sae.reconstruct(x_in), x_hat / 0.5, atol=1e-5)


def test_glu_encoder_gates_and_every_tensor_is_initialized():
    torch.manual_seed(0)
    sae = SparseAutoencoder(make_cfg(act_fn="relu", use_glu_encoder=True))
    assert torch.equal(sae.b_enc_glu, torch.zeros(D_SAE))  # set, not torch.empty garbage
    assert sae.W_enc_glu.abs().max() <= 1 / math.sqrt(D) and sae.W_enc_glu.abs().sum() > 0
    x = torch.randn(16, D)
    expected = (x @ sae.W_enc + sae.b_enc) * torch.sigmoid(x @ sae.W_enc_glu + sae.b_enc_glu)
    assert torch.allclose(sae.encode_pre(x), expected)
    x_hat, _ = sae(x)
    x_hat.pow(2).sum().backward()
    assert sae.W_enc_glu.grad.abs().sum() > 0 and sae.b_enc_glu.grad.abs().sum() > 0


def jumprelu_sae(include_norm: bool) -> SparseAutoencoder:
    sae = make_sae(act_fn="jumprelu", sparsity_include_decoder_norm=include_norm, jumprelu_window=0.1)
    with torch.no_grad():
        sae.log_threshold.zero_()  # threshold 1
        sae.W_dec.copy_(sae.W_dec / sae.decoder_norms()[:, None])
    return sae


@pytest.mark.parametrize("include_norm", [False, True])
def test_jumprelu_threshold_gradient_only_near_the_threshold(include_norm):
    sae = jumprelu_sae(include_norm)
    hidden_pre = torch.full((2, D_SAE), -3.0)
    hidden_pre[:, 0] = 1.02   # above, within window/2 = 0.05
    hidden_pre[:, 1] = 0.97   # below, within the window
    hidden_pre[:, 2] = 1.5    # far above
    hidden_pre[:, 3] = 0.5    # far below
    z = sae.activate(hidden_pre)
    assert torch.equal(z[:, :4] != 0, torch.tensor([[True, False, True, False]] * 2))
    z.sum().backward()
    grad = sae.log_threshold.grad
    # d z / d theta = -(theta / eps) per row in the window; d theta / d log_theta = theta = 1
    assert torch.allclose(grad[:2], torch.tensor([-20.0, -20.0]))
    assert torch.equal(grad[2:], torch.zeros(D_SAE - 2))


def test_jumprelu_l0_pseudo_gradient():
    sae = jumprelu_sae(include_norm=False)
    hidden_pre = torch.full((3, D_SAE), -3.0)
    hidden_pre[:, 0] = 1.01
    hidden_pre[:, 1] = 2.0
    l0 = sae.l0_pseudo(hidden_pre)
    assert torch.equal(l0, torch.full((3,), 2.0))
    l0.sum().backward()
    assert torch.allclose(sae.log_threshold.grad[0], torch.tensor(-3 / 0.1))  # -(1/eps) per row
    assert torch.equal(sae.log_threshold.grad[1:], torch.zeros(D_SAE - 1))


def test_jumprelu_passes_gradient_to_active_pre_activations_only():
    sae = jumprelu_sae(include_norm=True)
    hidden_pre = torch.tensor([[1.5, 0.5] + [-1.0] * (D_SAE - 2)], requires_grad=True)
    sae.activate(hidden_pre).sum().backward()
    assert torch.allclose(hidden_pre.grad[0, :2], torch.tensor([1.0, 0.0]))


def test_batchtopk_keeps_k_times_batch_in_training_and_uses_threshold_in_eval():
    sae = make_sae(act_fn="batchtopk")
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive: the budget is filled exactly
    x = torch.randn(32, D)
    _, out = sae(x)
    assert int((out.feature_acts != 0).sum()) == K * 32
    gate = out.hidden_pre.detach() * sae.decoder_norms().detach()
    assert torch.isclose(sae.batchtopk_threshold, gate[out.feature_acts != 0].min())
    threshold_after_one = sae.batchtopk_threshold.clone()
    sae(torch.randn(32, D))  # a second batch moves the running estimate by momentum 0.01 only
    assert abs(float(sae.batchtopk_threshold - threshold_after_one)) < 0.02 * float(threshold_after_one)

    sae.eval()
    x_eval = torch.randn(32, D)
    _, out_eval = sae(x_eval)
    gate_eval = out_eval.hidden_pre * sae.decoder_norms()
    assert torch.equal(out_eval.feature_acts != 0, gate_eval > sae.batchtopk_threshold)
    before = sae.batchtopk_threshold.clone()
    sae(x_eval)
    assert torch.equal(sae.batchtopk_threshold, before)  # eval never updates it


def sparse_and_dense(glu: bool = False):
    dense = make_sae(act_fn="topk", topk_decode="dense", use_glu_encoder=glu, dtype=torch.float64)
    sparse = make_sae(act_fn="topk", topk_decode="sparse", use_glu_encoder=glu, dtype=torch.float64)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


@pytest.mark.parametrize("glu", [False, True])
def test_sparse_and_dense_topk_agree_in_values_and_gradients(glu):
    dense, sparse = sparse_and_dense(glu)
    assert sparse.uses_sparse_path() and not dense.uses_sparse_path()
    x = torch.randn(64, D, dtype=torch.float64)
    target = torch.randn(64, D, dtype=torch.float64)
    results = []
    for sae in (dense, sparse):
        x_hat, out = sae(x)
        (x_hat - target).pow(2).sum().backward()
        results.append((x_hat, out))
    (dense_hat, dense_out), (sparse_hat, sparse_out) = results
    assert sparse_out.feature_acts is None and sparse_out.top_values.shape == (64, K)
    assert torch.allclose(dense_hat, sparse_hat, atol=1e-12)
    assert torch.allclose(dense_out.dense_feature_acts(), sparse_out.dense_feature_acts(), atol=1e-12)
    assert torch.equal(dense_out.firing_counts().long(), sparse_out.firing_counts().long())
    assert torch.equal(dense_out.l0, sparse_out.l0)
    for name, param in dense.named_parameters():
        other = dict(sparse.named_parameters())[name]
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.allclose(param.grad, other.grad, atol=1e-10), name


def test_sparse_decode_gradients_equal_torchs_embedding_bag_with_latents_no_row_picked():
    """The decoder's W gradient comes from bags grouped by latent (LatentGroups): latents no row
    picked, the last one included, get zero rows, and both gradients equal torch's own backward."""
    torch.manual_seed(0)
    W = torch.randn(D_SAE, D, requires_grad=True)
    indices = torch.randint(0, D_SAE // 2, (48, K))  # the upper half of the latents is never picked
    values = torch.rand(48, K, requires_grad=True)
    grad_out = torch.randn(48, D)
    expected = torch.autograd.grad(torch.nn.functional.embedding_bag(indices, W, mode="sum", per_sample_weights=values),
                                   (values, W), grad_out)
    got = torch.autograd.grad(sparse_decode(values, LatentGroups(indices, D_SAE), W), (values, W), grad_out)
    for want, have in zip(expected, got):
        assert torch.allclose(have, want, atol=1e-5)
    assert float(got[1][D_SAE // 2:].abs().sum()) == 0


def test_sparse_topk_gradient_reaches_the_input_for_chained_models():
    _, sparse = sparse_and_dense()
    dense, _ = sparse_and_dense()
    x = torch.randn(8, D, dtype=torch.float64, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    sparse(x)[0].sum().backward()
    dense(x_dense)[0].sum().backward()
    assert torch.allclose(x.grad, x_dense.grad, atol=1e-10)


def test_auto_decode_picks_sparse_only_for_small_k():
    assert make_sae(act_fn="topk", top_k=4).uses_sparse_path()
    assert not make_sae(act_fn="topk", top_k=64).uses_sparse_path()
    assert not make_sae(act_fn="relu").uses_sparse_path()
    assert make_sae(act_fn="topk", top_k=64).uses_sparse_path(k=8)  # a k schedule switches paths


def test_decoder_norm_helpers():
    sae = make_sae(act_fn="relu", dtype=torch.float64)
    assert not torch.allclose(sae.decoder_norms(), torch.ones(D_SAE, dtype=torch.float64))
    sae.set_decoder_norm_to_unit_norm()
    assert torch.allclose(sae.decoder_norms(), torch.ones(D_SAE, dtype=torch.float64))
    x_hat, _ = sae(torch.randn(16, D, dtype=torch.float64))
    x_hat.pow(2).sum().backward()
    grad_before = sae.W_dec.grad.clone()
    sae.remove_gradient_parallel_to_decoder_directions()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert parallel.abs().max() < 1e-10 and (grad_before * sae.W_dec).sum(-1).abs().max() > 1e-3


def test_folding_decoder_norms_keeps_the_function_or_says_it_cannot():
    x = torch.randn(32, D, dtype=torch.float64)
    relu = make_sae(act_fn="relu", dtype=torch.float64)
    with torch.no_grad():
        relu.W_dec[3].zero_()  # a zero row stays zero and its encoder column is left alone
    column = relu.W_enc[:, 3].clone()
    before = relu(x)[0]
    assert relu.fold_decoder_norms()
    assert torch.allclose(relu(x)[0], before, atol=1e-10)
    norms = relu.decoder_norms()
    assert torch.allclose(norms[torch.arange(D_SAE) != 3], torch.ones(D_SAE - 1, dtype=torch.float64))
    assert norms[3] == 0 and torch.equal(relu.W_enc[:, 3], column)
    topk = make_sae(act_fn="topk", dtype=torch.float64, sparsity_include_decoder_norm=False)  # ranked by hidden_pre alone
    weights = topk.W_dec.clone()
    assert not topk.fold_decoder_norms() and torch.equal(topk.W_dec, weights)
    assert topk.fold_decoder_norms(keep_function=False)  # training's start: rows unit all the same
    assert torch.allclose(topk.decoder_norms(), torch.ones(D_SAE, dtype=torch.float64))


def test_token_wise_normalization_scales_each_row():
    sae = make_sae(act_fn="relu", norm_activation="token-wise")
    x = torch.randn(8, D) * torch.arange(1, 9)[:, None]
    normalized = sae.normalize_input(x)
    assert torch.allclose(normalized.norm(dim=-1), torch.full((8,), math.sqrt(D)), atol=1e-4)
    x_hat, _ = sae(normalized)
    assert torch.allclose(sae.reconstruct(x), x_hat * x.norm(dim=-1, keepdim=True) / math.sqrt(D), atol=1e-4)
    with pytest.raises(ValueError, match="x_in"):
        sae.denormalize_output(x_hat)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(act_fn="relu"),
        dict(act_fn="topk"),
        dict(act_fn="topk", use_glu_encoder=True),
        dict(act_fn="jumprelu"),
        dict(act_fn="jumprelu", sparsity_include_decoder_norm=False),
        dict(act_fn="batchtopk"),
        dict(act_fn="relu", hook_point_out="blocks.0.hook_mlp_out"),
    ],
)
def test_folding_normalization_leaves_raw_outputs_unchanged(overrides):
    sae = make_sae(dtype=torch.float64, **overrides)
    with torch.no_grad():
        sae.norm_factor_in.fill_(0.37)
        sae.norm_factor_out.fill_(0.37 if not sae.cfg.is_transcoder else 2.9)
        if sae.cfg.act_fn == "jumprelu":
            sae.log_threshold.fill_(math.log(0.2))
        if sae.cfg.act_fn == "batchtopk":
            sae.batchtopk_threshold.fill_(0.15)
    sae.eval()
    x = torch.randn(64, D, dtype=torch.float64) * 5
    before = sae.reconstruct(x)
    sae.fold_normalization()
    assert sae.cfg.norm_activation == "inference" and float(sae.norm_factor_in) == 1.0
    assert torch.allclose(sae(x)[0], before, atol=1e-10)
    assert torch.allclose(sae.reconstruct(x), before, atol=1e-10)


@pytest.mark.parametrize("act_fn", ["relu", "topk", "batchtopk", "jumprelu"])
def test_training_step_under_bfloat16_autocast_keeps_float32_gradients(act_fn):
    sae = make_sae(act_fn=act_fn)
    x = torch.randn(64, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, out = sae(x)
    loss = (x_hat.float() - x).pow(2).sum(-1).mean()
    if act_fn == "jumprelu":
        loss = loss + sae.l0_pseudo(out.hidden_pre).mean()
    loss.backward()
    for name, param in sae.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_path_pre_activations_equal_the_matmul_and_carry_no_graph(dtype):
    from pipeline.sae.sparse_topk import pre_activations_no_grad

    torch.manual_seed(0)
    x = torch.randn(64, D, dtype=dtype)
    W = torch.randn(D, D_SAE, dtype=dtype, requires_grad=True)
    b = torch.randn(D_SAE, dtype=dtype, requires_grad=True)
    fast = pre_activations_no_grad(x, W, b)
    assert fast.grad_fn is None and fast.dtype == dtype
    assert torch.allclose(fast, x @ W + b, rtol=1e-5, atol=1e-5)


def test_the_sae_device_defaults_to_auto_and_resolves_once():
    cfg = SAEConfig(hook_point_in="blocks.0.hook_resid_post", hook_point_out="blocks.0.hook_resid_post", d_model=16)
    assert cfg.device == "auto"  # like model.device: generate and train land on the same device
    sae = SparseAutoencoder(cfg)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert sae.W_enc.device.type == expected and sae.cfg.device == expected  # saved as resolved
    assert all(t.device.type == expected for t in [*sae.parameters(), *sae.buffers()])


def test_jumprelu_thresholds_train_in_a_bfloat16_sae():
    cfg = SAEConfig(hook_point_in="blocks.0.hook_resid_post", hook_point_out="blocks.0.hook_resid_post", d_model=32,
                    expansion_factor=4, act_fn="jumprelu", dtype=torch.bfloat16, device="cpu")
    sae = SparseAutoencoder(cfg)
    assert sae.log_threshold.dtype == torch.float32 and sae.W_enc.dtype == torch.bfloat16
    with torch.no_grad():
        sae.log_threshold.fill_(math.log(0.5))
    start = sae.log_threshold.detach().clone()
    optimizer = torch.optim.Adam(sae.parameters(), lr=4e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(256, 32, generator=generator).to(torch.bfloat16)
        x_hat, out = sae(x)
        loss = (x_hat.float() - x.float()).pow(2).sum(-1).mean() + sae.l0_pseudo(out.hidden_pre).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = int((sae.log_threshold.detach() != start).sum())
    assert moved > 0.9 * cfg.d_sae, f"{moved} of {cfg.d_sae} thresholds moved"
