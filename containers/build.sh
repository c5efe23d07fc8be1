#!/usr/bin/env bash
# Build the CPU and (optionally) CUDA images, tagged with the package version.
#   containers/build.sh                    # CPU image scinv:<version> from python:3.11-slim-bookworm
#   containers/build.sh --cuda             # also scinv-cuda:<version> from a PyTorch CUDA runtime
#   BASE_IMAGE=... CUDA_BASE_IMAGE=... TORCH_INDEX_URL=... containers/build.sh
#   TRUST_HOST_CA=1 containers/build.sh    # builds behind a TLS-intercepting proxy
#   DOCKERFILE=path containers/build.sh    # another Dockerfile (benchmarks/bench_image_disk.py compares two)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml")"
base="${BASE_IMAGE:-python:3.11-slim-bookworm}"
cuda_base="${CUDA_BASE_IMAGE:-pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime}"
extra_ca="$root/containers/extra-ca"
find "$extra_ca" -name '*.crt' -delete
if [ "${TRUST_HOST_CA:-0}" = 1 ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$extra_ca/host-bundle.crt"
fi
build() {  # tag base
    # --force-rm: a step that fails (e.g. out of disk while committing) leaves no 7 GB container behind
    docker build --force-rm --network host -f "${DOCKERFILE:-$root/containers/Dockerfile}" \
        --build-arg BASE_IMAGE="$2" --build-arg SCINV_VERSION="$version" \
        --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-}" -t "$1:$version" "$root"
}
build scinv "$base"
if [ "${1:-}" = "--cuda" ]; then
    build scinv-cuda "$cuda_base"
fi
find "$extra_ca" -name '*.crt' -delete
echo "built scinv:$version${1:+ and scinv-cuda:$version}"
