"""What an initializer returns and reports (SPEC §1: γ, cos, D, N_p, N_c, per-layer ‖G̃‖, time and peak memory
of each phase)."""

from __future__ import annotations

import math
import resource
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class InitReport:
    """What the initializer did. ``gamma``/``cos`` are the global figures (None with per-module scope);
    ``variant`` says which surgery ran (``surgery.describe_variant``: its ``name``, whether it was ``applied``,
    the gate, τ, the strength, the replay selection, the SVD slices)."""

    method: str
    gamma: float | None = None
    cos: float | None = None
    D: float | None = None
    Np: float | None = None
    Nc: float | None = None
    layers: dict = field(default_factory=dict)  # name -> per-layer figures
    phases: dict = field(default_factory=dict)  # phase -> {"seconds", "peak_bytes", "memory"}
    backends: dict = field(default_factory=dict)  # op -> backend that ran it
    variant: dict = field(default_factory=dict)  # the surgery variant and its settings

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class InitResult:
    A: dict  # name -> (r, n) in the adapter dtype
    B: dict  # name -> (m, r) in the adapter dtype
    weights: dict  # name -> absorbed W (m, n) in W's dtype
    scaling: float
    report: InitReport


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@contextmanager
def timed_phase(report: InitReport, name: str, device: torch.device):
    """Time a phase and record its peak memory: the CUDA allocator's peak on GPU, the process's RSS
    high-water mark on CPU (monotonic, so it reads as 'peak so far')."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize(device)
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"
    report.phases[name] = {"seconds": time.perf_counter() - t0, "peak_bytes": int(peak), "memory": kind}


def warn_zero_gradient(report: InitReport, names) -> None:
    """Warn about the layers whose gradient after surgery was exactly zero (they got the vanilla LoRA init)."""
    zero = [n for n in names if report.layers[n].get("zero_gradient")]
    if zero:
        warnings.warn(
            f"{len(zero)} layer(s) had an exactly zero gradient after surgery and got the vanilla LoRA init "
            f"(A random, B = 0, no offset): {zero[:5]}{'…' if len(zero) > 5 else ''}. They receive no gradient "
            f"from the task loss: check the target modules or the batches.",
            stacklevel=3,
        )
