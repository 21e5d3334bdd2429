"""`saeflow` command line: generate, shuffle, train, evaluate, features, compare, inspect, validate, config.

Every expected failure (bad config, bad store, missing model, a file that cannot be written) is
a one-line message on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import click
from pydantic import BaseModel

from pipeline.config import ConfigError, is_per_sae, load_config
from pipeline.sweeps import SWEEPABLE_SECTIONS, sweep_variants
from pipeline.files import WriteError
from store.format import StoreError

_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one config value (YAML syntax), e.g. --set train.lr=1e-3. Repeatable.",
)


def _clear_errors(command):
    """Turn expected errors into `error: <one line>` and exit 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ConfigError, StoreError, WriteError) as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="saeflow", message="saeflow %(version)s")
def main():
    """saeflow: cache LM activations once, train many sparse autoencoders from them."""


def _on_config(command):
    """A command on an experiment CONFIG: the config (with --set overrides) is loaded and
    validated first, before any slow import, and handed to the command."""

    @click.argument("config", type=click.Path(dir_okay=False))
    @_set_option
    @_clear_errors
    @functools.wraps(command)
    def with_config(config, overrides, **options):
        return command(load_config(config, list(overrides)), **options)

    with_config.__doc__ = f"{command.__doc__}\n\nEvery key of CONFIG, its default and meaning: saeflow config CONFIG."
    return with_config


@main.command()
@click.option("--overwrite", is_flag=True, help="Replace a store made with a different config.")
@click.option("--identity", "identity_file", type=click.Path(dir_okay=False),
              help="Also write the store's identity (a digest of its chunk checksums) to this JSON file: it changes "
                   "exactly when the store's content does, so dvc can depend on it instead of hashing the store.")
@_on_config
def generate(cfg, overwrite, identity_file):
    """Stage 1: run the LM over the dataset and write hook activations to the store."""
    from pipeline.distributed import launched_ranks
    from pipeline.generate.provenance import write_identity

    ranks = launched_ranks()
    if ranks.distributed:  # under torchrun: each rank writes a part, rank 0 merges them into the store
        from pipeline.generate.ranks import generate_on_ranks as generate_store
    else:
        from pipeline.generate.stage import generate as generate_store
    generate_store(cfg, overwrite=overwrite)
    if not ranks.main:
        return
    if identity_file:
        write_identity(cfg.generate.location(), Path(identity_file))
    click.echo(f"store: {cfg.generate.location()}")


@main.command()
@click.option("--out", required=True, help="Path or object-store URL of the shuffled copy.")
@click.option("--overwrite", is_flag=True, help="Replace what is at --out if it is not this shuffle's copy.")
@click.option("--identity", "identity_file", type=click.Path(dir_okay=False),
              help="Also write the copy's identity to this JSON file (as generate --identity does, for dvc).")
@_on_config
def shuffle(cfg, out, overwrite, identity_file):
    """After generate: write a copy of CONFIG's store whose training rows lie in one seeded
    random order (loader.seed; held-out chunks, loader.heldout_chunks, copied as they are).
    Train from it with --set generate.store=OUT: its whole chunks read at disk speed and its
    batches mix like a global shuffle's. A finished copy is left alone; a killed one resumes."""
    from tqdm import tqdm

    from pipeline.generate.provenance import write_identity
    from store.location import StoreLocation
    from store.shuffled_copy import shuffle_store

    source, copy = cfg.generate.location(), StoreLocation(out, cfg.generate.storage_options)
    with tqdm(unit="row", unit_scale=True, desc="shuffle", dynamic_ncols=True) as progress:
        manifest = shuffle_store(source, copy, heldout_chunks=cfg.loader.heldout_chunks, seed=cfg.loader.seed,
                                 overwrite=overwrite, cache_dir=cfg.loader.cache_dir, progress=progress.update)
    if identity_file:
        write_identity(copy, Path(identity_file))
    click.echo(f"shuffled: {out}: {manifest['n_rows']} rows in {manifest['n_chunks']} chunks from {source}")
    click.echo(f"next: saeflow train {click.get_current_context().params['config']} --set generate.store={out}")


