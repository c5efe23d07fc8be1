"""Hyperparameters have one definition (scinv.config); the CLI, the pipeline and the library follow it."""

import subprocess
import sys
from dataclasses import asdict, fields

import click
import pytest

from conftest import ROOT
from scinv.config import CONFIGS, ModelConfig, PredictorConfig, TrainingConfig, exposed, flag_name
from scinv.model import InVAE


def test_pipeline_files_are_generated_from_the_dataclasses():
    """nextflow_schema.json, nextflow.config and conf/modules.config match scinv.config (make options)."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_options.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_boolean_pipeline_options_reach_the_cli_as_on_off_flags():
    """A boolean param becomes --name / --no-name (Click flags take no value), through flag() in modules.config."""
    text = (ROOT / "conf" / "modules.config").read_text()
    options = train_cli_options()
    booleans = [f for cls in CONFIGS for f in exposed(cls, "pipeline") if isinstance(f.default, bool)]
    assert booleans  # invariance_on_unlabelled at least
    for f in booleans:
        dashed = flag_name(f).replace("_", "-")
        assert f"flag('--{dashed}', params.{flag_name(f)})" in text
        assert options[f.name].is_flag and options[f.name].secondary_opts == [f"--no-{dashed}"]


def train_cli_options() -> dict[str, click.Option]:
    module = {}
    exec(compile((ROOT / "bin" / "scinv_train.py").read_text(), "scinv_train.py", "exec"), module)
    return {p.name: p for p in module["main"].params if isinstance(p, click.Option)}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_cli_options_are_the_dataclass_fields(cls):
    options = train_cli_options()
    for f in exposed(cls, "cli"):
        opt = options[flag_name(f)]
        assert opt.default == f.default and opt.help == f.metadata["help"], f.name
        assert opt.opts[0] == "--" + flag_name(f).replace("_", "-")
        if "choices" in f.metadata:
            assert list(opt.type.choices) == list(f.metadata["choices"])


def test_the_library_defaults_are_the_dataclass_defaults(small_adata):
    model = InVAE(small_adata, layer="counts", batch_key="batch", label_key="cell_type")
    assert model.hparams == asdict(ModelConfig())
    with pytest.raises(TypeError, match=r"unknown model option\(s\) \['n_latnt_inv'\].*fields of scinv.config.ModelConfig"):
        InVAE(small_adata, n_latnt_inv=3)
    with pytest.raises(TypeError, match=r"unknown training option\(s\) \['epochs'\]"):
        model.train(epochs=3)
    with pytest.raises(TypeError, match=r"unknown predictor option\(s\) \['irm'\]"):
        model.train_predictor(irm=1.0)


def test_every_field_is_documented_and_typed():
    for cls in CONFIGS:
        for f in fields(cls):
            assert f.metadata.get("help", "").endswith("."), f"{cls.__name__}.{f.name}"
    assert {f.name for f in exposed(PredictorConfig, "pipeline")} == {"max_epochs", "irm_weight"}
    assert TrainingConfig().kl_warmup_epochs is None  # 20 on a first train(), 0 when continuing


def test_weight_decay_reaches_the_optimiser(small_adata):
    """The example of adding a pipeline option (--weight_decay): one field, `make options`, this test."""
    from scinv.training import Trainer

    model = InVAE(small_adata, layer="counts", batch_key="batch", label_key="cell_type")
    trainer = Trainer(model.module, model._data, TrainingConfig(weight_decay=0.5), model.device)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.5
    text = (ROOT / "conf" / "modules.config").read_text()
    assert "opt('--weight-decay', params.weight_decay)" in text and "--weight-decay" in {o.opts[0] for o in train_cli_options().values()}


def test_default_epochs_scale_with_the_number_of_cells(small_adata):
    """Unset max_epochs: 200 up to 40k cells, then round(8e6 / cells), as scvi-tools scales its default."""
    from scinv.training import Trainer, default_max_epochs

    assert [default_max_epochs(n) for n in (600, 40_000, 100_000, 1_000_000, 10**8)] == [200, 200, 80, 8, 1]
    model = InVAE(small_adata, layer="counts", batch_key="batch", label_key="cell_type")
    assert Trainer(model.module, model._data, TrainingConfig(), model.device).config.max_epochs == 200
    assert Trainer(model.module, model._data, TrainingConfig(max_epochs=7), model.device).config.max_epochs == 7
