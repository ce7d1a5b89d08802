"""Greedy generation and scoring with each task's own scorer."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .data import pad_id, prompt_text
from .tasks import Task


@torch.no_grad()
def generate(
    model,
    tok,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    max_len: int,
    desc: str = "eval",
    progress: bool = True,
) -> list[str]:
    """Greedy completions, cut at the first newline (answers are one line)."""
    device = next(model.parameters()).device
    pad = pad_id(tok)
    outs: list[str] = []
    was_training = model.training
    model.eval()
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        enc = [tok(p, add_special_tokens=True)["input_ids"][-max_len:] for p in prompts[i : i + batch_size]]
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
            outs.append(text.strip().split("\n", 1)[0].strip())
    model.train(was_training)
    return outs


def evaluate_task(
    model, tok, task: Task, *, shots: int = 0, max_new_tokens: int, batch_size: int, max_len: int, progress: bool = True
) -> tuple[float, list[dict]]:
    """Mean score over the task's held-out examples; k-shot prompts use its first k training examples."""
    demos = task.train[:shots]
    prompts = [prompt_text(ex, demos) for ex in task.eval]
    preds = generate(
        model,
        tok,
        prompts,
        max_new_tokens,
        batch_size,
        max_len,
        desc=f"eval {task.name}{f' {shots}-shot' if shots else ''}",
        progress=progress,
    )
    rows = [{"answer": ex.answer, "prediction": p, "score": task.score(p, ex)} for ex, p in zip(task.eval, preds)]
    return (sum(r["score"] for r in rows) / len(rows) if rows else 0.0), rows
