"""GORP: AdamW in a low-rank gradient subspace, orthogonal to earlier tasks' shared spaces (SPEC §4).

``GorpAdamW`` takes parameter groups of three kinds (the ``kind`` key of a group):

* ``"lowrank"`` – full-rank weights W (m×n) trained in a rank-r gradient subspace. Every ``update_proj_gap``
  steps the projector is refreshed from the top-r singular vectors of the current gradient G (``svd``:
  ``"randomized"``, the default, with a sketch seeded by (seed, parameter name, refresh index), so a resumed
  run draws the same sketch; or ``"exact"``, ``torch.linalg.svd`` as the reference code takes it): if m ≥ n,
  Q (r×n) from the right vectors and g = G·Qᵀ (m×r); else U (m×r) and g = Uᵀ·G (r×n).
* ``"lora_a"`` – LoRA A matrices (r×n): g = G, no projection (A is already low-rank).
* ``"adamw"`` – everything else (LoRA B, biases, norms): plain AdamW.

Shared space S (orthonormal columns). For a ``lowrank`` weight it lives on the side of g that the projector
does not touch, which is also g's long side: the rows (dimension m) when m ≥ n (g = G·Qᵀ is m×r, its rows are
W's output space), the columns (dimension n) when m < n (g = Uᵀ·G is r×n, its columns are W's input space).
Because that side is never rotated by a projector refresh, S stays meaningful across refreshes and tasks.
Orthogonalization: g ← g − S·Sᵀ·g on the row side, g ← g − g·S·Sᵀ on the column side. For LoRA A (r×n) the
side is the option ``lora_a_space``: ``"rank"`` (default, the reference code's: S in R^r, grown from the left
singular vectors of A's r×n moment, g ← g − S·Sᵀ·g) or ``"input"`` (S in R^n, A's input space: A's gradient is
Bᵀ·δ·xᵀ, whose rows lie in the span of the inputs x, and an update of A whose rows avoid an earlier task's
input directions leaves that task's B·A·x unchanged — GPM's argument). B is unconstrained (SPEC §4).

The step (SPEC §4): g is orthogonalized, the Adam moments (in g's shape, never rotated on refresh) are
updated, u = m̂ / (√v̂ + eps) (``eps_mode="torch"``, torch's AdamW) or u = m̂ / (√v̂ + eps/√(1 − β2^t))
(``eps_mode="transformers"``: eps added to √v before the bias correction, as the transformers AdamW the
reference copies), and W ← (1 − lr·wd)·W − lr·scale·lift(u) with lift(u) = u·Q or U·u.
*Option* ``project_update`` (off by default, as in the reference): Adam's elementwise normalization does not
preserve orthogonality — even with m ⟂ S, m / √v generally has a component in S, and moments carried over a
task boundary have one too — so u can be projected once more, u ← u − S·Sᵀ·u, before the lift; with it,
later updates have no component in the stored space (to rounding), without it only the gradient is projected.

Full rank. With r = min(m, n) the subspace is the whole space; we then use the identity projector (the
canonical basis) rather than the singular vectors. Any orthonormal basis spans the same space, but Adam's
per-coordinate normalization is not rotation invariant, and the canonical basis is the one with which a GORP
step with no shared space equals an AdamW step exactly.

``end_task()`` grows each space from Adam's first moment M (SPEC §4): with Mx the moment oriented so that the
space side is its rows, take the SVD of R = Mx − S·Sᵀ·Mx and append the fewest leading left vectors of R with
(‖SᵀMx‖² + Σ_{i≤k} σ_i²) / ‖Mx‖² ≥ energy (0.9). At the first task (no S yet: the SVD of M itself)
``energy_rule="reach"`` (default, SPEC §4) applies the rule above there too; ``energy_rule="reference"`` counts as
the reference code does, the leading vectors whose cumulative energy stays *below* the threshold (one fewer than
the rule above, none when σ_1² alone reaches it). The runner's ``gorp`` method reproduces the reference, so it
passes ``"reference"``. The appended vectors are re-orthogonalized against S
(two Gram–Schmidt passes) and among themselves (QR).

The hot elementwise part of every step is ``slice_kernels.ops.gorp_update`` (one fused kernel per backend);
the skinny GEMMs stay with BLAS / cuBLAS, and the lift-back with the parameter update is one ``addmm``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Iterable, Mapping

import torch

from ..errors import GorpGroupError, NotFoundError, UnsupportedInputError
from ..ops import rsvd
from ..ops.gorp_update import gorp_update_
from ..sharded_guard import first_dtensor

KINDS = ("lowrank", "lora_a", "adamw")
SVDS = ("randomized", "exact")  # how a projector refresh computes the top-r singular vectors
LORA_A_SPACES = ("rank", "input")  # where LoRA A's shared space lives: R^r (the reference's) or R^n
ENERGY_RULES = ("reference", "reach")  # how end_task counts the vectors of a first space
EPS_MODES = ("torch", "transformers")  # eps added to √v̂ (torch's AdamW) or to √v (transformers', the reference's)
# The options a state dict saved before they existed was trained with (see load_state_dict).
_LEGACY_OPTIONS = dict(
    svd="randomized", lora_a_space="input", project_update=True, energy_rule="reach", eps_mode="torch"
)
# Relative slack in the energy rule, so a spectrum that reaches the threshold exactly (up to SVD rounding)
# is not pushed to one extra vector.
_ENERGY_SLACK = 1e-10


def is_positive_int(x) -> bool:
    """A whole number ≥ 1 given as an integer: 2.7 or "2" would be truncated or parsed by int(), and a bool is
    an int to Python but never meant as a rank."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1


