"""Build of the optional native extension ``slice_kernels._C``.

* C++ CPU kernels (csrc/cpu/*.cpp) whenever a C++ compiler is there;
* CUDA kernels too (csrc/cuda/*.cu + csrc/cuda_glue/*.cpp) when torch was built with CUDA and nvcc is found.

Switches (flash-attention / torchao style):
  SLICE_KERNELS_SKIP_EXT=1           build no extension: the pure-Python package (also true/yes/on; 0/false/
                                     no/off/empty build it, any case; the same spellings as at import).
  SLICE_KERNELS_CUDA_ARCHS="90;80"   CUDA architectures to build for (default: the visible GPU's, else 80;90).
  SLICE_KERNELS_FORCE_CPU=1          build only the CPU kernels even when CUDA torch is present.
A failed build of the extension is an error of `pip install`; at import a missing or incompatible
extension only logs a fallback to the Python backends.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# No --use_fast_math: it turns tanhf into tanh.approx.f32 (relative error up to 2^-11 ≈ 5e-4), which breaks the
# float32 ≤ 1e-5 contract of the sign-consistency loss and its gradients, and flushes denormals to zero.
# tests/backends/test_gpu_paths.py compiles a kernel with these flags and checks the PTX.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]


def _torch_arch_list(archs: str) -> str:
    """ "90;80,90a" → "9.0;8.0;9.0a" (TORCH_CUDA_ARCH_LIST's spelling); "8.6" and "+PTX" pass unchanged."""
    out = []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip()
        digits = a.rstrip("abf")
        out.append(f"{digits[:-1]}.{digits[-1]}{a[len(digits) :]}" if len(digits) >= 2 and digits.isdigit() else a)
    return ";".join(x for x in out if x)


def _skip_ext() -> bool:
    """SLICE_KERNELS_SKIP_EXT as slice_kernels.extension reads it. An unrecognised value stops the build, unlike at
    import (a warning there): a build that guessed wrong costs minutes and its warning is lost in pip's log."""
    raw = os.environ.get("SLICE_KERNELS_SKIP_EXT")
    value = "" if raw is None else raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SystemExit(
        f"SLICE_KERNELS_SKIP_EXT={raw!r} is not recognised: use 1/true/yes/on to build no extension, "
        f"0/false/no/off/empty to build it (case-insensitive)"
    )


def _extensions():
    if _skip_ext():
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    rel = lambda pats: sorted(os.path.relpath(p, ROOT) for pat in pats for p in glob.glob(os.path.join(ROOT, pat)))
    cpu_sources = rel(["csrc/bindings.cpp", "csrc/cpu/*.cpp"])
    # -fno-math-errno, as torch itself is built: no code here reads errno, and with it GCC keeps sqrt a scalar
    # libm call that stops a loop from vectorizing (csrc/cpu/gorp_update.cpp).
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    with_cuda = (
        torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("SLICE_KERNELS_FORCE_CPU") != "1"
    )
    if with_cuda:
        archs = os.environ.get("SLICE_KERNELS_CUDA_ARCHS")
        if archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = _torch_arch_list(archs)
        elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch would otherwise build for every architecture it knows (slow, and sm_50-era ones are useless)
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = CUDAExtension(
            "slice_kernels._C",
            cpu_sources + rel(["csrc/cuda/*.cu", "csrc/cuda_glue/*.cpp"]),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx + ["-DSK_WITH_CUDA"], "nvcc": list(NVCC_FLAGS)},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "slice_kernels._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
