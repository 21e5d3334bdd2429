"""`saeflow` command line: generate, train, evaluate, inspect, validate.

Every expected failure (bad config, bad store, missing model) is a one-line message on stderr
and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from pipeline.config import ConfigError, load_config
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
        except (ConfigError, StoreError) as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """saeflow: cache LM activations once, train many sparse autoencoders from them."""


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
@click.option("--overwrite", is_flag=True, help="Replace a store made with a different config.")
@_clear_errors
def generate(config, overrides, overwrite):
    """Stage 1: run the LM over the dataset and write hook activations to the store."""
    cfg = load_config(config, list(overrides))  # validate before the slow imports
    from pipeline.generate.stage import generate as generate_store

    click.echo(f"store: {generate_store(cfg, overwrite=overwrite).path}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
@_clear_errors
def train(config, overrides):
    """Stage 2: train the SAE(s) of CONFIG from its store (resumes from a checkpoint)."""
    cfg = load_config(config, list(overrides))  # validate before the slow imports
    from pipeline.train.stage import train as train_saes

    for directory in train_saes(cfg):
        click.echo(f"trained: {directory}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
@_clear_errors
def evaluate(config, overrides):
    """Evaluate the trained SAE(s) of CONFIG on held-out data; writes metrics.json."""
    cfg = load_config(config, list(overrides))  # validate before the slow imports
    from pipeline.evaluate.stage import evaluate as evaluate_saes

    metrics = evaluate_saes(cfg)
    for name, values in metrics.items():
        summary = ", ".join(f"{key} {value:.4g}" for key, value in values.items() if isinstance(value, (int, float)))
        click.echo(f"{name}: {summary}")


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@_clear_errors
def inspect(store):
    """Print a store's manifest, sizes, hooks, tokens and statistics."""
    from store.inspect import describe_store

    click.echo(describe_store(Path(store)))


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@_clear_errors
def validate(store):
    """Recompute checksums and check shapes and counts; exit 1 if anything is wrong."""
    from store.validate import validate_store

    problems = validate_store(Path(store))
    for problem in problems:
        click.echo(f"bad: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"ok: {store}")


if __name__ == "__main__":
    main()
