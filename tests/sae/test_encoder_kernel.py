"""The sparse TopK path's encoder kernel: a timed probe picks it, a broken kernel never wins."""

import pytest
import torch

from pipeline import SAEConfig
from pipeline.sae import encoder_kernel
from pipeline.sae.encoder_kernel import (
    DEFAULT_KERNEL,
    KERNELS,
    PROBE_MIN_MACS,
    force_kernel,
    kernel_for,
    pin_kernel_choices,
    probe,
)
from pipeline.sae.model import SparseAutoencoder
from pipeline.sae.sparse_topk import pre_activations_no_grad

HOOK = "blocks.0.hook_resid_post"


def problem(rows: int, d: int, d_sae: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, d, generator=generator), torch.randn(d, d_sae, generator=generator) / d**0.5,
            torch.randn(d_sae, generator=generator))


def without_bias(x, W, b):  # a wrong kernel: right shape, wrong values
    return x @ W


def missing(x, W, b):  # what a torch without the op does
    raise RuntimeError("no such op")


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_forcing_either_kernel_gives_the_matmul_values_and_the_same_topk(kernel):
    x, W, b = problem(300, 48, 384)
    reference = (x @ W) + b
    with force_kernel(kernel):
        assert kernel_for(x, W, b) == kernel
        values = pre_activations_no_grad(x, W, b)
    assert torch.allclose(values, reference, rtol=1e-5, atol=1e-5)
    cfg = SAEConfig(hook_point_in=HOOK, hook_point_out=HOOK, d_model=48, expansion_factor=8, act_fn="topk", top_k=6,
                    topk_decode="sparse", device="cpu")
    sae = SparseAutoencoder(cfg)
    with force_kernel("matmul"):
        expected_hat, expected = sae(x)
    with force_kernel(kernel):
        x_hat, out = sae(x)
    assert torch.equal(out.top_indices.sort(-1).values, expected.top_indices.sort(-1).values)
    assert torch.allclose(x_hat, expected_hat, rtol=1e-5, atol=1e-5)


def test_the_probe_drops_a_kernel_that_is_missing_or_wrong():
    x, W, b = problem(256, 32, 128)
    for broken in (missing, without_bias):
        choice, timings = probe(x, W, b, {DEFAULT_KERNEL: KERNELS[DEFAULT_KERNEL], "other": broken})
        assert choice == DEFAULT_KERNEL and timings == {}


def test_the_probe_takes_a_correct_kernel_that_is_faster_and_keeps_the_default_otherwise():
    x, W, b = problem(512, 64, 512)
    answer = KERNELS[DEFAULT_KERNEL](x, W, b)

    def instant(x, W, b):  # the right values at no cost
        return answer

    def slow(x, W, b):
        for _ in range(3):
            out = KERNELS[DEFAULT_KERNEL](x, W, b)
        return out

    choice, timings = probe(x, W, b, {DEFAULT_KERNEL: KERNELS[DEFAULT_KERNEL], "instant": instant})
    assert choice == "instant" and timings["instant"] < timings[DEFAULT_KERNEL]
    choice, timings = probe(x, W, b, {DEFAULT_KERNEL: KERNELS[DEFAULT_KERNEL], "slow": slow})
    assert choice == DEFAULT_KERNEL and set(timings) == {DEFAULT_KERNEL, "slow"}


def test_a_large_problem_is_probed_once_per_size_class_and_the_choice_said_in_one_line(capfd):
    x, W, b = problem(1031, 384, 384)  # a shape no other test uses: the cache is per process
    assert x.shape[0] * 384 * 384 >= PROBE_MIN_MACS
    first = kernel_for(x, W, b)
    second = kernel_for(x, W, b)
    shorter = kernel_for(x[:1029], W, b)  # a short last batch: same size class, no second probe
    lines = [line for line in capfd.readouterr().err.splitlines() if "encoder kernel" in line]
    assert first == second == shorter and first in KERNELS
    assert len(lines) == 1 and lines[0].startswith("saeflow: encoder kernel for 2048x384->384 float32: ")
    assert encoder_kernel.kernel_choices()["2048x384->384 float32"] == first
    kernel_for(*problem(2049, 384, 384))  # the next size class is probed on its own
    assert "encoder kernel for 4096x384->384 float32" in capfd.readouterr().err


def test_small_problems_keep_the_default_unprobed_and_pinned_choices_are_checked(capfd):
    x, W, b = problem(257, 16, 64)
    assert kernel_for(x, W, b) == DEFAULT_KERNEL  # too small to time
    assert "encoder kernel" not in capfd.readouterr().err
    key = "512x16->64 float32"
    pin_kernel_choices({key: "onednn"})  # as a checkpoint would; works where oneDNN does
    onednn_works = encoder_kernel.matches_default(KERNELS["onednn"], x, W, b)
    assert kernel_for(x, W, b) == ("onednn" if onednn_works else DEFAULT_KERNEL)
    pin_kernel_choices({key: "no-such-kernel"})
    assert kernel_for(x, W, b) == DEFAULT_KERNEL
    with pytest.raises(ValueError, match="unknown encoder kernel 'fast'"):
        with force_kernel("fast"):
            pass
