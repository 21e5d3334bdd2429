"""The float64 statistics a store carries: arrays under stats/<hook>/ written during generation.

stats/<hook>/count (1,) int64, mean (d,) float64, m2 (d, d) float64 (sum of outer products of
deviations from the mean: covariance = m2 / (count - 1)), norm_sum (1,) float64 (sum of row L2
norms). They are a snapshot of store.moments.RunningMoments over the first manifest["stats"]["rows"]
rows, accumulated chunk by chunk in store order from the stored (rounded) values, so replaying the
same chunks reproduces them bit for bit. Each array is one file; the manifest records a checksum
per array, so a snapshot torn by a crash is detected rather than trusted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from store.dtypes import from_stored_numpy, numpy_dtype
from store.format import Manifest, StoreError, acts_path, chunk_checksum, open_store_group, read_manifest, stats_path
from store.moments import RunningMoments
from store.reader import StoreReader

STATS_ARRAYS = ("count", "mean", "m2", "norm_sum")


def chunk_moments(rows: np.ndarray, store_dtype: str, device: str | torch.device = "cpu") -> RunningMoments:
    """Moments of one chunk of stored rows, in float64. The same chunk on the same device gives
    the same bits, so merging chunk after chunk reproduces a store's statistics exactly (resume
    replays them).

    The d x d product is the main cost of generation statistics; on a GPU (`device`, the LM's) it
    is nearly free. On a CPU it runs through torch (MKL, OpenMP) rather than numpy's OpenBLAS,
    whose worker threads spin after each call and halved the LM's speed on a 2-core machine, and
    the rows are widened and centred in place (one float64 copy of the chunk, not three).
    """
    x = from_stored_numpy(rows, store_dtype).to(device=device, dtype=torch.float64, copy=True)  # centred in place below
    norm_sum = float(torch.linalg.vector_norm(x, dim=1).sum())
    mean = x.mean(dim=0)
    x -= mean
    m2 = x.T @ x
    return RunningMoments.from_state(
        {"d": x.shape[1], "count": x.shape[0], "norm_sum": norm_sum, "mean": mean.cpu().numpy(), "M2": m2.cpu().numpy()}
    )


def stats_arrays(moments: RunningMoments) -> dict[str, np.ndarray]:
    state = moments.state_dict()
    return {
        "count": np.array([state["count"]], dtype="<i8"),
        "mean": np.asarray(state["mean"], dtype="<f8"),
        "m2": np.asarray(state["M2"], dtype="<f8"),
        "norm_sum": np.array([state["norm_sum"]], dtype="<f8"),
    }


def moments_from_arrays(arrays: dict[str, np.ndarray]) -> RunningMoments:
    return RunningMoments.from_state(
        {
            "d": int(arrays["mean"].shape[0]),
            "count": int(arrays["count"][0]),
            "norm_sum": float(arrays["norm_sum"][0]),
            "mean": arrays["mean"],
            "M2": arrays["m2"],
        }
    )


def save_stats(group: zarr.Group, hook: str, moments: RunningMoments, algorithm: str) -> dict[str, str]:
    """Write one hook's snapshot (creating the arrays on first use); returns its checksums (hex)."""
    checksums = {}
    for name, values in stats_arrays(moments).items():
        path = f"{stats_path(hook)}/{name}"
        if path in group:
            group[path][...] = values
        else:
            group.create_array(path, shape=values.shape, chunks=values.shape, dtype=values.dtype, compressors=None)
            group[path][...] = values
        checksums[name] = f"{chunk_checksum(values, algorithm):016x}"
    return checksums


def read_stats_arrays(group: zarr.Group, hook: str) -> dict[str, np.ndarray]:
    try:
        return {name: group[f"{stats_path(hook)}/{name}"][...] for name in STATS_ARRAYS}
    except KeyError:
        raise StoreError(f"store has no statistics for hook {hook!r} (stats/{hook} missing)") from None


def stats_problems(group: zarr.Group, manifest: dict, hook: str) -> list[str]:
    """Why the saved snapshot of `hook` cannot be trusted ([] when it matches the manifest)."""
    record = manifest.get("stats")
    if not record:
        return [] if int(manifest["n_rows"]) == 0 else [f"stats/{hook}: the manifest records no statistics snapshot"]
    try:
        arrays = read_stats_arrays(group, hook)
    except StoreError as error:
        return [str(error)]
    problems = []
    expected = record["checksums"].get(hook, {})
    for name, values in arrays.items():
        if f"{chunk_checksum(values, manifest['checksum_algorithm']):016x}" != expected.get(name):
            problems.append(f"stats/{hook}/{name}: checksum mismatch (snapshot torn or corrupted)")
    if not problems and int(arrays["count"][0]) != int(record["rows"]):
        problems.append(f"stats/{hook}: count {int(arrays['count'][0])} != recorded rows {record['rows']}")
    return problems


def load_stats(path: str | Path, hook: str) -> RunningMoments:
    """The statistics of `hook` saved in a store (mean, covariance, mean norm), verified.

    They cover manifest["stats"]["rows"] rows: all of a complete store's rows.
    """
    group = open_store_group(path)
    manifest = read_manifest(path, group)
    problems = stats_problems(group, manifest, hook)
    if problems:
        raise StoreError(f"{path}: {problems[0]}; run `saeflow validate {path}` and regenerate if needed")
    return moments_from_arrays(read_stats_arrays(group, hook))


class StatsRecorder:
    """The writer's float64 moments of every committed chunk, saved under stats/<hook> when due.

    Saving the d x d statistics costs as much as writing d + 2 rows per hook, so they are saved
    only once the data written since the last save is at least as large (at most about half the
    write bandwidth); a resume replays the chunks committed after the last save, from disk: the
    same chunks give the same bits.
    """

    def __init__(self, path: Path, group: zarr.Group, manifest: Manifest, device: str | torch.device):
        self._group, self._device = group, device
        self._layout = manifest.layout
        self.moments = {hook: RunningMoments(d) for hook, (d, _) in self._layout.items()}
        self.saved_chunks = 0  # leading chunks the saved snapshot covers
        stats_bytes = sum(8 * d * (d + 2) for d, _ in self._layout.values())
        chunk_bytes = manifest.chunk_rows * sum(d * numpy_dtype(dtype).itemsize for d, dtype in self._layout.values())
        self.interval = max(1, math.ceil(stats_bytes / chunk_bytes))
        self._restore(path, manifest)

    def _restore(self, path: Path, manifest: Manifest) -> None:
        """Load the saved snapshot (or start over if it is torn) and replay the chunks after it."""
        record = manifest.get("stats")
        if record and not any(stats_problems(self._group, manifest, hook) for hook in self._layout):
            self.moments = {hook: moments_from_arrays(read_stats_arrays(self._group, hook)) for hook in self._layout}
            self.saved_chunks = int(record["chunks"])
        if self.saved_chunks == manifest.n_chunks:
            return
        reader = StoreReader(path)
        for index in range(self.saved_chunks, manifest.n_chunks):
            start, stop = reader.chunk_bounds(index)
            self.add_chunk({acts_path(hook): reader.read_chunk(hook, index) for hook in self._layout}, stop - start)

    def moments_of(self, arrays: Mapping[str, np.ndarray], rows: int) -> dict[str, RunningMoments]:
        """Each hook's moments of one chunk. arrays: {array path: chunk buffer}, the first `rows`
        rows valid. Safe to call from another thread than add()'s (it reads no running state)."""
        return {hook: chunk_moments(arrays[acts_path(hook)][:rows], store_dtype, self._device)
                for hook, (_, store_dtype) in self._layout.items()}

    def add(self, chunk: Mapping[str, RunningMoments]) -> None:
        """Merge the next chunk's moments (moments_of), in store order."""
        for hook, moments in chunk.items():
            self.moments[hook].merge(moments)

    def add_chunk(self, arrays: Mapping[str, np.ndarray], rows: int) -> None:
        self.add(self.moments_of(arrays, rows))

    def due(self, n_chunks: int) -> bool:
        return n_chunks - self.saved_chunks >= self.interval

    def save(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the statistics of the rows `manifest` commits; returns its "stats" record."""
        algorithm = manifest["checksum_algorithm"]
        checksums = {hook: save_stats(self._group, hook, self.moments[hook], algorithm) for hook in self._layout}
        return {"chunks": manifest["n_chunks"], "rows": manifest["n_rows"], "checksums": checksums}
