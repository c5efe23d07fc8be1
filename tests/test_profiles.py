"""Deployment profiles resolve to the right GPU settings for TRAIN_INVAE (nextflow config)."""

import re

import pytest

from conftest import ROOT, run_nextflow


def gpu_block(profile: str, tmp_path) -> str:
    res = run_nextflow("config", str(ROOT), "-profile", profile, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    match = re.search(r"withLabel:process_gpu \{(.*?)\n   \}", res.stdout, re.S)
    assert match, res.stdout
    return res.stdout, match.group(1)


@pytest.mark.parametrize(
    "profile, options, cluster, executor",
    [
        ("gpu,docker", "'--gpus all'", "null", None),
        ("docker,gpu", "'--gpus all'", "null", None),
        ("slurm,singularity,gpu", "'--nv'", "'--gres=gpu:1'", "slurm"),
        ("apptainer,gpu", "'--nv'", "null", None),
        ("awsbatch,gpu", "''", "null", "awsbatch"),
    ],
)
def test_gpu_profiles(tmp_path, profile, options, cluster, executor):
    full, block = gpu_block(profile, tmp_path)
    assert "use_gpu = true" in block and "accelerator = 1" in block
    assert "container = 'scinv-cuda:0.1.0'" in block
    assert f"containerOptions = {options}" in block
    assert f"clusterOptions = {cluster}" in block
    if executor:
        assert re.search(rf"^   executor = '{executor}'", full, re.M)


def test_without_gpu_profile_training_runs_on_cpu_image(tmp_path):
    res = run_nextflow("config", str(ROOT), "-profile", "docker", cwd=tmp_path)
    assert "use_gpu = true" not in res.stdout and "accelerator" not in res.stdout
    assert "container = 'scinv:0.1.0'" in res.stdout and "docker {\n   enabled = true" in res.stdout


def test_retry_on_memory_kill_is_configured(tmp_path):
    res = run_nextflow("config", str(ROOT), cwd=tmp_path)
    assert "maxRetries = 2" in res.stdout and "137" in res.stdout and "resourceLimits" in res.stdout
