"""nextflow_schema.json and nextflow.config describe the same parameters."""

import json
import re

from conftest import ROOT


def schema_params():
    schema = json.loads((ROOT / "nextflow_schema.json").read_text())
    return {name: spec for group in schema["$defs"].values() for name, spec in group["properties"].items()}


def config_params():
    text = (ROOT / "nextflow.config").read_text()
    block = text[text.index("params {") : text.index("}\n\nincludeConfig")]
    return dict(re.findall(r"^\s+(\w+)\s+=\s+(.+)$", block, re.M))


def test_every_config_param_is_documented_and_vice_versa():
    assert set(schema_params()) == set(config_params())


def test_defaults_agree():
    config = config_params()
    for name, spec in schema_params().items():
        value = config[name]
        if "default" not in spec:
            assert value == "null", name
        elif isinstance(spec["default"], bool):
            assert value == str(spec["default"]).lower(), name
        elif isinstance(spec["default"], str):
            assert value == f"'{spec['default']}'", name
        else:
            assert float(value) == float(spec["default"]), name
        assert spec.get("description"), name