_allow_incomplete = click.option(
    "--allow-incomplete", is_flag=True,
    help="Use a store that generate has not finished (still running or stopped): only its committed rows.",
)


@main.command()
@click.option("--overwrite", is_flag=True, help="Replace a finished SAE of a different config in train.out_dir.")
@_allow_incomplete
@_on_config
def train(cfg, overwrite, allow_incomplete):
    """Stage 2: train the SAE(s) of CONFIG from its store (resumes from a checkpoint)."""
    from pipeline.distributed import launched_ranks
    from pipeline.train.stage import train as train_saes

    directories = train_saes(cfg, overwrite=overwrite, allow_incomplete=allow_incomplete)
    if not launched_ranks().main:
        return  # rank 0 reports for every rank
    for directory in directories:
        heldout = json.loads((directory / "train_metrics.json").read_text())["heldout"]
        click.echo(f"trained: {directory}: held-out fvu {heldout['fvu']:.4f}, l0 {heldout['l0']:.1f}, "
                   f"dead {heldout['dead_fraction_heldout']:.2%}, dense {heldout['dense_fraction_heldout']:.2%}")
    click.echo(f"next: saeflow evaluate {click.get_current_context().params['config']}  (metrics.json, LM splice)")


@main.command()
@_allow_incomplete
@_on_config
def evaluate(cfg, allow_incomplete):
    """Evaluate the trained SAE(s) of CONFIG on held-out data; writes metrics.json."""
    from pipeline.evaluate.stage import evaluate as evaluate_saes

    for name, values in evaluate_saes(cfg, allow_incomplete=allow_incomplete).items():
        summary = ", ".join(f"{key} {value:.4g}" for key, value in values.items() if isinstance(value, (int, float)))
        click.echo(f"{name}: {summary}")


@main.command()
@click.option("--split", type=click.Choice(["heldout", "train"]), default=None,
              help="Rows to read (default features.split, heldout): train reads the training chunks, for more examples.")
@_on_config
def features(cfg, split):
    """After train: per latent of each SAE, firing frequency, activation histogram, top and
    quantile-interval examples in context, logit effects; writes <out_dir>/<variant>/features/
    (features.json and index.html, a dashboard that opens from the file system)."""
    from pipeline.features.stage import DASHBOARD_FILE
    from pipeline.features.stage import features as describe_latents

    for name, directory in describe_latents(cfg, split=split).items():
        click.echo(f"{name}: {directory / DASHBOARD_FILE}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for fvu_vs_l0.png, fvu_vs_l0.json and training_curves.png.")
@click.option("--title", default=None, help="Title of the figures (default: the folder the runs are in).")
@_clear_errors
def compare(run_dirs, out_dir, title):
    """Compare finished runs: held-out FVU against L0 (one labelled point per SAE) and their
    training curves overlaid. RUN_DIRS: train.out_dir folders (every SAE in them) or variant
    folders; each is labelled by its folder (k16 for results/minilm-docstrings/k16/sae)."""
    from pipeline.train.compare import CompareError, compare_runs

    try:
        points = compare_runs([Path(run_dir) for run_dir in run_dirs], Path(out_dir), title=title)
    except CompareError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    for point in points:
        click.echo(f"{point['label']}: held-out fvu {point['fvu']:.4f}, l0 {point['l0']:.1f}")
    click.echo(f"plots: {Path(out_dir) / 'fvu_vs_l0.png'}, {Path(out_dir) / 'training_curves.png'}")


@main.command("config")
@_on_config
def show_config(cfg):
    """Print the effective config (after --set): every key's value, default and meaning."""
    sweep_variants(cfg)  # a bad sweep entry fails here as it would in train
    click.echo(format_config(cfg))


@main.command()
@click.argument("store")
@_clear_errors
def inspect(store):
    """Print a store's manifest, sizes, hooks, tokens and statistics. STORE: a path or an
    object-store URL (s3://bucket/name.zarr; credentials from the environment)."""
    from store.inspect import describe_store

    click.echo(describe_store(store))


