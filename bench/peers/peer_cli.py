"""The command line both peer adapters share, so a benchmark calls them identically."""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_args(description: str, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--acts", required=True, help="little-endian float16 .npy (N, d), rows in training order")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=8, help="d_sae = expansion * d")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows (tokens) per step")
    parser.add_argument("--tokens", type=int, required=True, help="train floor(tokens / batch-size) steps")
    parser.add_argument("--lr", type=float, default=None, help="default: the tool's own default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of tokens_per_second")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    args.steps = args.tokens // args.batch_size
    if args.steps < 1:
        parser.error("--tokens must be at least --batch-size")
    args.out.mkdir(parents=True, exist_ok=True)
    return args
