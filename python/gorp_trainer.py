#!/usr/bin/env python
"""Recipe: GORP in a transformers Trainer, with its full-rank weights saved, resumed and exported.

GORP trains some base weights full-rank (gate_proj here) beside LoRA adapters (q_proj, v_proj). Trainer saves
only the PEFT adapter of a PEFT model; ``GorpCheckpointCallback`` adds the full-rank weights to every
checkpoint and to the output directory and restores them on ``trainer.train(resume_from_checkpoint=...)``.
GorpAdamW's own state (moments, projectors, shared spaces) is in Trainer's optimizer.pt.

    python python/gorp_trainer.py                        # tiny Llama, 8 steps, interrupted at 4 and resumed
    python python/gorp_trainer.py --idiom create_optimizer --out /tmp/gorp_run
    python python/gorp_trainer.py --model /path/to/SmolLM2-135M --steps 100 --save-steps 50

Two ways to hand GorpAdamW to Trainer (``--idiom``): ``optimizers=(optimizer, scheduler)`` (built before the
Trainer, so the full-rank weights are unfrozen before it counts the trainable parameters), or a Trainer subclass
whose ``create_optimizer`` builds it (Trainer then makes its usual scheduler from the TrainingArguments).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch


def load_model(path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if path:
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def toy_rows(n, vocab, seed=0, seq=32, shift=3):
    """Stand-in for a task: token sequences with next = (token + shift) mod vocab, one example per row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = (torch.randint(0, vocab, (1,), generator=g) + shift * torch.arange(seq)) % vocab
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def gorp_kwargs(args):
    # the reference's LLaMA recipe: gate_proj full-rank at lr/200, Adam eps 1e-6 (docs/gorp.md)
    return dict(full_rank=["gate_proj"], rank=args.gorp_rank, lr=args.lr, update_proj_gap=args.gap)


def stop_at(step):
    """A callback that ends training after ``step`` (and its checkpoint), as a crash or a preemption would."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = True

    return StopAt()


def build(args, out, stop=None):
    """A fresh PEFT model, GORP optimizer and Trainer, as a resumed process would build them."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    import slice_kernels as sk

    model = get_peft_model(
        load_model(args.model),
        LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    targs = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=2,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=1,
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=max(1, args.steps // 4),
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    rows = toy_rows(2 * args.steps, model.config.vocab_size)
    callbacks = [sk.GorpCheckpointCallback()] + ([stop_at(stop)] if stop else [])
    if args.idiom == "optimizers":
        opt = sk.build_gorp_optimizer(model, **gorp_kwargs(args))
        sched = get_linear_schedule_with_warmup(opt, 1, args.steps)
        return Trainer(model=model, args=targs, train_dataset=rows, optimizers=(opt, sched), callbacks=callbacks)

    class GorpTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = sk.build_gorp_optimizer(self.model, **gorp_kwargs(args))
            return self.optimizer

    # build_gorp_optimizer unfreezes gate_proj only when Trainer calls create_optimizer, after Trainer's own
    # trainable-parameter checks: unfreeze it up front so the model is the same from the start
    for n, p in model.named_parameters():
        if n.endswith("gate_proj.weight"):
            p.requires_grad_(True)
    return GorpTrainer(model=model, args=targs, train_dataset=rows, callbacks=callbacks)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--model", default=None, help="local model directory or hub id (default: a tiny Llama)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--save-steps", type=int, default=4, help="checkpoint every this many steps")
    ap.add_argument("--interrupt-at", type=int, default=4, help="stop at this step, then resume (0: no interruption)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--gorp-rank", type=int, default=4)
    ap.add_argument("--gap", type=int, default=2, help="GORP's projector refresh interval T")
    ap.add_argument("--idiom", choices=["optimizers", "create_optimizer"], default="optimizers")
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = ap.parse_args(argv)

    import slice_kernels as sk

    out = args.out or tempfile.mkdtemp(prefix="gorp_trainer_")
    if args.interrupt_at:
        first = build(args, out, stop=args.interrupt_at)  # a run that stops after the checkpoint at this step
        first.train()
        trainer = build(args, out)  # a new process: same model, optimizer, Trainer
        trainer.train(resume_from_checkpoint=os.path.join(out, f"checkpoint-{args.interrupt_at}"))
    else:
        trainer = build(args, out)
        trainer.train()

    model = trainer.model.eval()
    probe = toy_rows(1, model.config.vocab_size, seed=1)[0]["input_ids"][None]
    with torch.no_grad():
        trained = model(input_ids=probe).logits
    export = os.path.join(out, "export")
    sk.save_gorp_adapter(model, export)  # the adapter plus gorp_full_rank.safetensors beside it
    loaded = sk.load_gorp_adapter(load_model(args.model), export).eval()
    with torch.no_grad():
        diff = (loaded(input_ids=probe).logits - trained).abs().max().item()
    summary = {
        "out": out,
        "global_step": trainer.state.global_step,
        "checkpoints": sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")),
        "max_abs_diff_exported": diff,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