@main.command()
@click.argument("store")
@_clear_errors
def validate(store):
    """Recompute checksums and check shapes and counts; exit 1 if anything is wrong. STORE: a
    path or an object-store URL."""
    from store.validate import validate_store

    problems = validate_store(store)
    for problem in problems:
        click.echo(f"bad: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"ok: {store}")


# --- `saeflow config`: one line per key ----------------------------------------------------------
# * train.lr     = 0.01   (default 0.0004)  peak learning rate of Adam [per-SAE]
# A leading * marks a value that differs from the field's default (what the YAML or --set
# changed). Values print as JSON, which is also valid YAML for --set section.key=VALUE.
REQUIRED = object()  # the default of a field that has none
LEGEND = (
    f"# * = differs from the default; a train.sweep entry may set any {', '.join(f'{s}.*' for s in SWEEPABLE_SECTIONS)} "
    "key and the keys marked [per-SAE]"
)
# Longer values (hook lists, sweeps) overflow their column instead of widening every line.
_MAX_VALUE_WIDTH = 28
_MAX_NOTE_WIDTH = 28


class ConfigRow(NamedTuple):
    key: str  # dotted: "model.random.seed"
    value: Any  # JSON-ready, as model_dump(mode="json") writes it
    default: Any  # JSON-ready, or REQUIRED
    description: str
    per_sae: bool

    @property
    def changed(self) -> bool:
        return self.default is not REQUIRED and self.value != self.default


def config_rows(model: BaseModel, prefix: str = "") -> Iterator[ConfigRow]:
    """One row per field of `model` in definition order; nested sections become dotted keys."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from config_rows(value, f"{prefix}{name}.")
            continue
        default = REQUIRED if field.is_required() else _as_json(model, name, field.get_default(call_default_factory=True))
        yield ConfigRow(f"{prefix}{name}", _as_json(model, name, value), default, field.description or "",
                        is_per_sae(field))


def _as_json(model: BaseModel, name: str, value: Any) -> Any:
    """`value` as field `name` of `model` serializes it (so a torch.dtype default reads "float32")."""
    return model.model_copy(update={name: value}).model_dump(mode="json", include={name})[name]


def format_config(cfg: BaseModel) -> str:
    """The legend, then one aligned line per row of config_rows(cfg)."""
    rows = list(config_rows(cfg))
    values = [json.dumps(row.value) for row in rows]
    notes = [_default_note(row) for row in rows]
    key_width = max(len(row.key) for row in rows)
    value_width = min(max(map(len, values)), _MAX_VALUE_WIDTH)
    note_width = min(max(map(len, notes)), _MAX_NOTE_WIDTH)
    lines = [LEGEND]
    for row, value, note in zip(rows, values, notes):
        mark = "*" if row.changed else " "
        meaning = row.description + (" [per-SAE]" if row.per_sae else "")
        lines.append(f"{mark} {row.key:<{key_width}} = {value:<{value_width}}  {note:<{note_width}}  {meaning}".rstrip())
    return "\n".join(lines)


def _default_note(row: ConfigRow) -> str:
    if row.default is REQUIRED:
        return "(required)"
    return f"(default {json.dumps(row.default)})" if row.changed else ""



def run() -> None:
    """The `saeflow` entry point: main(), then a plain exit, or one past the interpreter's teardown
    once obstore is loaded. obstore answers zarr's async reads from tokio threads that outlive the
    command; when one of them touches Python while the interpreter tears down, the process aborts
    (SIGABRT after "ok", a known race of pyo3-async-runtimes, which has no shutdown hook). So the
    steps of a normal exit that matter run here (non-daemon threads joined, atexit handlers, stdio
    flushed) and the process leaves with the command's exit code."""
    try:
        main()
    except SystemExit as done:
        if "obstore" not in sys.modules:
            raise
        code = done.code
        if isinstance(code, str):
            print(code, file=sys.stderr)  # as the interpreter does with sys.exit("message")
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)


if __name__ == "__main__":
    run()
