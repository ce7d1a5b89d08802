"""A checkpoint format that cannot run code: tensors in one safetensors file, everything else as JSON inside it.

``dumps(obj)`` turns a tree of dicts, lists, tuples, strings, numbers, booleans, None, torch tensors and numpy
arrays into safetensors bytes; ``loads(data)`` gives the same tree back (tuples stay tuples, integer dict keys
stay integers, floats are exact: JSON writes their shortest round-trip form). Loading parses a JSON document
and copies tensor bytes; unlike ``torch.load(weights_only=False)`` nothing in the file can name a Python
callable, so a run directory received from someone else is data, never code.

The JSON tree travels as a uint8 tensor named ``__tree__`` rather than in the safetensors header, whose size
the reader caps (predictions and replay examples can be large).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from .errors import RunnerError

_TREE = "__tree__"
# the keys of the one-key dicts that stand for a non-JSON value; a real dict using one of them is stored as
# an item list, so decoding is unambiguous
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


class StateFormatError(RunnerError):
    """An object cannot be stored in (or read back from) a checkpoint."""


def _encode(obj, tensors: dict, seen: set, where: str):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu")
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses two entries sharing memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        key = f"t{len(tensors)}"
        tensors[key] = t.contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise StateFormatError(f"{where}: a numpy array of dtype {obj.dtype} cannot be saved in a checkpoint")
        wide = np.int64 if obj.dtype.kind in "biu" else np.float64  # exact for every numeric dtype numpy RNGs use
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.array(obj, dtype=wide, copy=True))  # a C-ordered copy, 0-d stays 0-d
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, list):
        return [_encode(v, tensors, seen, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, seen, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
            return {k: _encode(v, tensors, seen, f"{where}[{k!r}]") for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, tensors, seen, f"{where} key"), _encode(v, tensors, seen, f"{where}[{k!r}]")]
                for k, v in obj.items()
            ]
        }
    raise StateFormatError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only tensors, numpy "
        f"arrays, numbers, strings, booleans, None, lists, tuples and dicts (a method's ctx.state included): "
        f"store its tensors and plain values instead"
    )


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__ndarray__", "dtype"}:
        return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    if len(obj) == 1 and "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if len(obj) == 1 and "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def dumps(obj) -> bytes:
    from safetensors.torch import save

    tensors: dict = {}
    tree = _encode(obj, tensors, set(), "checkpoint")
    tensors[_TREE] = torch.frombuffer(bytearray(json.dumps(tree).encode()), dtype=torch.uint8)
    return save(tensors)


def loads(data: bytes, source: str):
    """The tree ``dumps`` wrote; ``source`` names the file in errors."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        tree = json.loads(tensors.pop(_TREE).numpy().tobytes().decode())
        out = _decode(tree, tensors)
    except Exception as e:  # a file that passed its checksum but was not written by dumps
        raise StateFormatError(f"{source} is not a slice-kernels checkpoint ({type(e).__name__}: {e})") from None
    return out
