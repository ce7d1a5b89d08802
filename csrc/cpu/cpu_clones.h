// SK_CPU_CLONES: an AVX2 copy of a hot loop beside the baseline one, picked at load time (GCC/Clang
// target_clones, an ifunc). The extension is built for baseline x86-64 (SSE2), where float loops vectorize 4
// wide and float→double conversions 2 wide, while ATen's own kernels dispatch to AVX2 at run time; a wheel
// cannot assume AVX2, so the kernels carry both copies. Not "fma": contracting a·b + c would round differently
// from the other backends and from the emulated CUDA kernels the tests compare bit for bit.
// Put it on a non-inline function whose loop vectorizes, and mark what that loop calls always_inline: a helper
// left to the inliner stays an out-of-line default-target call, and the clone comes out scalar (the first AVX2
// copy of the sign-loss row loops did, and ran slower). Check the .avx2 copy for ymm registers with objdump.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define SK_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SK_CPU_CLONES
#endif
