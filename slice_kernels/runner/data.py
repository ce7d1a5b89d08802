"""Prompt formats, tokenization with answer-only labels, batching, and replay buffers.

``"plain"`` (the default profile's: the same text for every tokenizer, so runs compare across models)::

    Question: <prompt>
    Answer: <answer><eos>

k-shot prompts prepend k solved examples separated by blank lines.

``"chat"`` (the SLICE reference's, which formats every example with the instruct model's chat template): the
prompt is a user turn, the answer the assistant turn, through the tokenizer's own ``apply_chat_template``
(k-shot: k user/assistant turns before the question); the answer's tokens are what the template appends after
the generation prompt (for SmolLM2, the answer, ``<|im_end|>`` and a newline).

Training labels cover the answer tokens (and the eos / end of turn) only, unless ``train_on="prompt+answer"``
(the reference's causal-LM loss over the whole sequence); prompts are cut from the left to fit ``max_len``.
"""

from __future__ import annotations

import random

import torch

from .tasks import Example

TRAIN_ON = ("answer", "prompt+answer")
PROMPT_FORMATS = ("plain", "chat")


def prompt_text(ex: Example, shots: list[Example] = ()) -> str:
    ctx = "".join(f"Question: {s.prompt}\nAnswer: {s.answer}\n\n" for s in shots)
    return f"{ctx}Question: {ex.prompt}\nAnswer:"


def check_prompt_format(tok, fmt: str, model: str = "the model") -> None:
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format={fmt!r} is not one of {', '.join(PROMPT_FORMATS)}")
    if fmt == "chat" and not getattr(tok, "chat_template", None):
        raise ValueError(
            f"--prompt-format chat needs a tokenizer with a chat template, and {model}'s has none; use "
            f"--prompt-format plain, or add a chat_template to its tokenizer_config.json"
        )


def _chat_messages(ex: Example, shots) -> list[dict]:
    msgs = []
    for s in shots:
        msgs += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.answer}]
    return msgs + [{"role": "user", "content": ex.prompt}]


def _chat_prompt_and_answer(tok, ex: Example, shots=()) -> tuple[str, str]:
    msgs = _chat_messages(ex, shots)
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": ex.answer}], tokenize=False)
    if not full.startswith(prompt):  # the answer's tokens are defined as what the template appends
        raise ValueError(
            "the tokenizer's chat template does not extend the generation prompt with the answer (the conversation "
            "with the answer does not start with the prompt); use --prompt-format plain"
        )
    return prompt, full[len(prompt) :]


def prompt_ids(tok, ex: Example, shots=(), fmt: str = "plain") -> list[int]:
    """The token ids a model generates the answer from."""
    if fmt == "chat":
        return tok(_chat_prompt_and_answer(tok, ex, shots)[0], add_special_tokens=False)["input_ids"]
    return tok(prompt_text(ex, shots), add_special_tokens=True)["input_ids"]


def encode(tok, ex: Example, max_len: int, train_on: str = "answer", fmt: str = "plain") -> dict:
    if fmt == "chat":
        prompt, answer = _chat_prompt_and_answer(tok, ex)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
    else:
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
    tok,
    examples: list[Example],
    n_batches: int,
    batch_size: int,
    max_len: int,
    seed: int,
    train_on: str = "answer",
    fmt: str = "plain",
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
            [encode(tok, examples[j], max_len, train_on, fmt) for j in order[b * batch_size : (b + 1) * batch_size]],
            pad,
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
