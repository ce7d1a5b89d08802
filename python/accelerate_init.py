#!/usr/bin/env python
"""Recipe: SLICE init with accelerate, in one process or many — the init before ``accelerator.prepare``.

Every process runs ``get_slice_model`` on the plain model with its own batches; the init averages the
gradients over the processes (torch.distributed, which ``Accelerator()`` has set up) so every process ends with
the same adapter. Only then is the PEFT model prepared (wrapped in DDP). The other order is refused:
``get_slice_model(accelerator.prepare(model), ...)`` raises "call get_slice_model before
accelerator.prepare(model)" (on a DDP model the init's backward passes would break DDP's gradient reduction).

    python python/accelerate_init.py                                                  # 1 process
    accelerate launch --multi_gpu --num_processes 2 python/accelerate_init.py --out /tmp/acc  # 2 processes
    torchrun --nproc_per_node 2 python/accelerate_init.py --out /tmp/acc                      # the same, torchrun
    accelerate launch --multi_gpu --num_processes 8 python/accelerate_init.py --model /path/to/model  # 8 GPUs

On a machine without a GPU, ``--multi_gpu`` still starts the processes (torchrun's launcher) and the script's
``Accelerator(cpu=True)`` joins them over gloo; ``accelerate launch --cpu --num_processes 2`` starts ONE process
(accelerate's plain launcher; several CPU processes need MPI there), so it is not a 2-process run.
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
    torch.manual_seed(0)  # every process builds the same weights (a real model: the same checkpoint)
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


def toy_batches(n, vocab, seed, batch=4, seq=32, shift=3):
    """Stand-in for a task: token sequences with next = (token + shift) mod vocab."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = (torch.randint(0, vocab, (batch, 1), generator=g) + shift * torch.arange(seq)) % vocab
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--model", default=None, help="local model directory or hub id (default: a tiny Llama)")
    ap.add_argument("--method", default="lora_ga", choices=["slice", "lora_ga", "lora_ga_peft", "loram", "lora"])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="batches per process for the init gradient")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = ap.parse_args(argv)

    from accelerate import Accelerator
    from peft import LoraConfig, PeftModel

    import slice_kernels as sk

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    model = load_model(args.model).to(accelerator.device)
    vocab = model.config.vocab_size
    # each process its own shard of the task's data (a DataLoader under accelerate gives the same split)
    current = toy_batches(args.steps, vocab, seed=100 + rank)
    lora_config = LoraConfig(
        r=args.rank, lora_alpha=2, use_rslora=True, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    slice_config = sk.SliceConfig(method=args.method, current_steps=args.steps)

    # 1. the init, on the plain model, in every process (the gradients are averaged over the processes)
    peft_model = sk.get_slice_model(model, lora_config, slice_config, current=current)
    out = args.out or tempfile.mkdtemp(prefix="accelerate_init_")
    init_dir = os.path.join(out, "slice_init")
    if accelerator.is_main_process:
        sk.save_initial_adapter(peft_model, init_dir)  # for the conversion to a plain LoRA at the end
    accelerator.wait_for_everyone()

    # 2. then prepare: DDP over the PEFT model, so the LoRA gradients are all-reduced in training
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    train = toy_batches(args.train_steps, vocab, seed=200 + rank)
    prepared, opt = accelerator.prepare(peft_model, opt)
    prepared.train()
    for batch in train:
        loss = prepared(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()

    # 3. save once, from the unwrapped PEFT model: a plain rank-2r LoRA for the untouched base model
    accelerator.wait_for_everyone()
    # without the mixed-precision forward wrapper (a launch with --mixed_precision bf16), to compare in float32
    unwrapped = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False).eval()
    lora_dir = os.path.join(out, "lora")
    probe = toy_batches(1, vocab, seed=1)[0]["input_ids"].to(accelerator.device)
    a = unwrapped.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    summary = {"processes": world, "out": out, "lora_A_sum": float(a.detach().double().sum())}
    if accelerator.is_main_process:
        sk.save_as_lora(unwrapped, lora_dir, init_dir)
        with torch.no_grad():
            trained = unwrapped(input_ids=probe).logits
            reloaded = PeftModel.from_pretrained(load_model(args.model).to(accelerator.device), lora_dir).eval()
            summary["max_abs_diff_reloaded"] = (reloaded(input_ids=probe).logits - trained).abs().max().item()
    with open(os.path.join(out, f"summary_rank{rank}.json"), "w") as f:
        json.dump(summary, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
