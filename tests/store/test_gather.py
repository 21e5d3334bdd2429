"""The compiled one-pass gather (store/_gather.c) against numpy's gather and torch's conversion,
and the loader's batches with it (from group buffers and straight from the chunk maps) and with
the Python gather it replaces."""

from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from store import gather
from store.loader import ActivationLoader
from tests.store_fixtures import make_store, random_rows

HOOK = "blocks.0.hook_resid_post"
OUT_HOOK = "blocks.0.hook_mlp_out"
needs_kernel = pytest.mark.skipif(gather._gather is None, reason="the compiled kernel was not built in this install")
needs_f16c = pytest.mark.skipif(not gather._F16C, reason="no compiled kernel, or no F16C on this CPU")


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64" and shutil.which("cc")),
                    reason="checks the install on x86-64 Linux with a C compiler")
def test_the_install_built_the_kernel_where_a_compiler_is():
    # The extension is optional, so a failed build would only show as skipped tests below.
    assert gather._gather is not None and gather._F16C


def _float16_with_edge_values(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    source = rng.standard_normal((n, d)).astype(np.float16)
    edges = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 65504, -65504, 2.0**-24, -(2.0**-24), 2.0**-14, 6.1e-5],
                     dtype=np.float16)
    source.reshape(-1)[: len(edges)] = edges  # infinities, NaN, signed zeros, the extremes, subnormals
    return source


@needs_f16c
@pytest.mark.parametrize(("d", "offset"), [
    (768, 0),  # whole 8-wide blocks into 32-byte aligned rows: the streaming stores
    (768, 4),  # the same rows 16 bytes off that alignment: ordinary stores
    (13, 0),  # blocks and a tail
    (3, 0),  # a tail only
])
def test_float16_rows_widen_bit_for_bit_as_torch_converts_them(d: int, offset: int):
    rng = np.random.default_rng(d)
    source = _float16_with_edge_values(rng, 300, d)
    rows = np.concatenate([[0, 1, 2, 3, 299, 0], rng.integers(0, 300, 200)])  # repeats and both ends
    target = torch.empty(len(rows) * d + offset)[offset:].view(len(rows), d)
    assert target.data_ptr() % 32 == (16 if offset else 0)  # torch's CPU buffers are 64-byte aligned
    assert gather.take_widen(source, rows, target)
    expected = torch.from_numpy(source[rows]).float()
    assert torch.equal(target.view(torch.int32), expected.view(torch.int32))


@needs_kernel
@pytest.mark.parametrize(("d", "offset"), [(40, 0), (40, 4), (13, 0)])  # streaming stores; ordinary; a tail
def test_bfloat16_rows_widen_bit_for_bit(d: int, offset: int):
    values = torch.randn(200, d).to(torch.bfloat16)
    values[0, :3] = torch.tensor([float("inf"), float("nan"), -0.0])
    bits = values.view(torch.int16).numpy().view(np.uint16)  # as a bfloat16 store holds them
    rows = np.random.default_rng(1).permutation(200)
    target = torch.empty(200 * d + offset)[offset:].view(200, d)
    assert gather.take_widen(bits, rows, target)
    assert torch.equal(target.view(torch.int32), values[torch.from_numpy(rows)].float().view(torch.int32))


@needs_kernel
def test_a_row_out_of_range_is_refused_before_anything_is_written():
    source = random_rows(10, 16).view(np.uint16)  # bfloat16 bits: the kernel needs no F16C for them
    target = torch.full((3, 16), 7.0)
    with pytest.raises(IndexError, match="row 10 is out of range for a source of 10 rows"):
        gather.take_widen(source, np.array([1, 10, 2]), target)
    with pytest.raises(IndexError, match="row -1"):
        gather.take_widen(source, np.array([-1]), target[:1])
    assert torch.equal(target, torch.full((3, 16), 7.0))


def test_what_the_kernel_does_not_take_is_left_to_the_python_gather(monkeypatch: pytest.MonkeyPatch):
    rows = np.array([2, 0])
    source = random_rows(4, 8)
    assert not gather.take_widen(source.astype(np.float32), rows, torch.empty(2, 8))  # nothing to widen
    assert not gather.take_widen(source, rows, torch.empty(2, 8, dtype=torch.float64))
    assert not gather.take_widen(source, rows, torch.empty(8, 2).t())  # not contiguous
    monkeypatch.setenv(gather.PYTHON_GATHER_ENV, "1")
    assert not gather.take_widen(source, rows, torch.empty(2, 8))
    assert "SAEFLOW_PYTHON_GATHER=1" in gather.describe(np.dtype(np.float16), torch.float32, from_maps=False)
    assert not gather.gathers_from_maps(np.dtype(np.float16), None)


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

    assert gather.kernel_in_use(stored.dtype)
    with_kernel = batches()
    monkeypatch.setenv(gather.PYTHON_GATHER_ENV, "1")
    python = batches()
    assert len(with_kernel) == 15 and all(b.dtype == torch.float32 for b in with_kernel)
    assert all(torch.equal(a, b) for a, b in zip(with_kernel, python))


def _sources(rng: np.random.Generator, sizes: list[int], d: int, dtype: type) -> tuple[np.ndarray, ...]:
    return tuple(rng.standard_normal((n, d)).astype(dtype) for n in sizes)


