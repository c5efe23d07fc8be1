"""Shared plumbing for the pipeline's Click scripts in bin/: one-line errors, logging, versions."""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version

import click

from .errors import ScinvInputError


def step(func):
    """Run a step's body; a :class:`ScinvInputError` becomes one 'ERROR: ...' line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*names are not unique.*")
        try:
            return func(*args, **kwargs)
        except ScinvInputError as err:
            click.echo(f"ERROR: {err}", err=True)
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
