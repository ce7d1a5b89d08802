"""Shared test helpers: the tiny models and batches, the backend parametrization, and what this machine has.

Import them as ``from tests.helpers import tiny_llama``; the runner's offline model directory is in
``tests.helpers.runner_tiny``. tests/conftest.py sets TRITON_INTERPRET before this package imports
slice_kernels.
"""

import importlib.util

import pytest
import torch

from slice_kernels import dispatch

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


# The runner's built-in tasks come from reasoning-gym; CI installs it, the GPU machine's image has none.
HAS_REASONING_GYM = importlib.util.find_spec("reasoning_gym") is not None


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
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
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
