"""Saved adapters that are right by construction: the changed-base mark and the offline conversion to plain LoRA.

An init with an offset (slice, lora_ga, lora_ga_peft, loram) absorbs W − s·B₀·A₀ into the base weights, so the
trained adapter fits only that changed base. Every PEFT save path (``save_pretrained``, Trainer and TRL
checkpoints) writes ``peft_config`` as it is in memory, so the mark lives there, in ``init_lora_weights``:

* it is the one field PEFT acts on when it loads: ``PeftModel.from_pretrained`` (and transformers'
  ``model.load_adapter``) builds the layers with ``init_lora_weights`` and raises
  ``ValueError: Unknown initialization init_lora_weights='<the mark>'`` for a string it does not know, so a
  marked adapter is refused on load with the mark's text, which says what happened and what to do. An extra
  JSON key would only be dropped with PEFT's generic "upgrade PEFT" warning and the adapter loaded wrong;
* PEFT's own conversion (``path_initial_model_for_weight_conversion``) resets it to True, so a converted rank-2r
  adapter carries no mark and loads silently, as it should;
* Trainer's ``resume_from_checkpoint`` loads weights into the existing adapter (no re-init), so resuming is
  unaffected.

The mark also holds a fingerprint of the offset s·B₀·A₀: four seeded random probes Σ_ℓ s·uᵀB₀A₀v (float64),
which tell whether an initial adapter is the one a checkpoint was trained from, tolerant to float noise and dtype
casts (two different inits differ by O(1) in them, rounding by far less than ``PROBE_RTOL``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings

import torch

from ..errors import SliceInitError

MARK_PREFIX = "slice-kernels:"
PROBE_RTOL = 1e-2
_N_PROBES = 4
_MARK_RE = re.compile(r"^slice-kernels:(?P<method>[A-Za-z0-9_]+):probe=(?P<probe>[^:]+):")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_BIN_NAME = "adapter_model.bin"
# inits whose trained adapter PEFT itself converts with the same ΔW = s·B·A − s·B₀·A₀ (no fingerprint to check)
_PEFT_MUTATING = ("pissa", "corda", "olora", "lora_ga")


def make_mark(method: str, probes: list[float]) -> str:
    probe = ",".join(f"{p:.12e}" for p in probes)
    return (
        f"{MARK_PREFIX}{method}:probe={probe}: the {method!r} init changed the base weights (W - s*B0*A0 was "
        "absorbed), so this adapter is wrong on the original model and is refused. Convert it into a plain LoRA "
        "for the original model: `slice-kernels convert THIS_FOLDER --initial INITIAL_ADAPTER_FOLDER --out OUT` "
        "(Python: slice_kernels.convert_adapter), or save with slice_kernels.save_as_lora or the "
        "SliceSaveCallback; see docs/saving.md"
    )


def parse_mark(value) -> dict | None:
    """``{"method", "probes"}`` of a slice-kernels mark, None for any other ``init_lora_weights`` value."""
    if not isinstance(value, str) or not value.startswith(MARK_PREFIX):
        return None
    m = _MARK_RE.match(value)
    if m is None:
        raise SliceInitError(f"init_lora_weights starts with {MARK_PREFIX!r} but is not a readable mark: {value!r}")
    return {"method": m["method"], "probes": [float(x) for x in m["probe"].split(",")]}


# (A suffix, B suffix) of a LoRA pair in PEFT's saved state dict: Linear/Conv1D/Conv2d layers, and embeddings
# (which the init skips, so their A₀ = 0 (PEFT's embedding init), but whose trained update a conversion must keep)
PAIR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


def pair_keys(state_dict: dict) -> dict[str, tuple[str, str]]:
    """{module key: (A's state-dict key, B's)} of every LoRA pair in a PEFT LoRA state dict."""
    out: dict = {}
    for k in state_dict:
        for sa, sb in PAIR_SUFFIXES:
            for suffix, i in ((sa, 0), (sb, 1)):
                if k.endswith(suffix):
                    out.setdefault(k[: -len(suffix)], [None, None])[i] = k
    bad = sorted(k for k, (a, b) in out.items() if a is None or b is None)
    if bad:
        raise SliceInitError(f"LoRA layers with only one of their A/B factors: {bad[:3]}")
    return {k: (a, b) for k, (a, b) in out.items()}


def embedding_copies(state_dict: dict, names: dict) -> list[str]:
    """Keys of the embedding weights PEFT saves beside an embedding's LoRA (``save_embedding_layers="auto"``):
    the init never changes an embedding (it is skipped), so the copies are the original weights and pass through."""
    emb = {k for k, (a, _) in names.items() if a.endswith(".lora_embedding_A")}
    return [k for k in state_dict if k.endswith(".base_layer.weight") and k[: -len(".base_layer.weight")] in emb]


def lora_pairs(state_dict: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module key: (A, B)} from a PEFT LoRA state dict (``<module>.lora_A.weight`` / ``.lora_B.weight``, or an
    embedding's ``.lora_embedding_A`` / ``.lora_embedding_B``)."""
    return {k: (state_dict[a], state_dict[b]) for k, (a, b) in pair_keys(state_dict).items()}


