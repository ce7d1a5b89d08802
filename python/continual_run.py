#!/usr/bin/env python
"""Recipe: a continual run from Python, with your own tasks and a method of your own beside the built-ins.

    python python/continual_run.py                         # SmolLM2-135M, 2 reasoning-gym tasks + a JSONL task
    python python/continual_run.py --model /path/to/causal_lm --steps 20 --out runs/mine
    python python/continual_run.py --resume --out runs/recipe   # continue a killed run

What it shows: tasks as reasoning-gym names and a JSONL file of {"prompt", "answer", "metric"}; a method
registered in ``slice_kernels.runner.methods`` (here: SLICE init at half projection strength, a variant you
might want to compare); ``run`` writing results.json, summary.md and plots into --out, then reading R back.
The same run from the shell: ``slice-kernels run --tasks chain_sum,basic_arithmetic,capitals.jsonl ...``.
"""

from __future__ import annotations

import argparse
import json
import os

from slice_kernels.runner import make_config, run
from slice_kernels.runner.methods import InitMethod, register

CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Greece", "Athens"),
]


class HalfSlice(InitMethod):
    """SLICE with c = 0.5: removes half of the conflicting replay component (SliceConfig.projection_strength)."""

    init = "slice"

    def init_adapter(self, ctx):
        ctx.options = dict(ctx.options, projection_strength=0.5)
        return super().init_adapter(ctx)


register("slice_c0.5", HalfSlice, overwrite=True)


def write_capitals(path: str) -> str:
    with open(path, "w") as f:
        for country, city in CAPITALS:
            f.write(
                json.dumps({"prompt": f"What is the capital of {country}?", "answer": city, "metric": "exact"}) + "\n"
            )
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--n-eval", type=int, default=8)
    p.add_argument("--methods", default="lora,slice,slice_c0.5")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    # the task file goes beside --out, not into it: a fresh run takes only a new or empty directory
    tasks_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(tasks_dir, exist_ok=True)
    capitals = write_capitals(os.path.join(tasks_dir, "capitals.jsonl"))
    cfg = make_config(
        "default",
        model=a.model,
        tasks=["chain_sum", "basic_arithmetic", capitals],
        heldout=["letter_counting"],
        methods=a.methods.split(","),
        steps=a.steps,
        rank=a.rank,
        targets=a.targets.split(","),
        n_train=64,
        n_eval=a.n_eval,
        n_heldout=4,
        ip_shots=2,
        grad_batches=2,
        replay_batches=2,
        grad_batch_size=4,
        batch_size=4,
        max_len=48,
        max_new_tokens=6,
    )
    results = run(cfg, a.out, resume=a.resume)
    for m, r in results["methods"].items():
        print(m, "R =", [[None if x is None else round(x, 2) for x in row] for row in r["R"]])
    return results


if __name__ == "__main__":
    main()
