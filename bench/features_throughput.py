"""Rows/s of the `saeflow features` pass against the loader alone, on the same rows, warm cache.

The store is bench/loader_throughput.py's (random fp16 rows, d=768, 8192-row chunks); the SAE a
TopK one (k=32, expansion 4 by default: d_sae 3072, the offline default's latent count) with
random weights. Measured, each the best of --repeats rounds:
- loader: ActivationLoader in store order (shuffle=False), float32 batches: what features reads;
- loader + SAE: plus the SAE's forward on every batch: the floor of any per-latent analysis;
- features: pipeline.features.scan.scan with LatentStats at the default features settings: what
  `saeflow features` does per row.
On a CPU the SAE's encoder matmul (2 * d_model * d_sae flops per row) dominates, so features is
far below the loader's read rate there; the cost of the statistics themselves is the ratio of
features to loader + SAE, the last line (goal >= 0.8). The per-example work after the pass
(contexts, features.json, index.html) does not grow with the rows read and is not timed here.

    .venv/bin/python bench/features_throughput.py [--rows N] [--expansion E] [--store PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader_throughput import CHUNK_ROWS, D, HOOK, build_store, timed  # noqa: E402
from pipeline.features.config import FeaturesConfig  # noqa: E402
from pipeline.features.scan import scan  # noqa: E402
from pipeline.features.stats import LatentStats  # noqa: E402
from pipeline.sae.config import SAEConfig  # noqa: E402
from pipeline.sae.model import SparseAutoencoder  # noqa: E402
from store.loader import ActivationLoader  # noqa: E402
from store.reader import StoreReader  # noqa: E402
from host import print_host  # noqa: E402


def loader(reader: StoreReader, batch_size: int) -> ActivationLoader:
    return ActivationLoader(reader, HOOK, batch_size=batch_size, split="train", shuffle=False, heldout_chunks=0,
                            dtype=torch.float32)


def loader_only(reader: StoreReader, sae: SparseAutoencoder, batch_size: int) -> int:
    return sum(batch[HOOK].shape[0] for batch in loader(reader, batch_size))


@torch.no_grad()
def loader_and_sae(reader: StoreReader, sae: SparseAutoencoder, batch_size: int) -> int:
    rows = 0
    for batch in loader(reader, batch_size):
        sae(sae.normalize_input(batch[HOOK]))
        rows += batch[HOOK].shape[0]
    return rows


def features_pass(reader: StoreReader, sae: SparseAutoencoder, batch_size: int) -> int:
    settings = FeaturesConfig()
    stats = LatentStats(sae.cfg.d_sae, top_n=settings.top_examples, sample_n=settings.interval_examples,
                        bins=settings.histogram_bins, intervals=settings.intervals, seed=settings.seed)
    scan(sae, reader, stats, split="train", heldout_chunks=0, batch_size=batch_size)
    return stats.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="store path (built there if missing); default: a temp dir")
    parser.add_argument("--rows", type=int, default=16 * CHUNK_ROWS, help="rows of the store")
    parser.add_argument("--expansion", type=int, default=4, help="SAE expansion factor (d_sae = expansion * 768)")
    parser.add_argument("--k", type=int, default=32, help="TopK k")
    parser.add_argument("--batch-size", type=int, default=FeaturesConfig().batch_size)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print_host()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = args.store or Path(tmp) / "bench.zarr"
        if not (path / "zarr.json").exists():
            build_store(path, args.rows)
        reader = StoreReader(path)
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(hook_point_in=HOOK, hook_point_out=HOOK, d_model=D, expansion_factor=args.expansion,
                                          act_fn="topk", top_k=args.k, norm_activation="inference", device="cpu")).eval()
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
              f"{reader.n_rows} rows x {D}, SAE d_sae {sae.cfg.d_sae} topk k={args.k}, batches of {args.batch_size}")
        best: dict[str, float] = {}
        runs = {"loader": loader_only, "loader + SAE forward": loader_and_sae, "features pass": features_pass}
        loader_only(reader, sae, args.batch_size)  # warm the page cache and the verified-chunk set
        for _ in range(args.repeats):
            for label, run in runs.items():
                # timed() rates float16 bytes read; the ratios below are the same in rows/s
                rate = timed(label, lambda: run(reader, sae, args.batch_size) * 2 * D)
                best[label] = max(best.get(label, 0.0), rate)
        print(f"features / loader rate: {best['features pass'] / best['loader']:.3f} "
              f"(the SAE's forward alone: {best['loader + SAE forward'] / best['loader']:.3f} of the loader's rate)")
        print(f"features / (loader + SAE forward) rows/s: {best['features pass'] / best['loader + SAE forward']:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
