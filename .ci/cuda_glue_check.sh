#!/usr/bin/env bash
# Syntax- and type-check the CUDA glue (csrc/cuda_glue/*.cpp) against the installed torch's headers and
# CUDA's, as the CUDA build compiles it (-DSK_WITH_CUDA). The CPU torch wheel ships the ATen/c10 CUDA headers
# but not libc10_cuda, so the glue can be compiled here but not linked: a wrong ATen call, a launcher
# signature that no longer matches its .cuh or a missing include fails CI instead of the GPU build.
# Skipped, with a message, when nvcc (for CUDA's include folder) is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" ]]; then echo "cuda_glue_check: nvcc not found, CUDA glue NOT checked"; exit 0; fi
# Where nvcc finds cuda_runtime.h (nvcc may be a wrapper script, so ask it rather than guess from its path).
# (No early-closing reader such as grep -m1 in the pipe: under pipefail its SIGPIPE would end the script.)
deps=$(echo '#include <cuda_runtime.h>' | "$NVCC" -x cu -M - 2>/dev/null) || deps=""
cuda_inc=$(tr ' \\' '\n\n' <<< "$deps" | awk '/\/cuda_runtime\.h$/ && !found { print; found = 1 }')
cuda_inc=${cuda_inc:+$(dirname "$cuda_inc")}
if [[ -z "$cuda_inc" ]]; then echo "cuda_glue_check: nvcc gives no cuda_runtime.h, CUDA glue NOT checked"; exit 1; fi
mapfile -t incs < <(python - <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths():
    print(p)
print(sysconfig.get_paths()["include"])
PY
)
# The CPU wheel lacks the one header its CUDA build generates; this is its content in the CUDA wheels.
shim=$(mktemp -d); trap 'rm -rf "$shim"' EXIT
if ! echo '#include <c10/cuda/impl/cuda_cmake_macros.h>' | "${CXX:-c++}" -x c++ -fsyntax-only \
     $(printf -- '-isystem %s ' "${incs[@]}") - 2>/dev/null; then
  mkdir -p "$shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$shim/c10/cuda/impl/cuda_cmake_macros.h"
fi
args=(-std=c++17 -fsyntax-only -Wall -Werror -DSK_WITH_CUDA -Icsrc -I"$cuda_inc" -isystem "$shim")
for p in "${incs[@]}"; do args+=(-isystem "$p"); done
shopt -s nullglob
for f in csrc/cuda_glue/*.cpp; do
  "${CXX:-c++}" "${args[@]}" "$f"
  echo "cuda_glue_check: ok $f"
done
