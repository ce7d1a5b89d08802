"""PS-LoRA with a transformers Trainer: train a PEFT LoRA model on two tasks in a row, with the stability loss
off and on, and compare how much of task 1 survives task 2.

    python python/ps_lora_trainer.py                      # tiny Llama built from a config: seconds on CPU
    python python/ps_lora_trainer.py --steps 200 --lam 5  # longer runs, stronger stability weight

Per run: task 1 is trained with plain LoRA, its adapter is recorded in a HistoryStore and merged; task 2 is
trained with ``PSLoRATrainer`` (``StabilityLossMixin`` over ``transformers.Trainer``), whose ``compute_loss``
adds λ·Σ_ℓ (L_dir + β·L_mag) against that history (λ = 0 is the "off" run). With ``--merge magnitude`` the
two adapters are combined by SPEC §3's magnitude merge instead of summed. The tasks are synthetic so the
recipe needs no download: token sequences that step by +1 (task 1) or by +3 (task 2) modulo the vocabulary.
Copy this file and replace ``make_task``/``tiny_model`` with your data and model.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from torch.utils.data import Dataset


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


class ArithmeticTask(Dataset):
    """Sequences x_{i+1} = x_i + step (mod vocab); labels = inputs (causal LM)."""

    def __init__(self, step: int, n: int, seq: int = 16, vocab: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(seq)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make_task(step: int, seed: int):
    return ArithmeticTask(step, 256, seed=seed), ArithmeticTask(step, 64, seed=seed + 1000)


@torch.no_grad()
def eval_loss(model, ds) -> float:
    model.eval()
    batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ("input_ids", "attention_mask", "labels")}
    return float(model(**batch).loss)


def train_stage(model, train_ds, *, steps, lr, seed, history=None, lam=0.0, beta=0.1, mode="tanh"):
    """Wrap ``model`` in a fresh LoRA adapter and train it; returns the PeftModel (not merged)."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from slice_kernels import ParameterStabilityLoss, PSLoRATrainer

    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    )
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=16,
            learning_rate=lr,
            logging_steps=max(1, steps // 4),
            report_to=[],
            save_strategy="no",
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        trainer = PSLoRATrainer(model=peft_model, args=args, train_dataset=train_ds)
        if history is not None and lam > 0:
            trainer.stability_loss = ParameterStabilityLoss(history, lam=lam, beta=beta, mode=mode)
        trainer.train()
    return peft_model


def run(lam: float, args) -> dict:
    from slice_kernels import HistoryStore
    from slice_kernels.modules import lora_factors, lora_layers
    from slice_kernels.ps_lora import ParameterStabilityLoss, merge_magnitude_into_base

    (t1_train, t1_eval), (t2_train, t2_eval) = make_task(1, seed=1), make_task(3, seed=2)
    model = tiny_model(args.seed)
    history = HistoryStore(args.history)
    updates: dict = {}

    def record(pm):
        history.record_task(pm)
        for name, mod, ad in lora_layers(pm):
            B, A, s = lora_factors(mod, ad)
            updates.setdefault(name, []).append({"B": B.detach().clone(), "A": A.detach().clone(), "s": s})

    pm = train_stage(model, t1_train, steps=args.steps, lr=args.lr, seed=args.seed)
    record(pm)
    model = merge_magnitude_into_base(pm, updates) if args.merge == "magnitude" else pm.merge_and_unload()
    after1 = eval_loss(model, t1_eval)

    pm = train_stage(
        model,
        t2_train,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed + 1,
        history=history,
        lam=lam,
        beta=args.beta,
        mode=args.mode,
    )
    stability = float(ParameterStabilityLoss(history, lam=1.0, beta=args.beta, mode=args.mode)(pm).detach())
    record(pm)
    model = merge_magnitude_into_base(pm, updates) if args.merge == "magnitude" else pm.merge_and_unload()
    return {
        "lambda": lam,
        "task1_loss_after_task1": after1,
        "task1_loss_after_task2": eval_loss(model, t1_eval),
        "task2_loss_after_task2": eval_loss(model, t2_eval),
        "stability_term_at_end": stability,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lam", type=float, default=2.0, help="λ of the 'on' run")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--mode", choices=["tanh", "hinge"], default="tanh")
    p.add_argument("--history", choices=["factors", "dense", "bits"], default="factors")
    p.add_argument("--merge", choices=["sum", "magnitude"], default="sum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    results = [run(0.0, args), run(args.lam, args)]
    print(
        f"{'run':<6} {'λ':>5} {'task1 after t1':>15} {'task1 after t2':>15} {'task2 after t2':>15} {'L_s at end':>11}"
    )
    for name, r in zip(("off", "on"), results):
        print(
            f"{name:<6} {r['lambda']:>5.2f} {r['task1_loss_after_task1']:>15.4f} {r['task1_loss_after_task2']:>15.4f} "
            f"{r['task2_loss_after_task2']:>15.4f} {r['stability_term_at_end']:>11.4f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