def offset_probes(pairs: dict, scaling: float) -> list[float]:
    """Σ_ℓ s·(uᵀB₀)(A₀v) for ``_N_PROBES`` Rademacher pairs (u, v) seeded by the layer key: no m×n matrix."""
    probes = [0.0] * _N_PROBES
    for key in sorted(pairs):
        A, B = (t.detach().to("cpu", torch.float64) for t in pairs[key])
        # Conv2d factors are 4-D (r×in×kh×kw and out×r×1×1): the probe reads them as the flattened matrices
        A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little")
        g = torch.Generator().manual_seed(seed)
        for k in range(_N_PROBES):
            u = torch.randint(0, 2, (B.shape[0],), generator=g, dtype=torch.float64) * 2 - 1
            v = torch.randint(0, 2, (A.shape[1],), generator=g, dtype=torch.float64) * 2 - 1
            probes[k] += scaling * float((u @ B) @ (A @ v))
    return probes


def probes_match(a: list[float], b: list[float], rtol: float = PROBE_RTOL) -> bool:
    diff = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
    return len(a) == len(b) and diff <= rtol * max(math.sqrt(sum(x * x for x in a)), 1e-300)


def config_scaling(cfg) -> float:
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    r, alpha = get("r"), get("lora_alpha")
    return alpha / math.sqrt(r) if get("use_rslora") else alpha / r


def mark_changed_base(peft_model, adapter_name: str, method: str, pairs: dict | None = None) -> None:
    """Write the mark into ``peft_model.peft_config[adapter_name]`` (after the init wrote A₀, B₀ and the offset),
    so every later ``save_pretrained`` of the adapter records that its base was changed. ``pairs`` ({state-dict
    module key: (A₀, B₀)} as saved) is given by the sharded init, whose rank-local state dict holds only shards."""
    cfg = peft_model.peft_config[adapter_name]
    if pairs is None:
        from peft import get_peft_model_state_dict

        pairs = lora_pairs(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    cfg.init_lora_weights = make_mark(method, offset_probes(pairs, config_scaling(cfg)))


def model_mark(peft_model, adapter_name: str = "default") -> dict | None:
    """The parsed mark of an in-memory adapter (None when its init changed no base weight)."""
    return parse_mark(getattr(peft_model.peft_config[adapter_name], "init_lora_weights", None))


def current_probes(peft_model, adapter_name: str = "default") -> list[float]:
    from peft import get_peft_model_state_dict

    pairs = lora_pairs(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    return offset_probes(pairs, config_scaling(peft_model.peft_config[adapter_name]))


# ---- reading saved adapters ----


def _adapter_files(path: str, what: str) -> tuple[str, str]:
    if not os.path.isdir(path):
        raise SliceInitError(f"{what} {path!r}: no such folder")
    cfg = os.path.join(path, CONFIG_NAME)
    weights = [os.path.join(path, n) for n in (WEIGHTS_NAME, _BIN_NAME) if os.path.isfile(os.path.join(path, n))]
    if not os.path.isfile(cfg):
        subs = sorted(
            d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, CONFIG_NAME))
        )  # PEFT saves an adapter not named 'default' into a subfolder of its name
        hint = (
            f"; it holds adapters in subfolders {subs} (PEFT's layout for adapter names other than 'default'): "
            f"pass the subfolder, e.g. {os.path.join(path, subs[0])!r}"
            if subs
            else "; pass the folder that save_pretrained or a Trainer checkpoint wrote"
        )
        raise SliceInitError(f"{what} {path!r} has no {CONFIG_NAME}{hint}")
    if not weights:
        raise SliceInitError(f"{what} {path!r} has {CONFIG_NAME} but no {WEIGHTS_NAME} (or {_BIN_NAME})")
    return cfg, weights[0]


