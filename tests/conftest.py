"""Shared test set-up.

Triton kernels run on CPU tensors only in the interpreter, and the interpreter is chosen when a kernel is
decorated, so TRITON_INTERPRET must be set before slice_kernels (or triton) is imported.
"""
import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import slice_kernels  # noqa: E402,F401
from slice_kernels import dispatch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


# The runner's built-in tasks come from reasoning-gym; CI installs it, the GPU machine's image has none.
HAS_REASONING_GYM = importlib.util.find_spec("reasoning_gym") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; run benches/gpu_all.sh on a GPU machine")
    skip_rg = pytest.mark.skip(reason="needs reasoning-gym for its tasks: pip install reasoning-gym")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "reasoning_gym" in item.keywords and not HAS_REASONING_GYM:
            item.add_marker(skip_rg)


def backends_for(op: str, device: str = "cpu"):
    """pytest params: every registered backend of ``op``; those that cannot run here are skipped with the
    dispatcher's own reason (e.g. 'native extension not loaded')."""
    params = []
    for b in dispatch.implementations(op):
        why = dispatch.refusal(op, b, torch.device(device))
        marks = [pytest.mark.skip(reason=f"{b} cannot run {op} on {device}: {why}")] if why else []
        params.append(pytest.param(b, marks=marks, id=f"{b}-{device}"))
    return params


def tiny_llama(dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(dtype=torch.float32, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def lm_batches(n, batch=4, seq=16, vocab=128, seed=0):
    """n batches of random token ids with labels = input_ids (a causal-LM loss)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out
