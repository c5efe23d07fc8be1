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


RETRY_PIPELINE = """
process KILLED_ONCE {
    label 'process_medium'
    output: stdout
    script:
    if (task.attempt == 1) "exit 137"
    else "echo attempt=${task.attempt} cpus=${task.cpus} memory=${task.memory.toGiga()}"
}
workflow { KILLED_ONCE().view() }
"""


def test_memory_kill_is_retried_and_local_requests_fit_the_machine(tmp_path):
    """The pipeline's config for real: exit 137 is retried once with more resources, capped to this machine."""
    import os

    (tmp_path / "main.nf").write_text(RETRY_PIPELINE)
    # the pipeline's whole configuration (nextflow.config and what it includes), default limits
    res = run_nextflow("run", "main.nf", "-c", str(ROOT / "nextflow.config"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "exited with 137 (out of memory or time?): retrying with more resources (attempt 2)" in res.stdout + res.stderr
    host_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
    # process_medium asks 6 CPUs x attempt and 36 GB x attempt: the local executor gets at most the host
    assert f"attempt=2 cpus={min(12, os.cpu_count())} memory={min(72, host_gb)}" in res.stdout
