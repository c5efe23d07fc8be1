import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scinv.datasets import synthetic_counts

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "bin"
NEXTFLOW = ROOT / "tools" / "nextflow"


@pytest.fixture
def small_adata():
    return synthetic_counts(n_cells=600, n_genes=120, n_batches=3, n_types=4, seed=0)


def run_script(name: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run a bin/ Click script with the test interpreter (as Nextflow would, via PATH)."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([sys.executable, str(BIN / name), *args], capture_output=True, text=True, cwd=cwd, env=env)


def run_nextflow(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, NXF_ANSI_LOG="false")
    return subprocess.run([str(NEXTFLOW), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def one_error_line(stderr: str) -> str:
    """The single 'ERROR: ...' line a step prints for bad input (asserts there is exactly one)."""
    lines = [l for l in stderr.splitlines() if l.startswith("ERROR:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def copy_example(tmp_path: Path) -> Path:
    dst = tmp_path / "liao2020"
    shutil.copytree(ROOT / "assets" / "liao2020", dst)
    return dst