def read_adapter(path: str, what: str = "adapter") -> tuple[dict, dict]:
    """(config as a dict, state dict) of a saved PEFT adapter folder."""
    cfg_file, weights_file = _adapter_files(path, what)
    with open(cfg_file) as f:
        cfg = json.load(f)
    if weights_file.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(weights_file)
    else:
        sd = torch.load(weights_file, map_location="cpu", weights_only=True)
    return cfg, sd


def _check_pair(tcfg: dict, icfg: dict, tsd: dict, isd: dict, trained_dir: str, initial_dir: str):
    for name, cfg, where in (("trained", tcfg, trained_dir), ("initial", icfg, initial_dir)):
        if cfg.get("peft_type") != "LORA":
            raise SliceInitError(f"{name} adapter {where!r} is a {cfg.get('peft_type')!r} adapter, not LoRA")
        if cfg.get("use_dora"):
            raise SliceInitError(f"{name} adapter {where!r} uses DoRA, which has no plain-LoRA conversion")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise SliceInitError(
                f"{name} adapter {where!r} has rank_pattern/alpha_pattern; the conversion needs one rank and alpha"
            )
    for key in ("r", "lora_alpha", "use_rslora", "fan_in_fan_out"):
        if tcfg.get(key) != icfg.get(key):
            raise SliceInitError(
                f"trained adapter {trained_dir!r} has {key}={tcfg.get(key)!r} but the initial adapter "
                f"{initial_dir!r} has {icfg.get(key)!r}: they are not the same adapter before and after training"
            )
    names = pair_keys(tsd)
    paired = {key for ab in names.values() for key in ab}
    paired |= set(embedding_copies(tsd, names))
    extra = sorted(k for k in tsd if k not in paired)
    if extra:
        raise SliceInitError(
            f"trained adapter {trained_dir!r} holds weights other than lora_A/lora_B ({extra[:3]}), e.g. "
            f"modules_to_save or lora_bias: a plain LoRA for the original base cannot carry them"
        )
    tp, ip = lora_pairs(tsd), lora_pairs(isd)
    if set(tp) != set(ip):
        only_t, only_i = sorted(set(tp) - set(ip)), sorted(set(ip) - set(tp))
        raise SliceInitError(
            f"the adapters target different layers: only in the trained one {only_t[:3]}, only in the initial one "
            f"{only_i[:3]}; pass the initial adapter saved for this training run"
        )
    for k in tp:
        if tuple(tp[k][0].shape) != tuple(ip[k][0].shape) or tuple(tp[k][1].shape) != tuple(ip[k][1].shape):
            raise SliceInitError(
                f"layer {k!r}: trained A/B shapes {tuple(tp[k][0].shape)}/{tuple(tp[k][1].shape)} differ from the "
                f"initial adapter's {tuple(ip[k][0].shape)}/{tuple(ip[k][1].shape)} (different ranks?)"
            )
    return tp, ip


def check_initial_matches(mark: dict, initial_pairs: dict, scaling: float, initial_dir: str, trained: str) -> None:
    got = offset_probes(initial_pairs, scaling)
    if not probes_match(mark["probes"], got):
        raise SliceInitError(
            f"the initial adapter {initial_dir!r} is not the initial adapter of {trained}: the fingerprint of its "
            f"offset s·B0·A0 differs from the one recorded at init (probes {got[:2]}… against "
            f"{mark['probes'][:2]}…). Pass the initial adapter saved right after get_slice_model for this run"
        )


