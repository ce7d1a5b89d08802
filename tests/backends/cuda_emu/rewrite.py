"""Rewrite a csrc/cuda/*.cu file into C++20 for the CUDA emulator of tests/backends/cuda_emu/fake/cuda_runtime.h.

Three constructs change; everything else is compiled as written (the fake headers define __global__,
__device__, threadIdx, __syncthreads and the rest):

* ``extern __shared__ T x[];`` becomes a pointer to the launch's dynamic shared memory;
* ``__shared__ T a, b[N];`` becomes function-local statics followed by a call that poisons them at the start of
  every block and counts their bytes;
* ``kernel<<<grid, block[, shmem[, stream]]>>>(args);`` becomes ``sk_launch(bound, grid, block, shmem, stream,
  [&] { kernel(args); });``, where ``bound`` is the first argument of the kernel's ``__launch_bounds__`` (its
  maximum threads per block; 1024 without one).

Comments are dropped first. Line numbers are kept (every replacement stays on the lines it replaces, and a
``#line`` names the original file), so a compiler error points at the .cu file. A construct it does not recognise
raises RewriteError naming the file and line rather than producing code that would test something else.
"""

from __future__ import annotations

import re

__all__ = ["RewriteError", "rewrite"]


class RewriteError(ValueError):
    pass


def _line(src: str, pos: int) -> int:
    return src.count("\n", 0, pos) + 1


def _split_top(text: str) -> list[str]:
    """Split on commas outside (), [] and {} (not <>: a comparison would unbalance them)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _strip_comments(src: str) -> str:
    """Comments blanked (newlines kept), so a '__shared__' or '<<<' in prose is not taken for code."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if c in "\"'":  # a string or character literal, copied as is
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            out.append(src[i : j + 1])
            i = j + 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * src.count("\n", i, j))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _match_forward(src: str, i: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket that closes the one at src[i]."""
    depth = 0
    for j in range(i, len(src)):
        if src[j] == open_ch:
            depth += 1
        elif src[j] == close_ch:
            depth -= 1
            if depth == 0:
                return j + 1
    return -1


_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:alignas\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:]*)\s+(\w+)\s*\[\s*\]\s*;"
)
_SHARED = re.compile(r"__shared__\s+([^;{}]*);")
_DECLARATOR = re.compile(r"^([A-Za-z_]\w*)\s*(\[[^\[\]]+\]\s*)*$")
_BOUNDS = re.compile(r"__launch_bounds__\s*\(([^()]*)\)\s*([A-Za-z_]\w*)\s*\(")


def _rewrite_shared(src: str, path: str) -> str:
    src = _EXTERN_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = static_cast<{m.group(1)}*>(sk_dyn_shared());", src
    )

    def one(m: re.Match) -> str:
        body = m.group(1).strip()
        tm = re.match(r"^([A-Za-z_][\w:]*)\s+(.+)$", body, re.S)
        if tm is None or tm.group(1) in ("const", "volatile", "extern", "static"):
            raise RewriteError(
                f"{path}:{_line(src, m.start())}: cannot rewrite the __shared__ declaration "
                f"'{m.group(0)}' (expected '__shared__ Type name[, name[N]];')"
            )
        names = []
        for d in _split_top(tm.group(2)):
            dm = _DECLARATOR.match(d)
            if dm is None:
                raise RewriteError(f"{path}:{_line(src, m.start())}: cannot rewrite the __shared__ declarator '{d}'")
            names.append(dm.group(1))
        regions = ", ".join(f"{{&{n}, sizeof({n})}}" for n in names)
        return f"static {body}; {{ static SkSharedSite sk_site_; sk_shared_decl(sk_site_, {{{regions}}}); }}"

    src = _SHARED.sub(one, src)
    if "__shared__" in src:
        raise RewriteError(f"{path}:{_line(src, src.index('__shared__'))}: a __shared__ use the rewriter does not know")
    return src


def _callee_start(src: str, end: int, path: str) -> int:
    """Start of the kernel expression (name, optional ::, optional template arguments) ending before `end`."""
    i = end
    while i > 0 and src[i - 1].isspace():
        i -= 1
    if src[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            if src[i] == ">":
                depth += 1
            elif src[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    j = i
    while j > 0 and (src[j - 1].isalnum() or src[j - 1] in "_:"):
        j -= 1
    if j == i:
        raise RewriteError(f"{path}:{_line(src, end)}: no kernel name before <<<")
    return j


def _rewrite_launches(src: str, path: str) -> str:
    # __launch_bounds__(max threads[, min blocks per SM]): only the first bounds a launch
    bounds = {name: _split_top(expr)[0] for expr, name in _BOUNDS.findall(src)}
    out, pos = [], 0
    while True:
        k = src.find("<<<", pos)
        if k < 0:
            out.append(src[pos:])
            break
        start = _callee_start(src, k, path)
        callee = src[start:k].strip()
        name = re.match(r"[\w:]+", callee).group(0).split("::")[-1]
        cfg_end = src.find(">>>", k)
        if cfg_end < 0:
            raise RewriteError(f"{path}:{_line(src, k)}: <<< without >>>")
        cfg = _split_top(src[k + 3 : cfg_end])
        if not 2 <= len(cfg) <= 4:
            raise RewriteError(f"{path}:{_line(src, k)}: a launch takes 2 to 4 configuration arguments, got {len(cfg)}")
        cfg += ["0", "nullptr"][len(cfg) - 2 :]
        p = cfg_end + 3
        while src[p].isspace():
            p += 1
        if src[p] != "(":
            raise RewriteError(f"{path}:{_line(src, k)}: expected the kernel's arguments after >>>")
        args_end = _match_forward(src, p, "(", ")")
        semi = args_end
        while semi < len(src) and src[semi].isspace():
            semi += 1
        if args_end < 0 or semi >= len(src) or src[semi] != ";":
            raise RewriteError(f"{path}:{_line(src, k)}: a launch must be a statement of its own ('...>>>(args);')")
        bound = bounds.get(name, "1024")
        # keep the original line breaks: config and arguments are copied as they were written
        out.append(src[pos:start])
        text = f"sk_launch({bound}, {', '.join(cfg)}, [&] {{ {callee}{src[p:args_end]}; }});"
        pos = semi + 1
        out.append(text + "\n" * (src.count("\n", start, pos) - text.count("\n")))
    return "".join(out)


def rewrite(src: str, path: str) -> str:
    """The emulator version of the CUDA source `src` (read from `path`, used in messages and #line)."""
    body = _rewrite_launches(_rewrite_shared(_strip_comments(src), path), path)
    if body.count("\n") != src.count("\n"):
        raise RewriteError(f"{path}: the rewrite changed the number of lines")  # error lines would be off
    return f'#include <cuda_runtime.h>\n#line 1 "{path}"\n{body}'
