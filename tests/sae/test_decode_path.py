"""The TopK path under topk_decode "auto": timed on the running device near the crossover, kept
once chosen, pinned by a checkpoint, and either path computes the same SAE."""

import time

import pytest
import torch

from pipeline import SAEConfig
from pipeline.sae import decode_path
from pipeline.sae.decode_path import Problem, is_sparse, needs_probe, settle
from pipeline.sae.model import SparseAutoencoder

HOOK = "blocks.0.hook_resid_post"
# d_sae / k = 4: within the CPU crossover's band, and the table says dense (4 < 8)
NEAR = Problem("cpu", "float32", 64, 512, 128, False)
ROWS = 4096  # NEAR at 4096 rows: 2**27 multiply-adds, the smallest problem timed


@pytest.fixture(autouse=True)
def no_choices():
    decode_path.paths.forget()
    yield
    decode_path.paths.forget()


def timed_step(sparse_s: float, dense_s: float, calls: list):
    def step(sparse: bool) -> None:
        calls.append(sparse)
        time.sleep(sparse_s if sparse else dense_s)
    return step


def test_near_the_crossover_the_faster_path_is_timed_once_kept_and_logged(capsys):
    calls = []
    assert not is_sparse(NEAR)  # the table's path before any timing
    settle(NEAR, ROWS, timed_step(0.001, 0.02, calls))
    assert is_sparse(NEAR) and calls.count(True) == calls.count(False) == 1 + decode_path.PROBE_ROUNDS
    assert f"topk decode for {NEAR.key}: sparse" in capsys.readouterr().err
    settle(NEAR, ROWS, timed_step(0.001, 0.02, calls))  # the same problem again: not timed
    assert len(calls) == 2 * (1 + decode_path.PROBE_ROUNDS) and decode_path.paths.all() == {NEAR.key: "sparse"}


def test_the_tables_path_stays_unless_the_other_is_clearly_faster():
    settle(NEAR, ROWS, timed_step(0.0095, 0.01, []))  # sparse 5% faster: within the margin
    assert not is_sparse(NEAR) and decode_path.paths.all() == {NEAR.key: "dense"}


def test_small_problems_and_ratios_far_from_the_crossover_are_not_timed():
    far = Problem("cpu", "float32", 64, 512, 4, False)  # d_sae / k = 128: 16x the crossover
    calls = []
    settle(NEAR, ROWS // 2, timed_step(0.0, 0.0, calls))
    settle(far, ROWS, timed_step(0.0, 0.0, calls))
    assert calls == [] and not is_sparse(NEAR) and is_sparse(far) and decode_path.paths.all() == {}
    # a device type with no measured crossover is timed at any ratio
    assert needs_probe(Problem("cuda", "bfloat16", 64, 512, 4, False), ROWS) and not needs_probe(far, ROWS)


def test_k_is_kept_by_its_power_of_two_class():
    assert Problem("cpu", "float32", 64, 512, 100, False).key == NEAR.key  # 100 and 128: one class
    assert Problem("cpu", "float32", 64, 512, 129, False).key != NEAR.key


def test_every_rank_takes_the_agreed_path_and_a_checkpoints_choice_is_not_timed_again():
    settle(NEAR, ROWS, timed_step(0.001, 0.02, []), agree=lambda mine: "dense")  # rank 0 said otherwise
    assert not is_sparse(NEAR)
    decode_path.paths.forget()
    decode_path.paths.pin({NEAR.key: "sparse"})
    calls = []
    settle(NEAR, ROWS, timed_step(0.0, 0.0, calls))
    assert calls == [] and is_sparse(NEAR)


def test_a_real_sae_times_both_paths_without_touching_its_gradients_and_either_path_agrees(capsys):
    cfg = SAEConfig(hook_point_in=HOOK, hook_point_out=HOOK, d_model=64, expansion_factor=8, act_fn="topk",
                    top_k=128, device="cpu")
    torch.manual_seed(0)
    sae = SparseAutoencoder(cfg)
    x = torch.randn(ROWS, 64)
    sae.settle_decode_path(x)
    assert f"topk decode for {NEAR.key}: " in capsys.readouterr().err
    assert all(p.grad is None for p in sae.parameters())
    chosen = decode_path.paths.all()[NEAR.key]
    assert sae.uses_sparse_path() == (chosen == "sparse")
    x_hat, out = sae(x[:512])
    other_hat, other = sae._forward_on(x[:512], 128, chosen != "sparse")
    assert torch.allclose(x_hat, other_hat, rtol=1e-4, atol=1e-4)
    assert torch.allclose(out.dense_feature_acts(), other.dense_feature_acts(), rtol=1e-4, atol=1e-4)
    pinned = SparseAutoencoder(cfg.model_copy(update={"topk_decode": "dense"}))
    pinned.settle_decode_path(x)  # a path the config names is never timed
    assert not pinned.uses_sparse_path() and "topk decode" not in capsys.readouterr().err
