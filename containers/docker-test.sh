#!/usr/bin/env bash
# Build the CPU image and run `-profile test,docker`, then compare with a local run.
# Starts a Docker engine if none is running (Debian docker.io). Without access to Docker Hub it
# builds the base image locally (debootstrap Debian bookworm + docker import) and trusts the
# host's CA bundle inside the build. `make docker-test` calls this; so does CI.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${DOCKER_TEST_DIR:-$root/.docker-test}"
mkdir -p "$out"
log() { echo "[docker-test] $*" >&2; }

ensure_engine() {
    docker info >/dev/null 2>&1 && return 0
    if ! command -v dockerd >/dev/null; then
        log "installing docker.io"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
    fi
    log "starting dockerd (log: $out/dockerd.log)"
    (dockerd --iptables=false --bridge=none >"$out/dockerd.log" 2>&1 &)
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
    log "dockerd did not start; see $out/dockerd.log"; exit 1
}

base_image() {
    local public="python:3.11-slim-bookworm" local_base="scinv-base:bookworm"
    if [ -n "${BASE_IMAGE:-}" ]; then echo "$BASE_IMAGE"; return; fi
    if docker image inspect "$public" >/dev/null 2>&1 || timeout 60 docker pull -q "$public" >/dev/null 2>&1; then
        echo "$public"; return
    fi
    if ! docker image inspect "$local_base" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
        local mirror
        mirror="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)"
        mirror="${mirror:-http://deb.debian.org/debian}"
        log "no registry: building $local_base with debootstrap from $mirror"
        rm -rf "$out/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,procps,ca-certificates bookworm "$out/rootfs" "$mirror" >"$out/debootstrap.log" 2>&1
        tar -C "$out/rootfs" -c . | docker import - "$local_base" >/dev/null
        rm -rf "$out/rootfs"
    fi
    echo "$local_base"
}

ensure_engine
base="$(base_image)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
# PyPI's torch brings the CUDA libraries: the image is 7.6 GB and its build takes 10.4 GB of free
# disk at its peak (benchmarks/bench_image_disk.py); CI ran out of disk here twice. A failed
# build's cache is dropped first.
docker builder prune -f >/dev/null 2>&1 || true
root_dir="$(docker info -f '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)"
free_gb() { df -Pk "$root_dir" | awk 'NR==2 {print int($4 * 1024 / 1e9)}'; }
log "free disk under $root_dir: $(free_gb) GB (the build takes ~10.5 GB)"
[ "$(free_gb)" -ge 11 ] || log "warning: less than 11 GB free; the build may fail with 'no space left on device' (docker system prune frees old images)"
log "building scinv:$version from $base"
previous="$(docker image inspect -f '{{.Id}}' "scinv:$version" 2>/dev/null || true)"
BASE_IMAGE="$base" TRUST_HOST_CA=1 containers/build.sh >"$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log"; log "build failed; free disk under $root_dir now $(free_gb) GB"; df -h / "$root_dir" >&2; exit 1; }
# a rebuild leaves the previous image untagged (~7.6 GB each): reruns on one host filled its disk
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "scinv:$version")" ]; then
    docker rmi "$previous" >/dev/null 2>&1 || log "could not remove the previous image $previous (in use?)"
fi

log "running -profile test,docker"
tools/nextflow run main.nf -profile test,docker --outdir "$out/results-docker" -work-dir "$out/work-docker" >"$out/run-docker.log" 2>&1 \
    || { tail -40 "$out/run-docker.log"; exit 1; }
if [ ! -f "$out/results-local/report/scinv_report.html" ]; then
    log "running -profile test locally for comparison"
    tools/nextflow run main.nf -profile test --outdir "$out/results-local" -work-dir "$out/work-local" >"$out/run-local.log" 2>&1 \
        || { tail -40 "$out/run-local.log"; exit 1; }
fi
.venv/bin/python - "$out" <<'PY'
import sys, anndata as ad, pandas as pd
out = sys.argv[1]
d = ad.read_h5ad(f"{out}/results-docker/export/scinv_integrated.h5ad", backed="r")
l = ad.read_h5ad(f"{out}/results-local/export/scinv_integrated.h5ad", backed="r")
assert d.shape == l.shape, f"cells x genes differ: docker {d.shape}, local {l.shape}"
md = pd.read_csv(f"{out}/results-docker/metrics/scinv_metrics.csv", index_col=0)
ml = pd.read_csv(f"{out}/results-local/metrics/scinv_metrics.csv", index_col=0)
assert set(md.index) == set(ml.index) and {"X_harmony", "X_scvi"} <= set(md.index), f"embeddings differ: {list(md.index)} vs {list(ml.index)}"
td = pd.read_csv(f"{out}/results-docker/metrics/scinv_label_transfer.csv", index_col=0)
tl = pd.read_csv(f"{out}/results-local/metrics/scinv_label_transfer.csv", index_col=0)
assert ((td["accuracy"] - tl["accuracy"]).abs() <= 0.05).all(), "label transfer differs by more than 0.05"
diff = (md - ml).abs()
print(f"[docker-test] {d.n_obs} cells x {d.n_vars} genes in both runs")
print(f"[docker-test] metric differences docker vs local (max per row):\n{diff.max(axis=1).to_string()}")
assert (diff[["Total", "Bio conservation", "Batch correction"]] <= 0.05).all().all(), "metrics differ by more than 0.05"
print("[docker-test] OK: same cells and genes, metrics within 0.05")
PY
