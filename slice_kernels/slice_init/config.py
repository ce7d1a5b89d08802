"""``SliceConfig``: every choice of SPEC §1, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import SliceConfigError

METHODS = ("slice", "lora_ga", "lora_ga_peft", "loram", "lora")
SCOPES = ("global", "per_module")
# "top_r_no_sigma" is the reference's ``svd_selection="top_r_no_sigma"`` (cl_lora/slice/decompose.py)
DIRECTIONS = ("A2rBr", "ArB2r", "top_r_no_sigma")
SCALES = ("variance", "stable", "unit")
SVDS = ("randomized", "exact")
REPLAY_MODES = ("per_task", "pooled")
# PEFT's LoraGAConfig choices (peft/tuners/lora/config.py), read by method "lora_ga_peft" only: PEFT's formulas
# under PEFT's names, kept apart from SLICE's ``direction``/``scale`` whose same-named values mean other formulas
PEFT_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
PEFT_SCALES = ("stable", "weight_svd", "gd_scale", "unit")
PEFT_DEFAULTS = {"peft_direction": "ArB2r", "peft_scale": "stable", "peft_stable_gamma": 16.0}

BOOL_FIELDS = (
    "offload_gradients",
    "collect_train_mode",
    "grad_project",
    "grad_project_always",
    "add_retain_grad",
    "magnitude_preserve",
    "per_layer_threshold",
    "single_retain_task_mode",
)

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
        direction: "A2rBr" (B₀ = U[:, :r], A₀ = V[:, r:2r]ᵀ, the paper's), "ArB2r" (LoRA-GA's) or
            "top_r_no_sigma" (B₀ = U[:, :r], A₀ = V[:, :r]ᵀ: the top r singular vectors on both sides, σ
            dropped; the reference's ``svd_selection="top_r_no_sigma"``, whose ``"lora_ga"`` is "A2rBr"). Needs
            only r ≤ min(m, n) and the top r triplets; B₀A₀ = U_r·V_rᵀ ≠ 0, absorbed like the others.
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
        peft_direction, peft_scale, peft_stable_gamma: PEFT's ``LoraGAConfig.direction / scale / stable_gamma``
            with PEFT's formulas (docs/peft_compat.md), read by method "lora_ga_peft" only and refused at a
            non-default value with any other method. Directions (U, S, V the top 2r triplets of G): "ArB2r"
            A = V[:, :r]ᵀ, B = U[:, r:2r]·diag(S[r:2r]); "A2rBr" A = V[:, r:2r]ᵀ, B = U[:, :r]·diag(S[:r]);
            "ArBr" A = rows 1, 3, … of Vᵀ, B = columns 0, 2, … of U times their S; "random" r of the 2r
            indices drawn by a generator seeded by (seed, layer name), A = Vᵀ[idx], B = U[:, idx]·diag(S[idx]).
            Scales: "stable" B·rows^¼/√peft_stable_gamma (rows = the stored weight.shape[0]), "weight_svd"
            B·σ₁(W)/S_B[0], "gd_scale" A/s and B/s (s the LoRA scaling), "unit" none.

    Surgery variants of the authors' code (RamiroNB/slice, ``SliceInitConfig`` in cl_lora/slice/config.py;
    the names are the reference's, whose "retain" gradient is this package's replay gradient G_prev). They
    are read by method "slice" only (the other methods ignore them, as they ignore ``projection_strength``);
    every default keeps the paper's surgery of SPEC §1 step 4. With γ the projection coefficient of step 4:

        grad_project: True (the default here): the conflict-gated projection G̃ = G_cur + γ·G_prev. False:
            the reference's other combination, the plain difference G̃ = G_cur − λ·G_prev with λ =
            ``retain_scale`` for every layer, no gate (the reference's own default is False).
        retain_scale: λ of the plain difference (finite; only with ``grad_project=False``).
        grad_project_always: project whatever the cosine (OGD-like): γ = −c·D/(N_p + ε) also when D ≥ 0 or
            cos ≥ τ. Replaces the gate, so it refuses ``conflict_threshold`` ≠ 0 and ``per_layer_threshold``.
        add_retain_grad: add the replay gradient back after the projection: G̃ = G_cur + γ·G_prev + G_prev,
            on every layer, also where the gate kept γ = 0 (as the reference does).
        magnitude_preserve: rescale the projected G̃_ℓ of each layer to ‖G_cur,ℓ‖ (per layer in both scopes,
            only where the projection acted, before ``add_retain_grad``; a G̃_ℓ with ‖G̃_ℓ‖ < ε or 0 is kept).
        per_layer_threshold: per-layer gate by the median cosine: τ_ℓ = median_ℓ cos_ℓ − delta for every layer
            (median = sorted(cos)[L // 2], the reference's upper median), projection where cos_ℓ < τ_ℓ. Needs
            ``projection_scope="per_module"`` (the reference refuses it in global mode) and replaces
            ``conflict_threshold`` (which must stay 0).
        per_layer_threshold_delta: delta of the median gate (only with ``per_layer_threshold``).
        retain_batch_size: examples per replay batch; None keeps the caller's batches as they are. Set, the
            rows of each replay stream are regrouped in order into batches of exactly this many examples
            (dict batches of tensors; rows of unequal length right-padded: ``labels`` −100,
            ``attention_mask`` 0, other tensors 0) and ``replay_steps`` of them are averaged: batch size and
            batch count (the reference's ``retain_batch_size`` and ``retain_grad_accum``) are separate.
        single_retain_task_mode: replay only the most recent earlier task (the last entry of the per-task
            ``replay`` list, oldest first: task t−1; the reference's ``retain_tasks[-1]``) with the current
            task's batch count (``current_steps``, as the reference uses ``max_steps``); needs
            ``replay_mode="per_task"`` and refuses ``retain_batch_size`` (the reference ignores it there).
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
    # surgery variants of the reference (see the docstring); the defaults are the paper's surgery
    grad_project: bool = True
    retain_scale: float = 1.0
    grad_project_always: bool = False
    add_retain_grad: bool = False
    magnitude_preserve: bool = False
    per_layer_threshold: bool = False
    per_layer_threshold_delta: float = 0.0
    retain_batch_size: int | None = None
    single_retain_task_mode: bool = False
    # PEFT's LoraGAConfig options, read by "lora_ga_peft" only (see the docstring)
    peft_direction: str = "ArB2r"
    peft_scale: str = "stable"
    peft_stable_gamma: float = 16.0

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
        choice("peft_direction", PEFT_DIRECTIONS)
        choice("peft_scale", PEFT_SCALES)
        number("peft_stable_gamma", 1e-12)
        number("projection_strength", 0.0, 1.0)
        number("conflict_threshold", -1.0, 1.0)
        number("svd_niter", 0, 64, integer=True)
        number("svd_sketch", 1, 1 << 20, integer=True, allow_none=True)
        number("current_steps", 1, 1 << 20, integer=True)
        number("replay_steps", 1, 1 << 20, integer=True)
        number("seed", 0, 2**63 - 1, integer=True)
        number("stable_gamma", 1e-12)
        number("eps", 0.0, 1.0)
        number("retain_scale")
        number("per_layer_threshold_delta", -2.0, 2.0)
        number("retain_batch_size", 1, 1 << 20, integer=True, allow_none=True)
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise SliceConfigError(f"SliceConfig.{name}={getattr(self, name)!r} must be True or False")
        self._validate_variants()
        if self.method != "lora_ga_peft":
            # these are PEFT's formulas: on another method they would silently do nothing
            set_ = [f"{k}={getattr(self, k)!r}" for k, d in PEFT_DEFAULTS.items() if getattr(self, k) != d]
            if set_:
                raise SliceConfigError(
                    f"SliceConfig: {', '.join(set_)} are PEFT's LoRA-GA options, read by method='lora_ga_peft' "
                    f"only (method is {self.method!r}); set method='lora_ga_peft', or use direction/scale/"
                    f"stable_gamma for the {self.method!r} formulas"
                )
        else:
            slice_set = [
                f"{k}={getattr(self, k)!r}"
                for k, d in (("direction", "A2rBr"), ("scale", "variance"), ("stable_gamma", 16.0))
                if getattr(self, k) != d
            ]
            if slice_set:
                raise SliceConfigError(
                    f"SliceConfig: method='lora_ga_peft' reads PEFT's options peft_direction/peft_scale/"
                    f"peft_stable_gamma, not SLICE's {', '.join(slice_set)} (same names, other formulas); "
                    f"set the peft_* fields instead"
                )

    def _validate_variants(self) -> None:
        """Refuse combinations in which an option would do nothing (the reference ignores some silently)."""

        def refuse(msg):
            raise SliceConfigError(f"SliceConfig: {msg}")

        if not self.grad_project:
            acting = [
                f"{k}={getattr(self, k)!r}"
                for k, default in (
                    ("grad_project_always", False),
                    ("add_retain_grad", False),
                    ("magnitude_preserve", False),
                    ("per_layer_threshold", False),
                    ("projection_strength", 1.0),
                    ("conflict_threshold", 0.0),
                    ("projection_scope", "global"),
                )
                if getattr(self, k) != default
            ]
            if acting:
                refuse(
                    f"{', '.join(acting)} shape the projection, but grad_project=False combines the gradients by "
                    f"the plain difference G_cur − retain_scale·G_prev; set grad_project=True or drop them"
                )
        elif self.retain_scale != 1.0:
            refuse(
                f"retain_scale={self.retain_scale!r} is λ of the plain difference G_cur − λ·G_prev, which runs "
                f"only with grad_project=False (the projection is on)"
            )
        if self.grad_project_always and (self.conflict_threshold != 0.0 or self.per_layer_threshold):
            refuse(
                "grad_project_always=True projects whatever the cosine, so there is no gate for "
                "conflict_threshold / per_layer_threshold to set; drop one of them"
            )
        if self.per_layer_threshold:
            if self.projection_scope != "per_module":
                refuse(
                    "per_layer_threshold=True gates each layer by the median of the per-layer cosines, which "
                    "has no global form: set projection_scope='per_module'"
                )
            if self.conflict_threshold != 0.0:
                refuse(
                    f"per_layer_threshold=True replaces conflict_threshold by median(cos) − "
                    f"per_layer_threshold_delta; leave conflict_threshold at 0 (got {self.conflict_threshold!r})"
                )
        elif self.per_layer_threshold_delta != 0.0:
            refuse("per_layer_threshold_delta is read only with per_layer_threshold=True")
        if self.single_retain_task_mode:
            if self.replay_mode != "per_task":
                refuse(
                    "single_retain_task_mode=True picks the last task of the per-task replay list; a pooled "
                    "stream has no tasks to pick from: set replay_mode='per_task'"
                )
            if self.retain_batch_size is not None:
                refuse(
                    "single_retain_task_mode=True replays the last task like the current one (its batches, "
                    "current_steps of them), as the reference does; drop retain_batch_size"
                )

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

    @property
    def svd_rank_factor(self) -> int:
        """Singular triplets needed per rank: 2 for the disjoint slices (2r), 1 for ``top_r_no_sigma``."""
        return 1 if (self.direction == "top_r_no_sigma" and self.method in ("slice", "lora_ga")) else 2

    @property
    def effective_replay_steps(self) -> int:
        """Batches averaged per replayed task: ``current_steps`` in ``single_retain_task_mode``."""
        return self.current_steps if self.single_retain_task_mode else self.replay_steps
