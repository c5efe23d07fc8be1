#!/usr/bin/env python3
"""Write the pipeline's model/training parameters from their one definition, `scinv.config`.

    .venv/bin/python scripts/sync_options.py          # rewrite the generated regions (make options)
    .venv/bin/python scripts/sync_options.py --check  # exit 1 and name the stale files (the tests run this)

Generated from every field with ``pipeline=True`` in scinv.config's dataclasses:
- nextflow_schema.json: the properties of the 'model_options' group;
- nextflow.config: the defaults between the '// >>> scinv.config' and '// <<<' markers;
- conf/modules.config: TRAIN_INVAE's arguments between the same markers.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from scinv.config import CONFIGS, exposed, flag_name, value_type

ROOT = Path(__file__).resolve().parents[1]
SCHEMA, NEXTFLOW_CONFIG, MODULES_CONFIG = ROOT / "nextflow_schema.json", ROOT / "nextflow.config", ROOT / "conf" / "modules.config"
BEGIN, END = "// >>> scinv.config (scripts/sync_options.py writes this block; edit src/scinv/config.py)", "// <<< scinv.config"
SCHEMA_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}
# values the pipeline derives rather than passes as they are (Groovy expressions)
NEXTFLOW_VALUES = {"checkpoint_dir": 'params.checkpoint_dir ? "${params.checkpoint_dir}/${meta.id}" : null'}


def pipeline_fields():
    return [(cls, f) for cls in CONFIGS for f in exposed(cls, "pipeline")]


def groovy(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value) if not (isinstance(value, float) and value.is_integer()) else str(int(value))


def schema_properties() -> dict:
    props = {}
    for cls, f in pipeline_fields():
        spec = {"type": SCHEMA_TYPES[value_type(f, cls)], "description": f.metadata["help"]}
        if f.default is not None:
            spec["default"] = f.default
        if "choices" in f.metadata:
            spec["enum"] = list(f.metadata["choices"])
        for key in ("minimum", "maximum", "exclusiveMinimum"):
            if key in f.metadata:
                spec[key] = f.metadata[key]
        spec.update(f.metadata.get("schema", {}))
        props[flag_name(f)] = spec
    return props


def replace_block(text: str, lines: list[str], where: Path) -> str:
    match = re.search(rf"^([ \t]*){re.escape(BEGIN)}\n.*?^[ \t]*{re.escape(END)}\n", text, re.M | re.S)
    if not match:
        raise SystemExit(f"{where}: markers '{BEGIN}' ... '{END}' not found")
    indent = match.group(1)
    block = "".join(f"{indent}{line}\n" for line in [BEGIN, *lines, END])
    return text[: match.start()] + block + text[match.end() :]


def argument_helper(cls, f) -> str:
    """The conf/modules.config function that renders the option: flag() for Click's on/off flags, which take no value."""
    return "flag" if value_type(f, cls) is bool else "opt"


def param_value(f) -> str:
    return NEXTFLOW_VALUES.get(flag_name(f), "params." + flag_name(f))


def rendered() -> dict[Path, str]:
    schema = json.loads(SCHEMA.read_text())
    schema["$defs"]["model_options"]["properties"] = schema_properties()
    names = [flag_name(f) for _, f in pipeline_fields()]
    width = max(25, max(len(n) for n in names) + 1)  # the column of the other params
    defaults = [f"{flag_name(f):<{width}}= {groovy(f.default)}" for _, f in pipeline_fields()]
    args = [f"{argument_helper(cls, f)}('--{flag_name(f).replace('_', '-')}', {param_value(f)})," for cls, f in pipeline_fields()]
    return {
        SCHEMA: json.dumps(schema, indent=4, ensure_ascii=False) + "\n",
        NEXTFLOW_CONFIG: replace_block(NEXTFLOW_CONFIG.read_text(), defaults, NEXTFLOW_CONFIG),
        MODULES_CONFIG: replace_block(MODULES_CONFIG.read_text(), args, MODULES_CONFIG),
    }


@click.command()
@click.option("--check", is_flag=True, help="Change nothing; exit 1 when a generated region is out of date.")
def main(check):
    stale = [path for path, text in rendered().items() if path.read_text() != text]
    if check:
        if stale:
            click.echo(f"out of date with src/scinv/config.py: {', '.join(str(p.relative_to(ROOT)) for p in stale)}; run `make options`", err=True)
            sys.exit(1)
        return
    for path, text in rendered().items():
        if path in stale:
            path.write_text(text)
            click.echo(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
