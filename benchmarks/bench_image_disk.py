"""Peak disk an image build takes on the Docker host, and the image's size.

CI builds the CPU image on a host whose disk also holds the test venv; a build that needs more than
the free space fails with "no space left on device" while Docker commits a layer. This script runs
`containers/build.sh` (from a clean state: no scinv image, no build cache) while it samples the free
space under Docker's root directory, and prints the peak the build took.

    .venv/bin/python benchmarks/bench_image_disk.py                      # containers/Dockerfile
    .venv/bin/python benchmarks/bench_image_disk.py --dockerfile old.Dockerfile

It removes the image `scinv:<version>` before and (unless --keep) after the build. Set BASE_IMAGE as
containers/docker-test.sh does where no registry is reachable (e.g. BASE_IMAGE=scinv-base:bookworm).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9  # decimal, as `docker images` prints


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True).stdout.strip()


def _free(path: str) -> int:
    return shutil.disk_usage(path).free


@click.command()
@click.option("--dockerfile", type=click.Path(exists=True, dir_okay=False), default=None, help="default: containers/Dockerfile")
@click.option("--keep", is_flag=True, help="keep the built image")
@click.option("--interval", default=0.5, show_default=True, help="seconds between disk samples")
def main(dockerfile: str | None, keep: bool, interval: float) -> None:
    version = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("version ="))
    tag = f"scinv:{version}"
    root_dir = _docker("info", "-f", "{{.DockerRootDir}}") or "/var/lib/docker"
    _docker("rmi", "-f", tag)
    _docker("builder", "prune", "-af")
    before = _free(root_dir)
    lowest = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            lowest[0] = min(lowest[0], _free(root_dir))
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    env = dict(os.environ, TRUST_HOST_CA=os.environ.get("TRUST_HOST_CA", "1"))
    if dockerfile:
        env["DOCKERFILE"] = str(Path(dockerfile).resolve())
    start = time.monotonic()
    build = subprocess.run([str(ROOT / "containers/build.sh")], env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    done.set()
    sampler.join()
    after = _free(root_dir)
    print(f"dockerfile       : {dockerfile or 'containers/Dockerfile'}")
    print(f"build            : {'ok' if build.returncode == 0 else f'FAILED (exit {build.returncode})'} in {seconds / 60:.1f} min")
    print(f"free before      : {before / GB:.1f} GB under {root_dir}")
    print(f"peak taken       : {(before - lowest[0]) / GB:.1f} GB (lowest free {lowest[0] / GB:.1f} GB)")
    print(f"left taken       : {(before - after) / GB:.1f} GB")
    if build.returncode == 0:
        size = int(_docker("image", "inspect", "-f", "{{.Size}}", tag) or 0)
        layers = _docker("history", "--format", "{{.Size}}\t{{.CreatedBy}}", tag).splitlines()
        print(f"image            : {size / GB:.2f} GB; largest layers:")
        for line in [line for line in layers if "GB" in line.split("\t")[0]]:
            print(f"  {line[:110]}")
        if not keep:
            _docker("rmi", "-f", tag)
    else:
        print(build.stdout[-3000:] + build.stderr[-3000:], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
