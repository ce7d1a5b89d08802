"""Greedy generation and scoring with each task's own scorer."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .data import pad_id, prompt_ids
from .tasks import Task


@torch.no_grad()
def generate(
    model,
    tok,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    max_len: int,
    desc: str = "eval",
    progress: bool = True,
) -> list[str]:
    """Greedy completions of the prompts (token ids), decoded and stripped; the caller decides how much of
    each it scores."""
    device = next(model.parameters()).device
    pad = pad_id(tok)
    outs: list[str] = []
    was_training = model.training
    model.eval()
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        enc = [p[-max_len:] for p in prompts[i : i + batch_size]]
        L = max(len(e) for e in enc)
        ids = torch.full((len(enc), L), pad, dtype=torch.long)
        att = torch.zeros((len(enc), L), dtype=torch.long)
        for j, e in enumerate(enc):  # left padding, so every row continues right after its prompt
            ids[j, L - len(e) :] = torch.tensor(e)
            att[j, L - len(e) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=att.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
        for row in gen[:, L:]:
            text = tok.decode(row.tolist(), skip_special_tokens=True)
            outs.append(text.strip())
    model.train(was_training)
    return outs


def scored_part(completion: str, metric: str) -> str:
    """What a completion is scored on: the first line for exact-match answers (they are one line, and a model
    that goes on after it has still answered), the whole greedy generation for ROUGE-L (free-text answers span
    lines; the SLICE reference scores the full generation)."""
    if metric == "rouge_l":
        return completion
    return completion.split("\n", 1)[0].strip()


def evaluate_task(
    model,
    tok,
    task: Task,
    *,
    shots: int = 0,
    max_new_tokens: int,
    batch_size: int,
    max_len: int,
    progress: bool = True,
    fmt: str = "plain",
) -> tuple[float, list[dict]]:
    """Mean score over the task's held-out examples; k-shot prompts use its first k training examples."""
    demos = task.train[:shots]
    prompts = [prompt_ids(tok, ex, demos, fmt) for ex in task.eval]
    completions = generate(
        model,
        tok,
        prompts,
        max_new_tokens,
        batch_size,
        max_len,
        desc=f"eval {task.name}{f' {shots}-shot' if shots else ''}",
        progress=progress,
    )
    preds = [scored_part(c, ex.metric) for ex, c in zip(task.eval, completions)]
    rows = [{"answer": ex.answer, "prediction": p, "score": task.score(p, ex)} for ex, p in zip(task.eval, preds)]
    return (sum(r["score"] for r in rows) / len(rows) if rows else 0.0), rows
