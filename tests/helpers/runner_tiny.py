"""A tiny causal LM directory built offline for the runner's tests: a character-level tokenizer and a
2-layer Llama from a config, saved with save_pretrained so the runner loads it through --model."""

from __future__ import annotations

import json
import string

import torch

CHARS = string.printable[:95]  # digits, letters, punctuation, space


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in CHARS + "\n":
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# A minimal ChatML-like template over the character vocabulary (every character of it is in CHARS).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)


def save_tiny_llama(path: str, seed: int = 0, tied: bool = False, chat_template: str | None = None) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    if chat_template is not None:
        tok.chat_template = chat_template
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: str, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def save_not_causal(path: str) -> str:
    """A BERT encoder directory: a transformers model, but not a causal LM."""
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(path)
    return path


def addition_tasks(directory: str, ks=(1, 2, 3), rows: int = 20) -> list[str]:
    """JSONL tasks ``t<k>.jsonl`` of "i+k=" questions: small, offline, scored by exact match."""
    import os

    return [
        write_jsonl(
            os.path.join(directory, f"t{k}.jsonl"), [{"prompt": f"{i}+{k}=", "answer": str(i + k)} for i in range(rows)]
        )
        for k in ks
    ]


def tiny_run_config(model: str, tasks: list[str], **overrides):
    """A run configuration that takes about a second on the tiny Llama: rank 2, two steps per task, one
    gradient and one replay batch of 4, 16-token sequences."""
    from slice_kernels.runner import make_config

    base = dict(
        model=model,
        tasks=tasks,
        heldout=[],
        rank=2,
        steps=2,
        n_train=12,
        n_eval=3,
        batch_size=4,
        grad_batch_size=4,
        grad_batches=1,
        replay_batches=1,
        max_len=16,
        max_new_tokens=2,
        targets=["q_proj", "v_proj"],
        seed=1,
    )
    base.update(overrides)
    return make_config("default", **base)
