"""``SliceConfig``: every choice of SPEC §1, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import SliceConfigError

METHODS = ("slice", "lora_ga", "lora_ga_peft", "loram", "lora")
SCOPES = ("global", "per_module")
DIRECTIONS = ("A2rBr", "ArB2r")
SCALES = ("variance", "stable", "unit")
SVDS = ("randomized", "exact")
REPLAY_MODES = ("per_task", "pooled")

# Methods that need the current task's gradient, and the one that also reads the replay gradient.
GRADIENT_METHODS = ("slice", "lora_ga", "lora_ga_peft")


@dataclass
class SliceConfig:
    """How to initialize a LoRA adapter (SPEC §1). Defaults are the SLICE paper's.

    Attributes:
        method: "slice" (gradient surgery against the replay gradient, then truncated SVD), "lora_ga"
            (SVD of the current gradient only), "lora_ga_peft" (PEFT's ``init_lora_weights="lora_ga"``
            defaults exactly: ArB2r, B·diag(S[r:2r])·m^¼/√16, A unscaled), "loram" (deterministic DST-I
            bases, no gradients) or "lora" (PEFT's default: Kaiming-uniform A, B = 0).
        projection_strength: c ∈ [0, 1], how much of the conflicting replay component is removed.
        projection_scope: "global" (one γ from sums over all target layers, the paper's) or "per_module".
        conflict_threshold: τ ∈ [-1, 1]; surgery runs only when cos(G_cur, G_prev) < τ.
        direction: "A2rBr" (B₀ = U[:, :r], A₀ = V[:, r:2r]ᵀ, the paper's) or "ArB2r" (LoRA-GA's).
        scale: "variance" (Var(BA) = ρ·Var(W), the paper's), "stable" (LoRA-GA's m^¼/√γ_s) or "unit".
        svd: "randomized" (sketch + power iterations, the paper's) or "exact" (full SVD).
        svd_niter: power iterations of the randomized SVD.
        svd_sketch: sketch columns q; None means min(4r, min(m, n)).
        current_steps: batches of the current task averaged into G_cur (S_cur).
        replay_steps: batches per earlier task (or of the pooled stream) averaged into G_prev (S_prev).
        replay_mode: "per_task" (each earlier task weighted equally) or "pooled" (one stream).
        seed: seeds every random choice (sketches, Kaiming init), mixed with the layer name.
        stable_gamma: γ_s of the "stable" scale.
        eps: ε in γ = −c·D/(N_p + ε).
        offload_gradients: keep the float32 gradient accumulators in CPU memory during collection.
        collect_train_mode: collect gradients in train mode (dropout on, as PEFT's LoRA-GA); the default
            eval mode makes the init a deterministic function of (weights, batches, seed).
    """

    method: str = "slice"
    projection_strength: float = 1.0
    projection_scope: str = "global"
    conflict_threshold: float = 0.0
    direction: str = "A2rBr"
    scale: str = "variance"
    svd: str = "randomized"
    svd_niter: int = 4
    svd_sketch: int | None = None
    current_steps: int = 8
    replay_steps: int = 8
    replay_mode: str = "per_task"
    seed: int = 0
    stable_gamma: float = 16.0
    eps: float = 1e-12
    offload_gradients: bool = False
    collect_train_mode: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def choice(name, allowed):
            v = getattr(self, name)
            if v not in allowed:
                raise SliceConfigError(f"SliceConfig.{name}={v!r} is not one of {', '.join(map(repr, allowed))}")

        def number(name, lo=-math.inf, hi=math.inf, integer=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok_type or not math.isfinite(v) or not (lo <= v <= hi):
                kind = "an integer" if integer else "a finite number"
                raise SliceConfigError(f"SliceConfig.{name}={v!r} must be {kind} in [{lo}, {hi}]")

        choice("method", METHODS)
        choice("projection_scope", SCOPES)
        choice("direction", DIRECTIONS)
        choice("scale", SCALES)
        choice("svd", SVDS)
        choice("replay_mode", REPLAY_MODES)
        number("projection_strength", 0.0, 1.0)
        number("conflict_threshold", -1.0, 1.0)
        number("svd_niter", 0, 64, integer=True)
        number("svd_sketch", 1, 1 << 20, integer=True, allow_none=True)
        number("current_steps", 1, 1 << 20, integer=True)
        number("replay_steps", 1, 1 << 20, integer=True)
        number("seed", 0, 2**63 - 1, integer=True)
        number("stable_gamma", 1e-12)
        number("eps", 0.0, 1.0)
        for name in ("offload_gradients", "collect_train_mode"):
            if not isinstance(getattr(self, name), bool):
                raise SliceConfigError(f"SliceConfig.{name}={getattr(self, name)!r} must be True or False")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SliceConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SliceConfigError(f"unknown SliceConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @property
    def uses_gradients(self) -> bool:
        return self.method in GRADIENT_METHODS

    @property
    def uses_replay(self) -> bool:
        return self.method == "slice"
