"""Shared timing helpers for every ``benches/bench_*.py`` (any engineer may import them).

* ``median_time(fn, ...)``  – median wall time of ``fn()`` after warm-up, with CUDA synchronization;
* ``copy_bandwidth(device)`` – measured bytes/s of a large ``copy_`` (read + write), the memory roofline;
* ``matmul_rate(device)``   – measured FLOP/s of a large float32 matmul, the compute roofline;
* ``floor_seconds(bytes_moved, flops, bw, rate)`` – the larger of bytes/bandwidth and FLOPs/rate;
* ``machine()`` – a one-line description (device name, CPU, torch version, date) for result tables;
* ``print_table(rows, columns)`` – a Markdown table, ready for benches/RESULTS.md;
* ``StreamTable`` – the same table printed row by row as each is measured, so a run cut off by a time limit
  (benches/gpu_all.sh gives each step one) still leaves every finished row in its log.

Import from a bench script run as ``python benches/bench_x.py``: ``sys.path`` holds ``benches/`` then, so
``from common import median_time`` works (pytest-benchmark suites do the same through rootdir/benches).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object], device="cpu", *, warmup: int = 2, repeats: int = 7, min_seconds: float = 0.0
) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` timed calls after ``warmup`` untimed ones (at least
    until ``min_seconds`` have been spent timing, for very short calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    spent = 0.0
    while len(times) < repeats or spent < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return statistics.median(times)


def copy_bandwidth(device="cpu", nbytes: int | None = None) -> float:
    """Bytes moved per second by ``dst.copy_(src)`` (counted as read + write) on a buffer far larger than
    the caches: 1 GiB per operand on CUDA, 256 MiB on CPU by default."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, warmup=2, repeats=5)
    return 2 * n * 4 / t


def matmul_rate(device="cpu", n: int | None = None, dtype=torch.float32) -> float:
    """FLOP/s of an n×n×n matmul (2n³ flops) in ``dtype``: 8192 on CUDA, 2048 on CPU by default."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, device, warmup=1, repeats=5)
    return 2 * n**3 / t


def floor_seconds(
    bytes_moved: float = 0.0, flops: float = 0.0, bandwidth: float = float("inf"), rate: float = float("inf")
) -> float:
    """The roofline floor: no implementation can beat max(bytes / bandwidth, flops / rate)."""
    return max(bytes_moved / bandwidth if bandwidth else 0.0, flops / rate if rate else 0.0)


def machine(device="cpu") -> str:
    device = torch.device(device)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if device.type == "cuda":
        what = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        what = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, {torch.get_num_threads()} torch threads"
    return f"{what}, torch {torch.__version__}, {when}"


def fmt_time(s: float) -> str:
    if s != s:  # NaN: not measured
        return "–"
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Print (and return) a Markdown table of ``rows`` restricted to ``columns``."""
    table = StreamTable(columns)
    for r in rows:
        table.add(r)
    return table.text()


class StreamTable:
    """A Markdown table printed (and flushed) one row at a time; the header comes with the first row, its
    columns from ``columns`` or else that row's keys. ``text()`` gives the whole table afterwards."""

    def __init__(self, columns: Sequence[str] | None = None):
        self.columns = list(columns) if columns is not None else None
        self.lines: list[str] = []

    def _emit(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def add(self, row: dict) -> None:
        if self.columns is None:
            self.columns = list(row)
        if not self.lines:
            self._emit("| " + " | ".join(self.columns) + " |")
            self._emit("|" + "|".join("---" for _ in self.columns) + "|")
        self._emit("| " + " | ".join(str(row.get(c, "")) for c in self.columns) + " |")

    def text(self) -> str:
        return "\n".join(self.lines)