def _picks(rng: np.random.Generator, sources: tuple[np.ndarray, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
    which = rng.integers(0, len(sources), n)
    rows = np.array([rng.integers(0, len(sources[s])) for s in which])
    return which, rows


@needs_kernel
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint16])  # uint16: bfloat16 bits
def test_rows_of_many_sources_are_copied_as_numpy_indexes_them(dtype: type):
    rng = np.random.default_rng(3)
    sources = _sources(rng, [5, 1, 40, 17], 13, np.float32)
    sources = tuple((np.abs(s) * 1000).astype(dtype) if dtype == np.uint16 else s.astype(dtype) for s in sources)
    which, rows = _picks(rng, sources, 300)
    target = np.empty((300, 13), dtype=dtype)
    gather.take_from(sources, which, rows, target)
    assert np.array_equal(target.view(np.uint8), np.stack([sources[s][r] for s, r in zip(which, rows)]).view(np.uint8))


@pytest.mark.parametrize("store_dtype", [pytest.param("float16", marks=needs_f16c), pytest.param("bfloat16", marks=needs_kernel)])
def test_rows_of_many_sources_widen_bit_for_bit(store_dtype: str):
    rng = np.random.default_rng(4)
    values = [torch.from_numpy(s) for s in _sources(rng, [30, 2, 9], 20, np.float32)]
    narrow = [v.half() if store_dtype == "float16" else v.to(torch.bfloat16) for v in values]
    sources = tuple(v.numpy() if store_dtype == "float16" else v.view(torch.int16).numpy().view(np.uint16) for v in narrow)
    which, rows = _picks(rng, sources, 100)
    target = torch.empty(100, 20)
    gather.take_from(sources, which, rows, target)
    expected = torch.stack([narrow[s][r].float() for s, r in zip(which, rows)])
    assert torch.equal(target.view(torch.int32), expected.view(torch.int32))


@needs_kernel
def test_a_source_or_row_out_of_range_or_a_source_of_other_width_is_refused_before_anything_is_written():
    sources = (random_rows(10, 8), random_rows(3, 8))
    target = np.full((2, 8), 7, dtype=np.float16)
    with pytest.raises(IndexError, match="row 3 is out of range for a source of 3 rows"):
        gather.take_from(sources, np.array([0, 1]), np.array([9, 3]), target)  # row 9 fits source 0, 3 not source 1
    with pytest.raises(IndexError, match="source 2 is out of range for 2 sources"):
        gather.take_from(sources, np.array([0, 2]), np.array([0, 0]), target)
    with pytest.raises(TypeError, match="source 1 must be"):
        gather.take_from((sources[0], random_rows(3, 9)), np.array([0, 1]), np.array([0, 0]), target)
    with pytest.raises(TypeError, match="no one-pass gather"):
        gather.take_from(sources, np.array([0, 1]), np.array([0, 0]), np.empty((2, 8), dtype=np.float32))
    assert np.all(target == 7)


def _loader(path: Path, hooks, **overrides) -> ActivationLoader:
    settings = dict(batch_size=100, heldout_chunks=1, shuffle_buffer_chunks=3, num_workers=2, max_rows=1500, seed=2,
                    dtype=torch.float32)
    return ActivationLoader(path, hooks, **{**settings, **overrides})


@needs_f16c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # widened (CPU training); as stored (the CUDA path)
def test_batches_gathered_from_the_chunk_maps_equal_the_group_buffer_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
):
    x_in = random_rows(900, 24, seed=6)  # 15 chunks of 64 rows, the last one 4 rows short
    path = make_store(tmp_path / "pair.zarr", {HOOK: x_in, OUT_HOOK: -x_in}, 64)
    loader = _loader(path, (HOOK, OUT_HOOK), dtype=dtype)
    assert "straight from the kept chunk maps" in loader.describe_gather()
    from_maps = list(loader)
    monkeypatch.setenv(gather.PYTHON_GATHER_ENV, "1")
    assert "from the group buffers" in loader.describe_gather()
    buffered = list(loader)
    assert len(from_maps) == 15 and all(b[HOOK].dtype == dtype for b in from_maps)
    for a, b in zip(from_maps, buffered):
        assert torch.equal(a[HOOK], b[HOOK]) and torch.equal(a[OUT_HOOK], b[OUT_HOOK])
        assert torch.equal(a[HOOK], -a[OUT_HOOK])  # the two hooks' rows stay aligned


@needs_kernel
def test_only_stores_whose_every_chunk_stays_mapped_are_gathered_from_the_maps(tmp_path: Path):
    stored = random_rows(300, 8, seed=7).view(np.uint16)  # bfloat16 bits
    raw = make_store(tmp_path / "raw.zarr", {HOOK: stored}, 64, store_dtype="bfloat16")
    compressed = make_store(tmp_path / "zstd.zarr", {HOOK: stored}, 64, store_dtype="bfloat16", compressor="zstd")
    assert "kept chunk maps" in _loader(raw, HOOK).describe_gather()
    assert "kept chunk maps" not in _loader(compressed, HOOK).describe_gather()  # decoded per read: not kept
    assert "kept chunk maps" not in _loader(raw, HOOK, slice_rows=64).describe_gather()  # whole chunks: one pread each
    assert "kept chunk maps" not in _loader(raw, HOOK, dtype=torch.float64).describe_gather()  # no kernel for it


@needs_kernel
def test_batch_memory_is_handed_out_again_when_gathered_from_the_maps(tmp_path: Path):
    path = make_store(tmp_path / "ids.zarr", {HOOK: random_rows(640, 16, seed=8)}, 64, store_dtype="float32")
    loader = _loader(path, HOOK, batch_size=32, prefetch_batches=2, max_rows=32 * 200)
    assert "kept chunk maps" in loader.describe_gather()
    pointers = {batch[HOOK].data_ptr() for batch in loader}  # each batch dropped before the next
    assert len(pointers) <= 2 + 2 * 2 + 2  # the pool: queued, being gathered, held by the consumer
