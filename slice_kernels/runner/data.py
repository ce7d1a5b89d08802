"""Prompt format, tokenization with answer-only labels, batching, and replay buffers.

Format (plain text, the same for every tokenizer so runs compare across models)::

    Question: <prompt>
    Answer: <answer><eos>

k-shot prompts prepend k solved examples separated by blank lines. Training labels cover the answer tokens
(and the eos) only, unless ``train_on="prompt+answer"``; prompts are cut from the left to fit ``max_len``.
"""

from __future__ import annotations

import random

import torch

from .tasks import Example

TRAIN_ON = ("answer", "prompt+answer")


def prompt_text(ex: Example, shots: list[Example] = ()) -> str:
    ctx = "".join(f"Question: {s.prompt}\nAnswer: {s.answer}\n\n" for s in shots)
    return f"{ctx}Question: {ex.prompt}\nAnswer:"


def encode(tok, ex: Example, max_len: int, train_on: str = "answer") -> dict:
    p = tok(prompt_text(ex), add_special_tokens=True)["input_ids"]
    a = tok(" " + ex.answer, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        a = a + [tok.eos_token_id]
    a = a[: max_len // 2]  # an over-long answer keeps its start; the prompt keeps at least half the window
    p = p[-(max_len - len(a)) :]
    ids = p + a
    labels = ids[:] if train_on == "prompt+answer" else [-100] * len(p) + a
    return {"input_ids": ids, "labels": labels}


def collate(items: list[dict], pad_id: int) -> dict:
    L = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    lab = torch.full((len(items), L), -100, dtype=torch.long)
    att = torch.zeros((len(items), L), dtype=torch.long)
    for i, x in enumerate(items):  # right padding for training
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        lab[i, :n] = torch.tensor(x["labels"])
        att[i, :n] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def make_batches(
    tok, examples: list[Example], n_batches: int, batch_size: int, max_len: int, seed: int, train_on: str = "answer"
) -> list[dict]:
    """``n_batches`` seeded batches drawn without replacement (cycling when the data is short)."""
    if not examples:  # the loop below would never end
        raise ValueError("make_batches: no examples to draw batches from")
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n_batches * batch_size:
        perm = list(range(len(examples)))
        rng.shuffle(perm)
        order += perm
    pad = pad_id(tok)
    return [
        collate(
            [encode(tok, examples[j], max_len, train_on) for j in order[b * batch_size : (b + 1) * batch_size]], pad
        )
        for b in range(n_batches)
    ]


def replay_sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """The replay buffer of a finished task: a fixed, seeded sample of its training data (SPEC §2)."""
    rng = random.Random(seed)
    idx = rng.sample(range(len(examples)), min(n, len(examples)))
    return [examples[i] for i in idx]


def pad_id(tok) -> int:
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    if tok.eos_token_id is not None:
        return tok.eos_token_id
    return 0