# what a folder written by save_pretrained holds: the only contents convert_adapter may replace
_ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, _BIN_NAME, "README.md"}


def check_out_dir(out_dir: str, inputs) -> None:
    """Refuse an output folder that is, or contains, an input, or that holds anything but a saved adapter (it is
    replaced whole, so a run folder given by mistake must not be deleted)."""
    out = os.path.realpath(out_dir)  # through symlinked parents too
    for p in inputs:
        src = os.path.realpath(p)
        if os.path.commonpath([out, src]) == out:
            raise SliceInitError(
                f"out_dir {out_dir!r} is or contains the input folder {p!r}; write the conversion to a new folder"
            )
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise SliceInitError(f"out_dir {out_dir!r} is a file; pass a folder")
        other = sorted(set(os.listdir(out_dir)) - _ADAPTER_FILES)
        if other:
            raise SliceInitError(
                f"out_dir {out_dir!r} holds more than a saved adapter ({other[:3]}), and it would be replaced "
                f"whole; pass a new folder"
            )


def convert_adapter(trained_dir: str, initial_dir: str, out_dir: str, *, check_initial: bool = True) -> str:
    """Turn a trained adapter whose init changed the base (a Trainer checkpoint folder or a ``save_pretrained``
    folder) plus its saved initial adapter into a plain LoRA folder for the original, untouched base, offline
    from the adapter files alone: ΔW = s·B·A − s·B₀·A₀ = [B | −B₀]·[A; A₀], rank 2r, α doubled (×√2 with rsLoRA)
    so the scaling is unchanged: what PEFT's ``path_initial_model_for_weight_conversion`` writes, tensor for
    tensor. ``check_initial`` compares the initial adapter with the fingerprint in the trained adapter's mark.
    Returns ``out_dir``. Everything is checked before ``out_dir`` is written."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tcfg, tsd = read_adapter(trained_dir, "trained adapter")
    icfg, isd = read_adapter(initial_dir, "initial adapter")
    check_out_dir(out_dir, (trained_dir, initial_dir))
    tp, ip = _check_pair(tcfg, icfg, tsd, isd, trained_dir, initial_dir)
    init_w = tcfg.get("init_lora_weights")
    mark = parse_mark(init_w)
    if mark is None:
        if init_w is True:
            warnings.warn(
                f"trained adapter {trained_dir!r} carries no slice-kernels mark (saved before 0.2.1, or its init "
                f"changed no weight), so the initial adapter cannot be checked against it; converting anyway",
                stacklevel=2,
            )
        elif not (isinstance(init_w, str) and init_w.lower().startswith(_PEFT_MUTATING)):
            raise SliceInitError(
                f"trained adapter {trained_dir!r} has init_lora_weights={init_w!r}: that init does not change the "
                f"base weights, so the adapter already fits the original model and needs no conversion"
            )
    elif check_initial:
        check_initial_matches(mark, ip, config_scaling(tcfg), initial_dir, f"trained adapter {trained_dir!r}")

    names = pair_keys(tsd)
    out = {k: tsd[k] for k in embedding_copies(tsd, names)}
    for k, (A, B) in tp.items():
        A0, B0 = ip[k]
        a_key, b_key = names[k]
        out[a_key] = torch.cat([A, A0.to(A.dtype)], dim=0).contiguous()
        out[b_key] = torch.cat([B, -B0.to(B.dtype)], dim=1).contiguous()
    cfg = LoraConfig.from_pretrained(trained_dir)
    cfg.init_lora_weights = True
    cfg.r *= 2
    cfg.lora_alpha *= 2**0.5 if cfg.use_rslora else 2  # PEFT's rule: the scaling s is unchanged
    cfg.inference_mode = True

    # write into a sibling temporary folder and swap it in, so a failure leaves no half-written adapter
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        save_file(out, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        cfg.save_pretrained(tmp)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)  # an adapter folder (checked above), replaced as save_pretrained would
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
