"""A file of collected gradients, reused later without running the model (PEFT: ``preprocess_loraga(...,
cache_file=)``), that refuses to be reused for anything it was not collected for.

Format: one safetensors file, tensors ``current/<layer>`` (G_cur) and, when collected, ``replay/<layer>``
(G_prev), all (out, in) float32; its header metadata holds the fingerprint as JSON under ``FINGERPRINT_KEY``.
The fingerprint names what the gradients depend on apart from the batches themselves: every target's name,
(out, in) shape, dtype and a SHA-256 of its weight bytes; which gradients were collected; the collection settings
(``current_steps``, replay steps/mode/batch size, ``single_retain_task_mode``, train/eval mode) and the loss
function. The batches are not fingerprinted: reusing a cache means "the same batches as when it was written".
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from torch import nn

from ..errors import SliceInitError
from ..modules import weight_out_in
from .config import SliceConfig

FINGERPRINT_KEY = "slice_kernels_gradient_cache"
FORMAT_VERSION = 1


def weight_digest(weight: torch.Tensor) -> str:
    """SHA-256 of a weight's bytes as stored (moved to CPU one layer at a time)."""
    raw = weight.detach().contiguous().view(torch.uint8)  # bytes, so bf16 (no numpy dtype) hashes too
    return hashlib.sha256(raw.cpu().numpy().tobytes()).hexdigest()


def _loss_name(loss_fn) -> str:
    if loss_fn is None:
        return "default"  # the model's own loss from labels (collect.default_loss)
    return f"{getattr(loss_fn, '__module__', '?')}.{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}"


def gradient_fingerprint(targets: dict[str, nn.Module], config: SliceConfig, *, replay: bool, loss_fn=None) -> dict:
    """What a cache of gradients for ``targets`` under ``config`` must match (see the module docstring).
    ``replay``: whether the replay gradient G_prev is (to be) part of the cache."""
    layers = []
    for name, mod in targets.items():
        w = weight_out_in(mod)
        layers.append([name, list(w.shape), str(mod.weight.dtype).removeprefix("torch."), weight_digest(mod.weight)])
    collection = {
        "current_steps": config.current_steps,
        "collect_train_mode": config.collect_train_mode,
        "loss_fn": _loss_name(loss_fn),
    }
    if replay:
        collection.update(
            replay_mode=config.replay_mode,
            replay_steps=config.effective_replay_steps,
            retain_batch_size=config.retain_batch_size,
            single_retain_task_mode=config.single_retain_task_mode,
        )
    return {
        "format": FORMAT_VERSION,
        "gradients": ["current", "replay"] if replay else ["current"],
        "grad_dtype": "float32",
        "collection": collection,
        "layers": layers,
    }


def save_gradient_cache(path: str, fingerprint: dict, g_cur: dict, g_prev: dict | None = None) -> None:
    """Write G_cur (and G_prev) with the fingerprint; atomic (a crash leaves no half-written cache)."""
    from safetensors.torch import save_file

    names = [row[0] for row in fingerprint["layers"]]
    want_prev = "replay" in fingerprint["gradients"]
    if set(g_cur) != set(names) or (want_prev and (g_prev is None or set(g_prev) != set(names))):
        raise SliceInitError("save_gradient_cache: the gradients do not cover the fingerprint's layers")
    if not want_prev and g_prev is not None:
        raise SliceInitError("save_gradient_cache: a replay gradient was given but the fingerprint has none")
    tensors = {f"current/{n}": g_cur[n].detach().to("cpu", torch.float32).contiguous() for n in names}
    if want_prev:
        tensors.update({f"replay/{n}": g_prev[n].detach().to("cpu", torch.float32).contiguous() for n in names})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".gradient_cache.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_fingerprint(path: str) -> dict:
    """The fingerprint stored in a cache file, or a clear error when the file is not one."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # not a safetensors file (e.g. a PEFT torch.save cache)
        raise SliceInitError(
            f"gradient cache {path!r} is not a slice_kernels gradient cache (safetensors): {e}. Delete it or "
            f"pass another gradient_cache path"
        ) from e
    if FINGERPRINT_KEY not in meta:
        raise SliceInitError(
            f"gradient cache {path!r} is a safetensors file without slice_kernels' fingerprint; delete it or pass "
            f"another gradient_cache path"
        )
    return json.loads(meta[FINGERPRINT_KEY])


def _differences(found: dict, expected: dict) -> list[str]:
    out = []
    for key in ("format", "gradients", "grad_dtype"):
        if found.get(key) != expected.get(key):
            out.append(f"{key}: cache {found.get(key)!r}, now {expected.get(key)!r}")
    fc, ec = found.get("collection", {}), expected.get("collection", {})
    for key in sorted(set(fc) | set(ec)):
        if fc.get(key) != ec.get(key):
            out.append(f"collection.{key}: cache {fc.get(key)!r}, now {ec.get(key)!r}")
    fl = {row[0]: row[1:] for row in found.get("layers", [])}
    el = {row[0]: row[1:] for row in expected.get("layers", [])}
    if list(fl) != list(el):
        out.append(f"target layers: cache {list(fl)[:4]}…({len(fl)}), now {list(el)[:4]}…({len(el)})")
    for name in el:
        if name in fl and fl[name] != el[name]:
            what = [k for k, a, b in zip(("shape", "dtype", "weight checksum"), fl[name], el[name]) if a != b]
            out.append(f"layer {name!r}: {', '.join(what)} differ")
    return out


def load_gradient_cache(path: str, fingerprint: dict, devices: dict | None = None):
    """(G_cur, G_prev or None) from ``path`` after checking its fingerprint against ``fingerprint``; tensors go to
    ``devices[name]`` (default CPU)."""
    from safetensors import safe_open

    found = read_fingerprint(path)
    diff = _differences(found, fingerprint)
    if diff:
        raise SliceInitError(
            f"gradient cache {path!r} was collected for something else: {'; '.join(diff[:6])}"
            f"{'…' if len(diff) > 6 else ''}. Delete it (it is collected again) or pass another gradient_cache path"
        )
    devices = devices or {}
    names = [row[0] for row in fingerprint["layers"]]
    g_cur, g_prev = {}, ({} if "replay" in fingerprint["gradients"] else None)
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        for n in names:
            for kind, dst in (("current", g_cur), ("replay", g_prev)):
                if dst is None:
                    continue
                key = f"{kind}/{n}"
                if key not in keys:
                    raise SliceInitError(f"gradient cache {path!r} lacks {key!r}; delete it and collect again")
                t = f.get_tensor(key)
                shape = next(row[1] for row in fingerprint["layers"] if row[0] == n)
                if list(t.shape) != shape or t.dtype != torch.float32:
                    raise SliceInitError(
                        f"gradient cache {path!r}: {key!r} is {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} "
                        f"float32; delete it and collect again"
                    )
                dst[n] = t.to(devices.get(n, "cpu"))
    return g_cur, g_prev
