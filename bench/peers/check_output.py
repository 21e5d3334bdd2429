"""Checks a peer adapter's output: loads sae.safetensors + run.json and measures its FVU.

Uses the forward promised by peer_export (z = topk_k(relu(x @ W_enc + b_enc)), x_hat = z @ W_dec +
b_dec) on the first --rows rows of the activations, with numpy only, so it runs in any venv.
FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (mean over the evaluated rows). Exits 1 when
FVU >= --max-fvu.

Usage: python bench/peers/check_output.py --acts X.npy --sae DIR [--rows 20000] [--max-fvu 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

EXPECTED_KEYS = {"W_enc", "b_enc", "W_dec", "b_dec"}


def reconstruct(x: np.ndarray, weights: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    pre = np.maximum(x @ weights["W_enc"] + weights["b_enc"], 0.0)
    top = np.argpartition(pre, -k, axis=1)[:, -k:]
    z = np.zeros_like(pre)
    np.put_along_axis(z, top, np.take_along_axis(pre, top, axis=1), axis=1)
    return z @ weights["W_dec"] + weights["b_dec"], (z > 0).sum(axis=1)


def check(acts_path: str, sae_dir: Path, rows: int, chunk: int = 4096) -> dict:
    weights = {name: t.astype(np.float64) for name, t in load_file(str(sae_dir / "sae.safetensors")).items()}
    if set(weights) != EXPECTED_KEYS:
        raise ValueError(f"keys {sorted(weights)} != {sorted(EXPECTED_KEYS)}")
    run = json.loads((sae_dir / "run.json").read_text())
    d, d_sae = weights["W_enc"].shape
    shapes = {name: t.shape for name, t in weights.items()}
    if shapes != {"W_enc": (d, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d), "b_dec": (d,)}:
        raise ValueError(f"inconsistent shapes {shapes}")
    x_all = np.load(acts_path, mmap_mode="r", allow_pickle=False)[:rows].astype(np.float64)
    mean = x_all.mean(axis=0)
    sq_err = sq_centered = l0 = 0.0
    for start in range(0, len(x_all), chunk):
        x = x_all[start : start + chunk]
        x_hat, active = reconstruct(x, weights, run["k"])
        sq_err += float(((x - x_hat) ** 2).sum())
        sq_centered += float(((x - mean) ** 2).sum())
        l0 += float(active.sum())
    return {
        "tool": run["tool"],
        "fvu": sq_err / sq_centered,
        "l0": l0 / len(x_all),
        "rows": len(x_all),
        "d": d,
        "d_sae": d_sae,
        "tokens_per_second": run["tokens_per_second"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acts", required=True)
    parser.add_argument("--sae", required=True, type=Path, help="an adapter's --out directory")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--max-fvu", type=float, default=1.0)
    args = parser.parse_args()
    result = check(args.acts, args.sae, args.rows)
    print(json.dumps(result))
    sys.exit(0 if result["fvu"] < args.max_fvu else 1)


if __name__ == "__main__":
    main()
