#!/usr/bin/env python
"""Recipe: SLICE init → transformers.Trainer with SliceSaveCallback → the adapter for the untouched base model.

A SLICE init changes the base weights (W − s·B₀·A₀ is absorbed), so the adapter in a Trainer checkpoint fits only
that changed base (plain PEFT refuses it, saying so). The callback saves the initial adapter when training begins
and writes, beside every checkpoint and at the end, a plain LoRA of rank 2r that loads with
``PeftModel.from_pretrained`` on the original model. TRL's trainers subclass Trainer: pass the callback the same way.

    python python/trainer_callback.py                    # tiny Llama, no download, seconds on CPU
    python python/trainer_callback.py --out /tmp/run --steps 8
    # convert a checkpoint by hand, offline, from the adapter files alone:
    slice-kernels convert /tmp/run/checkpoint-4 --initial /tmp/run/slice_init --out /tmp/run/lora4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch


def toy_rows(n, vocab, seed, seq=32, shift=3):
    """Stand-in for a task: sequences following next = (token + shift) mod vocab."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    ids = (start + shift * torch.arange(seq)) % vocab
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

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


def main(argv=None):
    from peft import LoraConfig, PeftModel
    from transformers import Trainer, TrainingArguments

    from slice_kernels import SliceConfig, convert_adapter, get_slice_model
    from slice_kernels.integrations import SliceSaveCallback

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=4, help="training steps (a checkpoint every 2)")
    ap.add_argument("--rank", type=int, default=4)
    a = ap.parse_args(argv)
    if a.steps < 2 or a.steps % 2:
        ap.error(f"--steps {a.steps}: give an even number ≥ 2 (a checkpoint every 2 steps, the last one converted)")
    out = a.out or tempfile.mkdtemp(prefix="slice-trainer-")

    rows = toy_rows(64, 256, seed=0)
    batches = [{k: torch.stack([r[k] for r in rows[i : i + 4]]) for k in rows[0]} for i in range(0, 16, 4)]
    model = get_slice_model(
        tiny_llama(),
        LoraConfig(r=a.rank, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        SliceConfig(method="slice", current_steps=4),
        current=batches,
    )
    args = TrainingArguments(
        output_dir=out,
        max_steps=a.steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[SliceSaveCallback()]).train()

    # the converted adapter on the untouched base reproduces the trained model
    x = rows[0]["input_ids"][None]
    model.eval()
    loaded = PeftModel.from_pretrained(tiny_llama(), os.path.join(out, "converted", "lora_for_original_base"))
    with torch.no_grad():
        diff_end = (loaded(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()

    # the same conversion by hand, offline, for the last checkpoint (what `slice-kernels convert` runs)
    ckpt = os.path.join(out, f"checkpoint-{a.steps}")
    mine = convert_adapter(ckpt, os.path.join(out, "slice_init"), os.path.join(out, "lora_by_hand"))
    by_hand = PeftModel.from_pretrained(tiny_llama(), mine)
    with torch.no_grad():
        diff_hand = (by_hand(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()
        moved = (tiny_llama()(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()
    summary = {
        "out": out,
        "max_abs_diff_converted": diff_end,
        "max_abs_diff_convert_by_hand": diff_hand,
        "training_moved_logits_by": moved,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
