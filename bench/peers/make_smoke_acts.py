"""Seeded synthetic activations with sparse structure, for smoke-testing the peer adapters.

Each row is a sparse non-negative combination of a few of `n_dirs` random unit directions, plus
a shared offset and Gaussian noise: an SAE can explain most of its variance, a random one none.
Writes a raw little-endian float16 (N, d) .npy, rows already in random order.

Usage: python bench/peers/make_smoke_acts.py --out X.npy [--rows 200000 --d 384 --dirs 3000]
"""

from __future__ import annotations

import argparse

import numpy as np


def make_acts(rows: int, d: int, n_dirs: int, active: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_dirs, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    # Zipf-like feature frequencies, as in real activations: a few directions are common.
    freq = 1.0 / np.arange(1, n_dirs + 1) ** 0.7
    freq /= freq.sum()
    offset = 0.5 * rng.standard_normal(d)
    out = np.empty((rows, d), dtype="<f2")
    chunk = 20_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        picks = rng.choice(n_dirs, size=(n, active), p=freq)
        mags = rng.exponential(2.0, size=(n, active))
        x = np.einsum("na,nad->nd", mags, dirs[picks])
        x += offset + 0.05 * rng.standard_normal((n, d))
        out[start : start + n] = x
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--dirs", type=int, default=3000)
    parser.add_argument("--active", type=int, default=8, help="directions per row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    np.save(args.out, make_acts(args.rows, args.d, args.dirs, args.active, args.seed), allow_pickle=False)


if __name__ == "__main__":
    main()
