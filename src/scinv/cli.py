"""Shared plumbing for the pipeline's Click scripts in bin/: one-line errors, logging, versions."""

from __future__ import annotations

import functools
import logging
import re
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version

import click

from .errors import ScinvInputError

# The library names parameters as its functions do (batch_key); the pipeline's steps name the
# pipeline parameter a user sets instead (--batch_key).
PIPELINE_PARAMETERS = (
    "batch_key",
    "label_key",
    "heldout_batches",
    "annotations",
    "input",
    "min_genes",
    "min_counts",
    "max_pct_mito",
    "min_cells_per_gene",
    "baselines",
    "unknown_label",
)
_NAME = "(?:" + "|".join(PIPELINE_PARAMETERS) + ")"
# whole words, not inside paths, file names or quoted column values; 'a/b/c' lists of names as well
_PARAMETERS = re.compile(rf"(?<![\w'./-])({_NAME}(?:/{_NAME})*)(?![\w'./-])")


def as_pipeline_message(message: str) -> str:
    """'fix batch_key' -> 'fix --batch_key', 'relax min_genes/min_counts' -> 'relax --min_genes/--min_counts'."""
    return _PARAMETERS.sub(lambda m: "/".join(f"--{name}" for name in m.group(1).split("/")), message)


def step(func):
    """Run a step's body; a :class:`ScinvInputError` becomes one 'ERROR: ...' line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        # scinv's own progress at INFO; other libraries' INFO chatter (e.g. faiss reporting the CPU build it
        # fell back to as a ModuleNotFoundError) reads like a failure in a task's log, so only their warnings
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
        logging.getLogger("scinv").setLevel(logging.INFO)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*names are not unique.*")
        try:
            return func(*args, **kwargs)
        except ScinvInputError as err:
            click.echo(f"ERROR: {as_pipeline_message(str(err))}", err=True)
            sys.exit(2)

    return wrapper


def package_versions(packages: list[str]) -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def versions_yaml(process: str, packages: list[str]) -> str:
    lines = [f'"{process}":'] + [f"    {k}: {v}" for k, v in package_versions(packages).items()]
    return "\n".join(lines) + "\n"


def key_list(value: str | None) -> list[str]:
    return [k.strip() for k in (value or "").replace(";", ",").split(",") if k.strip()]
