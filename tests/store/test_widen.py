"""The one-pass gather-and-widen kernel (store/_widen.c) against torch's conversion, and the
loader's batches with it and with the Python gather it replaces."""

from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from store import widen
from store.loader import ActivationLoader
from tests.store_fixtures import make_store, random_rows

HOOK = "blocks.0.hook_resid_post"
needs_kernel = pytest.mark.skipif(widen._widen is None, reason="the compiled kernel was not built in this install")
needs_f16c = pytest.mark.skipif(not widen._F16C, reason="no compiled kernel, or no F16C on this CPU")


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64" and shutil.which("cc")),
                    reason="checks the install on x86-64 Linux with a C compiler")
def test_the_install_built_the_kernel_where_a_compiler_is():
    # The extension is optional, so a failed build would only show as skipped tests below.
    assert widen._widen is not None and widen._F16C


def _float16_with_edge_values(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    source = rng.standard_normal((n, d)).astype(np.float16)
    edges = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 65504, -65504, 2.0**-24, -(2.0**-24), 2.0**-14, 6.1e-5],
                     dtype=np.float16)
    source.reshape(-1)[: len(edges)] = edges  # infinities, NaN, signed zeros, the extremes, subnormals
    return source


@needs_f16c
@pytest.mark.parametrize("d", [768, 13, 3])  # whole 8-wide blocks; blocks and a tail; a tail only
def test_float16_rows_widen_bit_for_bit_as_torch_converts_them(d: int):
    rng = np.random.default_rng(d)
    source = _float16_with_edge_values(rng, 300, d)
    rows = np.concatenate([[0, 1, 2, 3, 299, 0], rng.integers(0, 300, 200)])  # repeats and both ends
    target = torch.empty(len(rows), d)
    assert widen.take_widen(source, rows, target)
    expected = torch.from_numpy(source[rows]).float()
    assert torch.equal(target.view(torch.int32), expected.view(torch.int32))


@needs_kernel
def test_bfloat16_rows_widen_bit_for_bit():
    values = torch.randn(200, 40).to(torch.bfloat16)
    values[0, :3] = torch.tensor([float("inf"), float("nan"), -0.0])
    bits = values.view(torch.int16).numpy().view(np.uint16)  # as a bfloat16 store holds them
    rows = np.random.default_rng(1).permutation(200)
    target = torch.empty(200, 40)
    assert widen.take_widen(bits, rows, target)
    assert torch.equal(target.view(torch.int32), values[torch.from_numpy(rows)].float().view(torch.int32))


@needs_kernel
def test_a_row_out_of_range_is_refused_before_anything_is_written():
    source = random_rows(10, 16).view(np.uint16)  # bfloat16 bits: the kernel needs no F16C for them
    target = torch.full((3, 16), 7.0)
    with pytest.raises(IndexError, match="row 10 is out of range for a source of 10 rows"):
        widen.take_widen(source, np.array([1, 10, 2]), target)
    with pytest.raises(IndexError, match="row -1"):
        widen.take_widen(source, np.array([-1]), target[:1])
    assert torch.equal(target, torch.full((3, 16), 7.0))


def test_what_the_kernel_does_not_take_is_left_to_the_python_gather(monkeypatch: pytest.MonkeyPatch):
    rows = np.array([2, 0])
    source = random_rows(4, 8)
    assert not widen.take_widen(source.astype(np.float32), rows, torch.empty(2, 8))  # nothing to widen
    assert not widen.take_widen(source, rows, torch.empty(2, 8, dtype=torch.float64))
    assert not widen.take_widen(source, rows, torch.empty(8, 2).t())  # not contiguous
    monkeypatch.setenv(widen.PYTHON_GATHER_ENV, "1")
    assert not widen.take_widen(source, rows, torch.empty(2, 8))
    assert "SAEFLOW_PYTHON_GATHER=1" in widen.describe(np.dtype(np.float16))


@pytest.mark.parametrize("store_dtype", [pytest.param("float16", marks=needs_f16c), pytest.param("bfloat16", marks=needs_kernel)])
def test_loader_batches_are_the_same_with_the_kernel_and_the_python_gather(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_dtype: str
):
    values = torch.from_numpy(random_rows(900, 24, seed=5, dtype=np.float32))
    if store_dtype == "float16":
        stored = values.half().numpy()
    else:
        stored = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    path = make_store(tmp_path / f"{store_dtype}.zarr", {HOOK: stored}, 64, store_dtype=store_dtype)

    def batches() -> list[torch.Tensor]:
        loader = ActivationLoader(path, HOOK, batch_size=100, heldout_chunks=1, shuffle_buffer_chunks=3,
                                  num_workers=2, max_rows=1500, seed=2, dtype=torch.float32)
        return [batch[HOOK] for batch in loader]

    assert widen.kernel_in_use(stored.dtype)
    with_kernel = batches()
    monkeypatch.setenv(widen.PYTHON_GATHER_ENV, "1")
    python = batches()
    assert len(with_kernel) == 15 and all(b.dtype == torch.float32 for b in with_kernel)
    assert all(torch.equal(a, b) for a, b in zip(with_kernel, python))
