#!/usr/bin/env bash
# Compile-check the plain-CUDA kernels (csrc/cuda/*.cu include no torch header), so a CUDA syntax or type
# error fails CI on a machine with no GPU and no CUDA torch. Skipped, with a message, when nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" ]]; then echo "nvcc_check: nvcc not found, CUDA kernels NOT compile-checked"; exit 0; fi
shopt -s nullglob
files=(csrc/cuda/*.cu)
if (( ${#files[@]} == 0 )); then echo "nvcc_check: no .cu files"; exit 0; fi
tmp=$(mktemp -d)
for f in "${files[@]}"; do
  "$NVCC" -std=c++17 -O1 -arch=sm_90 -Icsrc -Werror all-warnings -c "$f" -o "$tmp/$(basename "$f").o"
  echo "nvcc_check: ok $f"
done
rm -rf "$tmp"
