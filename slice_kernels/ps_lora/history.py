"""History of earlier tasks' updates for the PS-LoRA stability loss (SPEC §3).

``H_ℓ = Σ_{i<t} ΔW_i,ℓ`` of one layer is held in one of three forms:

* ``"factors"``: the exact low-rank factors ``Bh`` (m×R) and ``Ah`` (R×n), each earlier task's scaling
  folded into its columns of ``Bh`` (so ``H = Bh @ Ah``);
* ``"dense"``: the m×n matrix itself;
* ``"bits"``: one sign bit per entry (``ops.sign_bits``: packed little-endian along each row into uint8,
  ``m × ceil(n/8)``), plus the scalar ``rms(H)``: 32× smaller than float32, the hard-sign limit of the tanh loss.

``rms(H)`` is computed once per form (from factors by the Gram identity ``‖BA‖² = tr((BᵀB)(AAᵀ))``, so
no m×n matrix) and carried as a Python float: the kernels take ``α_ℓ = α / rms(H)`` as a scalar.

``HistoryStore`` keeps one ``History`` per layer name, is updated after each task from a PEFT model's
LoRA factors, and saves/loads with the run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..errors import HistoryError
from ..init_offsets import effective_factors, init_offset
from ..modules import canonical_name, lora_factors, lora_layers
from ..ops.sign_bits import pack_sign_bits, unpack_sign_bits

KINDS = ("factors", "dense", "bits")

# Row blocks used when a form must be converted without holding an m×n matrix; at 8192 columns this is
# 256 rows × 8192 × 4 bytes = 8 MiB at a time.
_ROW_BLOCK = 256


def _check_rms(rms) -> float:
    """rms(H) as a float, refused unless finite and ≥ 0: the loss divides by it (α_ℓ = α/rms, 1/rms, 1/rms²), so a
    NaN/Inf turns the stability loss into NaN and a negative one flips the direction term. 0 is legitimate: an
    all-zero H (an adapter that never moved) has rms 0, and the loss skips such a layer."""
    rms = float(rms)
    if not (math.isfinite(rms) and rms >= 0.0):
        raise HistoryError(
            f"rms = {rms} is not a valid rms(H): it must be finite and ≥ 0 (0 only for an all-zero history)"
        )
    return rms


def gram_sq_norm(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """‖B @ A‖_F² without forming B @ A: tr((BᵀB)(AAᵀ)), in float64."""
    Bd, Ad = B.double(), A.double()
    return ((Bd.T @ Bd) * (Ad @ Ad.T)).sum()


@dataclass
class History:
    """H of one layer, in one of the forms of ``KINDS`` (see the module doc). Build with the
    ``from_*`` constructors; ``rms`` is ``sqrt(mean H²)``."""

    kind: str
    shape: tuple[int, int]
    rms: float
    Bh: torch.Tensor | None = None
    Ah: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bits: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_factors(cls, Bs, As, scalings=None) -> "History":
        """Earlier adapters of one layer: ``H = Σ_i s_i · B_i @ A_i`` (B_i m×r_i, A_i r_i×n).

        ``Bs``/``As`` are tensors or sequences of tensors; ``scalings`` a float or a sequence (default 1)."""
        Bs = [Bs] if isinstance(Bs, torch.Tensor) else list(Bs)
        As = [As] if isinstance(As, torch.Tensor) else list(As)
        if scalings is None:
            scalings = [1.0] * len(Bs)
        elif isinstance(scalings, (int, float)):
            scalings = [float(scalings)] * len(Bs)
        scalings = [float(s) for s in scalings]
        if not (len(Bs) == len(As) == len(scalings)) or not Bs:
            raise HistoryError(
                f"History.from_factors needs as many B factors as A factors and scalings, at least one "
                f"(got {len(Bs)} B, {len(As)} A, {len(scalings)} scalings)"
            )
        m, n = Bs[0].shape[0], As[0].shape[1]
        for i, (B, A) in enumerate(zip(Bs, As)):
            if B.dim() != 2 or A.dim() != 2 or B.shape[0] != m or A.shape[1] != n or B.shape[1] != A.shape[0]:
                raise HistoryError(
                    f"History.from_factors: task {i} has B {tuple(B.shape)} and A {tuple(A.shape)}; expected "
                    f"B (m={m}, r) and A (r, n={n}) with the same r"
                )
        # s·B formed in float64 and rounded once (s·B in a bf16 adapter's own dtype would round to bf16)
        Bh = torch.cat([(s * B.detach().double()).float() for s, B in zip(scalings, Bs)], dim=1).contiguous()
        Ah = torch.cat([A.detach().float() for A in As], dim=0).contiguous()
        rms = math.sqrt(float(gram_sq_norm(Bh, Ah)) / (m * n))
        return cls("factors", (m, n), rms, Bh=Bh, Ah=Ah)

    @classmethod
    def from_dense(cls, H: torch.Tensor) -> "History":
        if H.dim() != 2:
            raise HistoryError(f"History.from_dense needs a 2-D (out, in) matrix, got shape {tuple(H.shape)}")
        H = H.detach().contiguous()
        rms = math.sqrt(float(H.double().pow(2).sum()) / H.numel())
        return cls("dense", tuple(H.shape), rms, dense=H)

    @classmethod
    def from_bits(cls, bits: torch.Tensor, n: int, rms: float) -> "History":
        if bits.dtype != torch.uint8 or bits.dim() != 2 or bits.shape[1] != (n + 7) // 8:
            raise HistoryError(
                f"sign bits must be uint8 of shape (m, ceil(n/8)) = (m, {(n + 7) // 8}), got "
                f"{bits.dtype} {tuple(bits.shape)}"
            )
        m = bits.shape[0]
        return cls("bits", (m, n), _check_rms(rms), bits=bits.contiguous())

    # ------------------------------------------------------------------ conversions
    @property
    def rank(self) -> int | None:
        return None if self.Bh is None else self.Bh.shape[1]

    @property
    def device(self) -> torch.device:
        t = {"factors": self.Bh, "dense": self.dense, "bits": self.bits}[self.kind]
        return t.device

    def _row_blocks(self, dtype=torch.float32):
        """Yield (row0, row1, H[row0:row1]) without holding more than one row block."""
        m, n = self.shape
        for r0 in range(0, m, _ROW_BLOCK):
            r1 = min(m, r0 + _ROW_BLOCK)
            if self.kind == "factors":
                yield r0, r1, self.Bh[r0:r1].to(dtype) @ self.Ah.to(dtype)
            elif self.kind == "dense":
                yield r0, r1, self.dense[r0:r1].to(dtype)
            else:
                yield r0, r1, unpack_sign_bits(self.bits[r0:r1], n, dtype) * self.rms

    def to_sign_bits(self) -> "History":
        """The bit form (1 bit per entry + rms(H)), built row block by row block."""
        if self.kind == "bits":
            return self
        m, n = self.shape
        bits = torch.empty((m, (n + 7) // 8), dtype=torch.uint8, device=self.device)
        for r0, r1, blk in self._row_blocks():
            bits[r0:r1] = pack_sign_bits(blk)
        return History("bits", (m, n), self.rms, bits=bits)

    def to_dense(self, dtype=torch.float32) -> torch.Tensor:
        """H as an m×n matrix (bit form: sign · rms). Meant for small layers and tests."""
        m, n = self.shape
        out = torch.empty((m, n), dtype=dtype, device=self.device)
        for r0, r1, blk in self._row_blocks(dtype):
            out[r0:r1] = blk
        return out

    def operands(self, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(H1, H2) as the fused sign-loss op takes them: (Bh, Ah), (dense, None) or (bits, None)."""
        if self.kind == "factors":
            return self.Bh.to(device), self.Ah.to(device)
        if self.kind == "dense":
            return self.dense.to(device), None
        return self.bits.to(device), None

    def to(self, device) -> "History":
        mv = lambda t: None if t is None else t.to(device)
        return History(
            self.kind, self.shape, self.rms, mv(self.Bh), mv(self.Ah), mv(self.dense), mv(self.bits), dict(self.meta)
        )

    # ------------------------------------------------------------------ update after a task
    def append(self, B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> "History":
        """H + s·B·A, in this History's form (returns a new History; this one is left unchanged).

        factors: the factors are concatenated (exact). dense: added row block by row block. bits: the old H
        is only known as sign·rms, so that 1-bit reconstruction is updated and re-quantized (lossy; keep
        the factor form and call ``to_sign_bits()`` after each task for the exact bit form)."""
        m, n = self.shape
        if B.dim() != 2 or A.dim() != 2 or B.shape[0] != m or A.shape[1] != n or B.shape[1] != A.shape[0]:
            raise HistoryError(
                f"History.append: B {tuple(B.shape)} and A {tuple(A.shape)} do not make an update of shape {self.shape}"
            )
        B, A = B.detach().to(self.device), A.detach().to(self.device)
        if self.kind == "factors":
            Bh = torch.cat([self.Bh, (scaling * B.double()).float()], dim=1).contiguous()
            Ah = torch.cat([self.Ah, A.float()], dim=0).contiguous()
            return History("factors", (m, n), math.sqrt(float(gram_sq_norm(Bh, Ah)) / (m * n)), Bh=Bh, Ah=Ah)
        dtype = self.dense.dtype if self.kind == "dense" else torch.float32
        Bf, Af = (scaling * B.double()).to(dtype), A.to(dtype)
        if self.kind == "dense":
            H = self.dense.clone()
            sq = 0.0
            for r0 in range(0, m, _ROW_BLOCK):
                r1 = min(m, r0 + _ROW_BLOCK)
                H[r0:r1].addmm_(Bf[r0:r1], Af)
                sq += float(H[r0:r1].double().pow(2).sum())
            return History("dense", (m, n), math.sqrt(sq / (m * n)), dense=H)
        bits = torch.empty_like(self.bits)
        sq = 0.0
        for r0, r1, blk in self._row_blocks():
            blk.addmm_(Bf[r0:r1], Af)
            sq += float(blk.double().pow(2).sum())
            bits[r0:r1] = pack_sign_bits(blk)
        return History("bits", (m, n), math.sqrt(sq / (m * n)), bits=bits)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        d = {"kind": self.kind, "shape": list(self.shape), "rms": self.rms}
        for k in ("Bh", "Ah", "dense", "bits"):
            t = getattr(self, k)
            if t is not None:
                d[k] = t.detach().cpu()
        return d

    @classmethod
    def from_state_dict(cls, d: dict, device="cpu") -> "History":
        if d.get("kind") not in KINDS:
            raise HistoryError(f"not a History state dict (kind={d.get('kind')!r}; expected one of {KINDS})")
        mv = lambda k: None if d.get(k) is None else d[k].to(device)
        rms = _check_rms(d["rms"])  # before any tensor is moved
        return cls(d["kind"], tuple(d["shape"]), rms, mv("Bh"), mv("Ah"), mv("dense"), mv("bits"))


class HistoryStore:
    """One ``History`` per layer name; updated after each task, saved and loaded with the run."""

    def __init__(self, kind: str = "factors", layers: dict[str, History] | None = None, tasks: int = 0):
        if kind not in KINDS:
            raise HistoryError(f"unknown history form {kind!r}; choose one of {KINDS}")
        self.kind = kind
        self.layers: dict[str, History] = dict(layers or {})
        self.tasks = tasks

    def __len__(self):
        return len(self.layers)

    def __contains__(self, name):
        return name in self.layers

    def __getitem__(self, name) -> History:
        return self.layers[name]

    def record_task(self, model, init_offsets: dict | None = None) -> None:
        """Add the update the current LoRA adapter of every layer of a PEFT ``model`` made (call before merging it).

        That update is s·B·A for an adapter that started at B = 0 (vanilla LoRA), and s·(B·A − B₀·A₀) for one whose
        initial product was absorbed into W (SLICE, LoRA-GA, LoRAM): the offsets ``get_slice_model`` left on the
        layers are read (``slice_kernels.init_offsets``) and recorded as rank-2r factors [B, −B₀]·[A; A₀].
        ``init_offsets`` (``{name: (B₀, A₀)}`` or ``(B₀, A₀, s₀)``) overrides them per layer. Layer names are stored
        without DDP/torch.compile prefixes (``modules.canonical_name``), so a wrapped model records the same keys.

        The store keeps exact factors when ``kind="factors"``; for ``"dense"`` and ``"bits"`` the update
        is folded in (bits: see ``History.append``; the first task's bits are exact)."""
        explicit = {canonical_name(k): v for k, v in (init_offsets or {}).items()}
        found = []
        for name, mod, ad in lora_layers(model):
            name = canonical_name(name)
            B, A, s = lora_factors(mod, ad)
            offset = explicit.get(name)
            B, A = effective_factors(B, A, offset if offset is not None else init_offset(mod, ad), s)
            found.append((name, B, A, s))
        if not found:
            raise HistoryError(
                "HistoryStore.record_task: the model has no active PEFT LoRA layer; pass the "
                "PeftModel (before merge_and_unload)"
            )
        unknown = sorted(set(explicit) - {n for n, *_ in found})
        if unknown:
            raise HistoryError(
                f"HistoryStore.record_task: init_offsets names {len(unknown)} layer(s) that are not LoRA layers of the "
                f"model, e.g. {unknown[0]!r}; use the names of model.named_modules() (wrapper prefixes are ignored)"
            )
        new = {}
        for name, B, A, s in found:
            prev = self.layers.get(name)
            if prev is None:
                h = History.from_factors([B], [A], [s])
                if self.kind == "dense":
                    h = History.from_dense(h.to_dense())
                elif self.kind == "bits":
                    h = h.to_sign_bits()
            else:
                h = prev.append(B, A, s)
            new[name] = h
        self.layers.update(new)
        self.tasks += 1

    def state_dict(self) -> dict:
        return {"kind": self.kind, "tasks": self.tasks, "layers": {k: v.state_dict() for k, v in self.layers.items()}}

    @classmethod
    def from_state_dict(cls, d: dict, device="cpu") -> "HistoryStore":
        layers = {}
        for k, v in d["layers"].items():
            try:
                layers[k] = History.from_state_dict(v, device)
            except HistoryError as exc:
                raise HistoryError(f"layer {k!r}: {exc}") from exc
        return cls(d["kind"], layers, d["tasks"])

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "HistoryStore":
        what = (
            f"HistoryStore.load: {os.fspath(path)!r} is not a saved history (expected a file written by "
            f"HistoryStore.save"
        )
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:  # missing or unreadable: the OS's own message names the path
            raise
        except Exception as exc:  # not a torch file (a text file fails with KeyError, an empty one with EOFError)
            raise HistoryError(f"{what}; torch.load failed: {type(exc).__name__}: {exc})") from exc
        if not (isinstance(d, dict) and {"kind", "tasks", "layers"} <= set(d) and isinstance(d["layers"], dict)):
            found = f"a dict with keys {sorted(map(str, d))[:8]}" if isinstance(d, dict) else f"a {type(d).__name__}"
            raise HistoryError(f"{what}, a dict with 'kind', 'tasks' and 'layers'; found {found})")
        try:
            return cls.from_state_dict(d, device)
        except HistoryError as exc:  # a saved history with a bad entry: name the file, the layer is named already
            raise HistoryError(
                f"HistoryStore.load: {os.fspath(path)!r}: {exc}. Nothing was loaded; the file was damaged or edited "
                f"after HistoryStore.save: restore it from the run's checkpoint or rebuild the history"
            ) from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise HistoryError(f"{what}; its contents do not form one: {type(exc).__name__}: {exc})") from exc


def history_from_updates(updates: dict, kind: str = "factors") -> HistoryStore:
    """``{layer: [{"B", "A", "s"}, ...]}`` (task order) → a ``HistoryStore`` of the requested form."""
    layers = {}
    for name, ups in updates.items():
        if not ups:
            continue
        h = History.from_factors([u["B"] for u in ups], [u["A"] for u in ups], [u["s"] for u in ups])
        if kind == "dense":
            h = History.from_dense(h.to_dense())
        elif kind == "bits":
            h = h.to_sign_bits()
        layers[name] = h
    return HistoryStore(kind, layers, tasks=max((len(u) for u in updates.values()), default=0))
