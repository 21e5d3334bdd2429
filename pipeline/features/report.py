"""features.json: the statistics, examples and logit effects of one SAE (schema: docs/features.md).

Examples name their context by store rows; the tokens, documents and positions of those rows are
stored once, in `segments` (runs of consecutive rows), and token texts once, in `tokens`.
Context activations are rounded to 4 significant digits; every other number is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.features.examples import ExampleContexts, token_texts
from pipeline.features.logits import LogitEffects
from pipeline.features.stats import Interval, LatentStats
from pipeline.sae.model import SparseAutoencoder

FORMAT_NAME = "saeflow.features"
FORMAT_VERSION = 1


@dataclass
class Picked:
    """Each latent's top rows and quantile intervals (with their samples), read out once."""

    top: list[tuple[list[int], list[float]]]
    intervals: list[list[Interval]]

    @classmethod
    def of(cls, stats: LatentStats) -> Picked:
        latents = range(stats.d_sae)
        return cls([stats.top_rows(j) for j in latents], [stats.quantile_intervals(j) for j in latents])

    def example_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(latent, row) of every top and interval example."""
        latents, rows = [], []
        for latent, ((top, _), intervals) in enumerate(zip(self.top, self.intervals)):
            picked = top + [row for interval in intervals for row in interval.rows]
            latents += [latent] * len(picked)
            rows += picked
        return np.array(latents, dtype=np.int64), np.array(rows, dtype=np.int64)


def build_report(header: dict[str, Any], sae: SparseAutoencoder, stats: LatentStats, picked: Picked,
                 contexts: ExampleContexts, logits: LogitEffects | str, tokenizer: Any | None) -> dict[str, Any]:
    """The features.json document; `header` holds the variant, store and settings keys."""
    by_row = {(int(latent), int(row)): e for e, (latent, row) in enumerate(zip(contexts.latents, contexts.rows))}
    frequency, mean = stats.frequency(), stats.mean_activation()
    used_tokens: set[int] = set()
    latents = []
    for latent in range(stats.d_sae):
        rows, values = picked.top[latent]
        entry = {
            "latent": latent,
            "fires": int(stats.count[latent]),
            "frequency": float(frequency[latent]),
            "mean_activation": _number(float(mean[latent])),
            "max_activation": float(stats.max[latent]),
            "histogram": {"bin_width": stats.bin_width(latent), "counts": stats.histogram[latent].tolist()},
            "top": [_example(contexts, by_row[latent, row], value) for row, value in zip(rows, values)],
            "intervals": [
                {"low": interval.low, "high": interval.high, "fires": interval.count,
                 "examples": [_example(contexts, by_row[latent, row], value) for row, value in zip(interval.rows, interval.values)]}
                for interval in picked.intervals[latent]
            ],
        }
        if isinstance(logits, LogitEffects):
            entry["promoted"] = _pairs(logits.promoted[latent], logits.promoted_values[latent], used_tokens)
            entry["suppressed"] = _pairs(logits.suppressed[latent], logits.suppressed_values[latent], used_tokens)
        latents.append(entry)
    segments = _segments(contexts)
    for segment in segments:
        used_tokens.update(segment["tokens"])
    texts = token_texts(tokenizer, sorted(used_tokens))
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        **header,
        "sae": {key: getattr(sae.cfg, key) for key in ("hook_point_in", "hook_point_out", "d_model", "d_sae", "act_fn", "top_k")},
        "rows": stats.rows,
        "logit_effects_skipped": logits if isinstance(logits, str) else None,
        "tokens": {str(token): texts[token] for token in sorted(used_tokens)},
        "segments": segments,
        "latents": latents,
    }


def _example(contexts: ExampleContexts, e: int, value: float) -> dict[str, Any]:
    bounds = contexts.bounds
    example = {"row": int(contexts.rows[e]), "activation": value, "first_row": int(bounds.first[e]),
               "acts": [0 if a == 0 else float(f"{a:.4g}") for a in contexts.activations[e].tolist()]}
    if bounds.before[e]:
        example["before"] = bounds.before[e]
    if bounds.after[e]:
        example["after"] = bounds.after[e]
    return example


def _pairs(ids, values, used: set[int]) -> list[list]:
    used.update(int(i) for i in ids)
    return [[int(i), float(f"{float(v):.4g}")] for i, v in zip(ids, values)]


def _segments(contexts: ExampleContexts) -> list[dict[str, Any]]:
    """Runs of consecutive rows covering every context, with their tokens, documents and positions."""
    if contexts.columns is None:
        return []
    order = np.argsort(contexts.bounds.first, kind="stable")
    runs: list[list[int]] = []
    for first, stop in zip(contexts.bounds.first[order], contexts.bounds.stop[order]):
        if runs and first <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], int(stop))
        else:
            runs.append([int(first), int(stop)])
    columns = contexts.columns
    return [{"first_row": first, **{name: columns[name, np.arange(first, stop)].tolist() for name in ("tokens", "doc", "pos")}}
            for first, stop in runs]


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None