def _space_side(kind: str, shape: torch.Size, lora_a_space: str = "rank") -> int:
    """0: S spans g's rows (dimension m); 1: S spans g's columns (dimension n)."""
    if kind == "lora_a":
        return 0 if lora_a_space == "rank" else 1
    return 0 if shape[0] >= shape[1] else 1


class GorpAdamW(torch.optim.Optimizer):
    """AdamW with GORP's gradient low-rank projection and shared-space orthogonalization (SPEC §4).

    Args:
        params: parameter groups (dicts with ``params``, optional ``kind`` (default ``"adamw"``), optional
            ``names`` — one string per parameter, used to seed sketches and to key shared spaces — and any
            hyper-parameter below to override it per group). ``gorp_param_groups`` builds them from a model.
        lr, betas, eps, weight_decay: AdamW's, weight decay decoupled (W ← (1 − lr·wd)·W). eps defaults to 1e-6,
            the reference's (transformers' AdamW default).
        rank: r of ``lowrank`` groups (1 ≤ r ≤ min(m, n)).
        update_proj_gap: T, steps between projector refreshes (default 10).
        scale: multiplies the update of the group (default 1.0; GaLore uses 0.25 for its projected weights).
        energy: explained-energy threshold of ``end_task`` (default 0.9).
        seed: seed of the refresh sketches (combined with the parameter name and the refresh index).
        oversample, power_iters: randomized SVD sketch width q = min(r + oversample, min(m, n)) (default
            oversample = r) and its power iterations (default 2).
        svd: ``"randomized"`` (default, the package's faster refresh) or ``"exact"`` (``torch.linalg.svd``, the
            reference's).
        lora_a_space: side of LoRA A's shared space: ``"rank"`` (default, S in R^r as the reference code builds
            it) or ``"input"`` (S in R^n, A's input space).
        project_update: also project Adam's normalized update, u ← u − S·Sᵀ·u (default False: the reference
            projects the gradient only).
        energy_rule: ``"reach"`` (default, SPEC §4: the fewest vectors that reach ``energy``, at every task) or
            ``"reference"`` (a first space takes the vectors whose cumulative energy stays below ``energy``, as the
            reference code counts; the runner's ``gorp`` default).
        eps_mode: ``"torch"`` (default, u = m̂ / (√v̂ + eps), torch's AdamW) or ``"transformers"``
            (u = m̂ / (√v̂ + eps/√(1 − β2^t)), the transformers AdamW the reference copies).
        shared_spaces: {name: S} carried from an earlier optimizer (``shared_spaces()`` of it), e.g. when a
            runner builds a fresh optimizer per task.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        rank: int = 8,
        update_proj_gap: int = 10,
        scale: float = 1.0,
        energy: float = 0.9,
        seed: int = 0,
        oversample: int | None = None,
        power_iters: int = 2,
        svd: str = "randomized",
        lora_a_space: str = "rank",
        project_update: bool = False,
        energy_rule: str = "reach",
        eps_mode: str = "torch",
        shared_spaces: Mapping[str, torch.Tensor] | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            energy=energy,
            seed=seed,
            oversample=oversample,
            power_iters=power_iters,
            svd=svd,
            lora_a_space=lora_a_space,
            project_update=project_update,
            energy_rule=energy_rule,
            eps_mode=eps_mode,
            kind="adamw",
        )
        self._check_hparams(defaults, "defaults")
        super().__init__(params, defaults)
        flat = [p for g in self.param_groups for p in g["params"]]
        i = first_dtensor(flat)
        if i is not None:
            raise GorpGroupError(
                f"GorpAdamW on FSDP2-sharded parameters is not supported: parameter {i} (shape "
                f"{tuple(flat[i].shape)}) is a DTensor shard, and GORP's projector and LoRA-A orthogonalization need "
                f"each weight's full gradient. Train with GorpAdamW on replicated ranks (DDP) instead, or use "
                f"torch.optim.AdamW on the sharded model (docs/distributed.md)"
            )
        if shared_spaces:
            self.load_shared_spaces(shared_spaces)

    # ------------------------------------------------------------------ groups and validation
    @staticmethod
    def _check_hparams(g: Mapping, where: str) -> None:
        if not g["lr"] >= 0.0:
            raise GorpGroupError(f"{where}: lr must be ≥ 0, got {g['lr']}")
        b1, b2 = g["betas"]
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise GorpGroupError(f"{where}: betas must lie in [0, 1), got {g['betas']}")
        if not g["eps"] > 0.0:
            raise GorpGroupError(f"{where}: eps must be > 0, got {g['eps']}")
        if not g["weight_decay"] >= 0.0:
            raise GorpGroupError(f"{where}: weight_decay must be ≥ 0, got {g['weight_decay']}")
        if not is_positive_int(g["update_proj_gap"]):
            raise GorpGroupError(
                f"{where}: update_proj_gap must be a positive integer (steps), got {g['update_proj_gap']!r}"
            )
        if not is_positive_int(g["rank"]):
            raise GorpGroupError(
                f"{where}: rank must be a positive integer, got {g['rank']!r}; pass a whole number such as 8"
            )
        scale = g["scale"]
        # a NaN/Inf scale writes NaN/Inf into the weights at the first step; 0 or less trains nothing or ascends
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
            raise GorpGroupError(
                f"{where}: scale must be a finite number > 0, got {scale!r}; pass e.g. 1.0 (GaLore uses 0.25)"
            )
        if not 0.0 < g["energy"] <= 1.0:
            raise GorpGroupError(f"{where}: energy must lie in (0, 1], got {g['energy']}")
        if g["kind"] not in KINDS:
            raise GorpGroupError(f"{where}: kind must be one of {KINDS}, got {g['kind']!r}")
        for key, choices in (
            ("svd", SVDS),
            ("lora_a_space", LORA_A_SPACES),
            ("energy_rule", ENERGY_RULES),
            ("eps_mode", EPS_MODES),
        ):
            if g[key] not in choices:
                raise GorpGroupError(f"{where}: {key} must be one of {choices}, got {g[key]!r}")
        if not isinstance(g["project_update"], bool):
            raise GorpGroupError(f"{where}: project_update must be True or False, got {g['project_update']!r}")

    def add_param_group(self, param_group: dict) -> None:
        # validate everything first so a bad group leaves the optimizer untouched
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        idx = len(self.param_groups)
        names = list(group.get("names") or [f"group{idx}.param{j}" for j in range(len(params))])
        if len(names) != len(params):
            raise GorpGroupError(f"group {idx}: {len(names)} names for {len(params)} parameters")
        taken = {n for g in self.param_groups for n in g["names"]}
        dup = sorted((taken & set(names)) | {n for n in names if names.count(n) > 1})
        if dup:
            raise GorpGroupError(
                f"group {idx}: parameter names must be unique (they key spaces and sketches): {dup[:5]}"
            )
        # torch keeps any extra key of a group without a word: a misspelt option (lowrank_options={"scael": 0.25})
        # would train with the default silently ("initial_lr" is the LR schedulers' own key)
        unknown = sorted(set(group) - set(self.defaults) - {"params", "names", "initial_lr"})
        if unknown:
            raise GorpGroupError(f"group {idx}: unknown option(s) {unknown}; known: {sorted(self.defaults)}")
        merged = {**self.defaults, **{k: v for k, v in group.items() if k not in ("params", "names")}}
        self._check_hparams(merged, f"group {idx} ({merged['kind']})")
        kind, rank = merged["kind"], int(merged["rank"])
        for p, name in zip(params, names):
            # Adam's moments and the update are real-valued: an integer parameter would truncate them
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                raise GorpGroupError(
                    f"group {idx} ({kind}): {name} is a {p.dtype} tensor of shape {tuple(p.shape)}; GorpAdamW "
                    f"trains floating-point parameters only: leave it out of the groups (or train a float copy)"
                )
            if kind == "lowrank" and isinstance(p, torch.Tensor) and p.dtype in (torch.bfloat16, torch.float16):
                # the step is applied to W in place, with no float32 master copy: at the reference's small
                # full-rank lr (1e-6) most updates fall below half of W's rounding step and are lost
                warnings.warn(
                    f"GorpAdamW: {name} is {p.dtype}; its updates are written into the {p.dtype} weight directly, so "
                    f"steps below its rounding step (about |w|·2^-8 for bfloat16) are lost: keep the full-rank "
                    f"weights in float32 (e.g. a float32 model, or this module cast to float32) to train them at a "
                    f"small learning rate",
                    stacklevel=3,
                )
            if kind in ("lowrank", "lora_a") and p.dim() != 2:
                raise GorpGroupError(
                    f"{name}: a {kind!r} group takes matrices, got a tensor of shape {tuple(p.shape)}; put it in "
                    f"an 'adamw' group"
                )
            if kind == "lowrank" and rank > min(p.shape):
                raise GorpGroupError(
                    f"{name}: rank {rank} is larger than the matrix allows (min(m, n) = {min(p.shape)} for shape "
                    f"{tuple(p.shape)}); lower rank to at most {min(p.shape)}"
                )
        group["params"], group["names"] = params, names
        super().add_param_group(group)

    def _named_params(self):
        for group in self.param_groups:
            for p, name in zip(group["params"], group["names"]):
                yield group, p, name

    # ------------------------------------------------------------------ shared spaces
    def _space_dim(self, group: dict, p: torch.Tensor) -> int:
        return p.shape[_space_side(group["kind"], p.shape, group["lora_a_space"])]

    def shared_space(self, param: torch.Tensor) -> torch.Tensor | None:
        """The shared space of ``param`` as a (d, k) matrix with orthonormal columns, or None.

        d is W's output dimension m for a ``lowrank`` weight with m ≥ n, its input dimension n otherwise, and
        for a ``lora_a`` matrix A (r×n) its rank r (``lora_a_space="rank"``) or its input dimension n
        (``"input"``) (see the module docstring).
        """
        for group, p, _ in self._named_params():
            if p is param:
                return self.state[p].get("shared") if group["kind"] != "adamw" else None
        raise NotFoundError("shared_space: this tensor is not a parameter of the optimizer")

    def shared_spaces(self) -> dict[str, torch.Tensor]:
        """{parameter name: S} for every parameter that has a space (clones; pass to a new optimizer)."""
        return {
            name: self.state[p]["shared"].detach().clone()
            for _, p, name in self._named_params()
            if "shared" in self.state.get(p, {})
        }

    def load_shared_spaces(self, spaces: Mapping[str, torch.Tensor]) -> None:
        """Install spaces by parameter name (all checked before any is installed)."""
        by_name = {name: (group, p) for group, p, name in self._named_params()}
        plan = []
        for name, S in spaces.items():
            if name not in by_name:
                raise GorpGroupError(
                    f"shared space {name!r} matches no parameter of this optimizer (known: "
                    f"{sorted(by_name)[:8]}{' …' if len(by_name) > 8 else ''}); build the groups with the same names"
                )
            group, p = by_name[name]
            if group["kind"] == "adamw":
                raise GorpGroupError(f"shared space {name!r}: the parameter is in an 'adamw' group, which has none")
            d = self._space_dim(group, p)
            if S.dim() != 2 or S.shape[0] != d or S.shape[1] > d:
                raise GorpGroupError(
                    f"shared space {name!r} has shape {tuple(S.shape)}; this parameter needs ({d}, k) with k ≤ {d}"
                )
            plan.append((p, S))
        for p, S in plan:
            self.state[p]["shared"] = S.detach().to(device=p.device, dtype=_state_dtype(p)).clone()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [(group, p, name) for group, p, name in self._named_params() if p.grad is not None]
        for _, p, name in todo:  # checked before any parameter moves, so an error leaves the model as it was
            if p.grad.is_sparse:
                raise UnsupportedInputError(
                    f"{name}: GorpAdamW does not support sparse gradients; use a dense gradient "
                    f"(e.g. nn.Embedding(sparse=False)) or another optimizer for this parameter"
                )
        for group, p, name in todo:
            self._step_param(group, p, name)
        return loss

    def _step_param(self, group: dict, p: torch.Tensor, name: str) -> None:
        state = self.state[p]
        kind = group["kind"]
        sd = _state_dtype(p)
        G = p.grad.to(sd)
        t = state.get("step", 0)
        lowrank = kind == "lowrank" and int(group["rank"]) < min(p.shape)
        side = _space_side(kind, p.shape, group["lora_a_space"]) if kind != "adamw" else 0
        if lowrank:
            if t % int(group["update_proj_gap"]) == 0:
                state["proj"] = self._refresh(group, G, name, state.get("refreshes", 0))
                state["refreshes"] = state.get("refreshes", 0) + 1
            P = state["proj"]
            g = G @ P.T if side == 0 else P.T @ G
        else:
            g = G.contiguous()
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(g, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(g, memory_format=torch.contiguous_format)
        t += 1
        state["step"] = t
        b1, b2 = group["betas"]
        lr, scale = group["lr"], group["scale"]
        decay, step_size = 1.0 - lr * group["weight_decay"], lr * scale
        S = state.get("shared")
        proj = None if S is None else _project(S, g, side)
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
        # transformers' AdamW: lr·√bc2/bc1 · m / (√v + eps) = lr · m̂ / (√v̂ + eps/√bc2), the same kernel
        eps = group["eps"] if group["eps_mode"] == "torch" else group["eps"] / math.sqrt(bc2)
        hp = dict(beta1=b1, beta2=b2, eps=eps, bc1=bc1, bc2=bc2)
        project_u = S is not None and group["project_update"]
        if not lowrank and not project_u and p.is_contiguous():
            gorp_update_(
                g, proj, state["exp_avg"], state["exp_avg_sq"], param=p, step_size=step_size, decay=decay, **hp
            )
            return
        u = torch.empty_like(g)
        gorp_update_(g, proj, state["exp_avg"], state["exp_avg_sq"], out=u, **hp)
        if project_u:
            u.sub_(_project(S, u, side))
        if lowrank:
            P = state["proj"]
            a, b = (u, P) if side == 0 else (P, u)
            if p.dtype == sd:
                p.addmm_(a, b, beta=decay, alpha=-step_size)  # lift-back and update in BLAS's epilogue
            else:
                p.copy_(torch.addmm(p.to(sd), a, b, beta=decay, alpha=-step_size))
        else:
            w = p.to(sd)
            w.mul_(decay).add_(u, alpha=-step_size)
            p.copy_(w)

    def _refresh(self, group: dict, G: torch.Tensor, name: str, index: int) -> torch.Tensor:
        """Top-r singular vectors of G: Q (r×n) when m ≥ n, U (m×r) otherwise (randomized SVD with a seeded
        sketch, or the exact SVD)."""
        m, n = G.shape
        r = int(group["rank"])
        if group["svd"] == "exact":
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            return Vh[:r].contiguous() if m >= n else U[:, :r].contiguous()
        over = r if group["oversample"] is None else int(group["oversample"])
        q = min(r + over, min(m, n))
        seed = rsvd.layer_seed(int(group["seed"]), f"{name}#refresh{index}")
        omega = rsvd.sketch([seed], n, q, G.device, dtype=G.dtype)
        U, _, V = rsvd.randomized_svd(G.unsqueeze(0), omega, r, int(group["power_iters"]))
        return V[0].T.contiguous() if m >= n else U[0].contiguous()

    # ------------------------------------------------------------------ end of task
    @torch.no_grad()
    def end_task(self, first_task: bool | None = None) -> dict[str, int]:
        """Grow every ``lowrank`` / ``lora_a`` parameter's shared space from Adam's first moment.

        ``first_task`` says whether this is the end of the first task, which ``energy_rule="reference"``
        counts differently (see ``grow_space``). None (default): a parameter without a space is at its first
        task. The reference decides it once for all parameters (no stored space at all), so a parameter whose
        first space came out empty is counted as a later one at the next task; a caller that knows the task
        index (the runner) passes it to get exactly that.

        Returns {name: number of vectors appended}. All new spaces are computed before any is installed.
        """
        updates, added = [], {}
        for group, p, name in self._named_params():
            if group["kind"] == "adamw":
                continue
            state = self.state.get(p, {})
            if "exp_avg" not in state:
                continue  # never stepped: no moment to learn a space from
            side = _space_side(group["kind"], p.shape, group["lora_a_space"])
            new = grow_space(
                state.get("shared"),
                state["exp_avg"],
                side,
                float(group["energy"]),
                rule=group["energy_rule"],
                first=first_task,
            )
            added[name] = (
                0 if new is None else new.shape[1] - (0 if "shared" not in state else state["shared"].shape[1])
            )
            if new is not None:
                updates.append((state, new))
        for state, S in updates:
            state["shared"] = S
        return added

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that state tensors keep their saved dtype.

        torch casts floating state to the parameter's dtype; for a bfloat16 weight that would round the
        float32 moments, projectors and spaces and make a resumed run differ from an uninterrupted one.
        Every state tensor's shape is checked against its parameter first (torch checks only the counts), so a
        state dict of a model of other sizes is refused with nothing loaded. A state dict saved before the
        options ``svd``, ``lora_a_space``, ``project_update``, ``energy_rule`` and ``eps_mode`` existed gets
        the values it was trained with (randomized, input, True, reach, torch).
        """
        state_dict = {
            **state_dict,
            "param_groups": [{**_LEGACY_OPTIONS, **g} for g in state_dict.get("param_groups", [])],
        }
        self._check_state_shapes(state_dict)
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for k, v in state_dict["state"].get(pid, {}).items():
                if torch.is_tensor(v):
                    self.state[p][k] = v.to(device=p.device, copy=True)

    def _check_state_shapes(self, state_dict: dict) -> None:
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            return  # torch's own error names the mismatch in the number of groups
        for idx, (sg, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(group["params"]):
                return  # likewise for the number of parameters of a group
            # torch installs the saved group's options, so its rank is the one the state must fit
            kind, rank = sg.get("kind", group["kind"]), int(sg.get("rank", group["rank"]))
            space = sg.get("lora_a_space", group["lora_a_space"])
            if kind != group["kind"]:
                raise GorpGroupError(
                    f"load_state_dict: group {idx} was saved as a {kind!r} group but is a {group['kind']!r} group "
                    f"here. Nothing was loaded: build the groups as for the optimizer that was saved"
                )
            for pid, p, name in zip(sg["params"], group["params"], group["names"]):
                expected = _state_shapes(kind, rank, p.shape, space)
                for k, v in state_dict["state"].get(pid, {}).items():
                    if not torch.is_tensor(v) or k not in expected:
                        continue
                    want = expected[k]
                    if k == "shared":  # S is (d, k) with k ≤ d
                        d = want[0]
                        ok, need = v.dim() == 2 and v.shape[0] == d >= v.shape[1], f"({d}, k ≤ {d})"
                    else:
                        ok, need = tuple(v.shape) == want, str(want)
                    if not ok:
                        raise GorpGroupError(
                            f"load_state_dict: parameter {name!r} (shape {tuple(p.shape)}, {kind}"
                            f"{f', rank {rank}' if kind == 'lowrank' else ''}): the saved {k} has shape "
                            f"{tuple(v.shape)} but this parameter needs {need}, so the state dict comes from a model "
                            f"of other sizes. Nothing was loaded: load it into an optimizer over the model it was saved "
                            f"from (same groups, names and shapes), or start this optimizer fresh"
                        )


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _state_shapes(kind: str, rank: int, shape: torch.Size, lora_a_space: str = "rank") -> dict[str, tuple[int, ...]]:
    """The shape each state tensor of a parameter of ``shape`` has (see ``_step_param``); for "shared" the
    space dimension d, as (d,): S is (d, k) with k ≤ d."""
    if kind != "lowrank" or rank >= min(shape):  # g = G (adamw, lora_a, full-rank lowrank)
        out = {"exp_avg": tuple(shape), "exp_avg_sq": tuple(shape)}
    else:
        m, n = shape
        g, proj = ((m, rank), (rank, n)) if m >= n else ((rank, n), (m, rank))
        out = {"exp_avg": g, "exp_avg_sq": g, "proj": proj}
    if kind != "adamw":
        out["shared"] = (shape[_space_side(kind, shape, lora_a_space)],)
    return out


def _project(S: torch.Tensor, X: torch.Tensor, side: int) -> torch.Tensor:
    """S·Sᵀ·X (side 0, S spans X's rows) or X·S·Sᵀ (side 1, S spans X's columns): two skinny GEMMs."""
    return S @ (S.T @ X) if side == 0 else (X @ S) @ S.T


def energy_count(explained: float, sigma: torch.Tensor, total: float, energy: float, *, count: str = "reach") -> int:
    """How many of the directions σ (descending) to take, given ``explained`` energy already stored.

    ``count="reach"``: the fewest k with (explained + Σ_{i<k} σ_i²) / total ≥ energy; 0 when already reached;
    capped at len(sigma): if even every direction does not reach the threshold, all are taken.
    ``count="below"``: the number of leading directions whose cumulative energy stays below the threshold,
    #{k ≥ 1 : (explained + Σ_{i<k} σ_i²) / total < energy} — the reference code's count for a first space
    (one fewer than "reach" whenever the threshold is reached; 0 when σ_1² alone reaches it).
    """
    if count not in ("reach", "below"):
        raise ValueError(f"count must be 'reach' or 'below', got {count!r}")
    threshold = (energy - _ENERGY_SLACK) * total
    if total <= 0.0 or explained >= threshold:
        return 0
    cum = explained + torch.cumsum(sigma.double() ** 2, 0)
    if count == "below":
        return int((cum < threshold).sum())
    reached = (cum >= threshold).nonzero()
    return int(reached[0, 0]) + 1 if reached.numel() else int(sigma.numel())


def grow_space(
    S: torch.Tensor | None,
    M: torch.Tensor,
    side: int,
    energy: float = 0.9,
    *,
    rule: str = "reference",
    first: bool | None = None,
) -> torch.Tensor | None:
    """SPEC §4's growth rule: S (d×k) grown from the moment M; returns the new S, or None if nothing is added.

    ``side`` says which of M's dimensions the space lives on (0: rows, 1: columns). Computed in float64.
    ``rule="reference"`` (default): at the first task (``first``; None means "S is None") the count is
    ``energy_count(..., count="below")``, as the reference code counts; at later tasks, and always with
    ``rule="reach"``, the fewest vectors that reach ``energy``.
    """
    if rule not in ENERGY_RULES:
        raise ValueError(f"rule must be one of {ENERGY_RULES}, got {rule!r}")
    first = S is None if first is None else bool(first)
    Mx = (M if side == 0 else M.T).double()
    total = float((Mx * Mx).sum())
    if total == 0.0 or not math.isfinite(total):
        return None
    S64 = None if S is None else S.double()
    R = Mx if S64 is None else Mx - S64 @ (S64.T @ Mx)
    explained = max(total - float((R * R).sum()), 0.0)
    U, sigma, _ = torch.linalg.svd(R, full_matrices=False)
    k = energy_count(explained, sigma, total, energy, count="below" if rule == "reference" and first else "reach")
    if S64 is not None:
        k = min(k, Mx.shape[0] - S64.shape[1])
    k = min(k, int((sigma > sigma[0] * Mx.shape[0] * torch.finfo(torch.float64).eps).sum()) if sigma.numel() else 0)
    if k <= 0:
        return None
    new = U[:, :k]
    if S64 is not None:
        for _ in range(2):  # "twice is enough": one pass leaves O(eps·κ) components in S
            new = new - S64 @ (S64.T @ new)
    new, _ = torch.linalg.qr(new)
    out = new if S64 is None else torch.cat([S64, new], dim=1)
    return out.to(dtype=M.dtype if S is None else S.dtype).contiguous()
