import os
import re
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
    lines = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def copy_example(tmp_path: Path) -> Path:
    dst = tmp_path / "liao2020"
    shutil.copytree(ROOT / "assets" / "liao2020", dst)
    return dst


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--no-first-run",
    "--virtual-time-budget=15000",
]
RENDER_PROBE = (
    "<script>window.addEventListener('load',()=>{document.body.setAttribute('data-rendered',"
    "Array.from(document.images).map(i=>i.complete?i.naturalWidth+'x'+i.naturalHeight:'0x0').join(' '))});</script>"
)


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed for the report test: run `make setup` (installs the Debian 'chromium' package)")


def render_in_chromium(html_file: Path, workdir: Path) -> tuple[list[tuple[int, int]], Path]:
    """Open a copy of an HTML file in headless Chromium; the (width, height) each <img> decoded to, and a screenshot."""
    probe = workdir / "probe.html"
    probe.write_text(html_file.read_text() + RENDER_PROBE)
    common = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180)
    found = re.search(r'data-rendered="([^"]*)"', dom.stdout)
    assert found, dom.stderr[-2000:]
    sizes = [tuple(int(v) for v in s.split("x")) for s in found.group(1).split()]
    shot = workdir / "report.png"
    subprocess.run([*common, "--window-size=1280,4000", f"--screenshot={shot}", html_file.as_uri()], capture_output=True, timeout=180)
    return sizes, shot
