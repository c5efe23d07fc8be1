#!/usr/bin/env python3
"""Print a versions.yml block for a pipeline process: scinv_versions.py PROCESS PACKAGE..."""

import click

from scinv.cli import versions_yaml


@click.command()
@click.argument("process")
@click.argument("packages", nargs=-1)
def main(process, packages):
    """Write the YAML block `PROCESS: {python, PACKAGES...}` to stdout."""
    click.echo(versions_yaml(process, ["scinv", *packages]), nl=False)


if __name__ == "__main__":
    main()
