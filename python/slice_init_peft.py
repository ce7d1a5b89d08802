#!/usr/bin/env python
"""Recipe: initialize a LoRA adapter with SLICE in a transformers + PEFT script, train it briefly, save it.

Copy this file and replace the toy data with your tasks. By default a tiny Llama is built from a config so the
script runs in seconds on CPU, no download; ``--model DIR`` loads a real causal LM (a local directory or a hub
id your machine can reach).

    python python/slice_init_peft.py                      # tiny model, SLICE init, a few training steps
    python python/slice_init_peft.py --method lora_ga --out /tmp/run
    python python/slice_init_peft.py --model /path/to/SmolLM2-135M --rank 16

Stage t of a continual run looks like this: the current task's batches give G_cur, a few batches from each
earlier task's replay buffer give G_prev, SLICE removes the conflicting part and factorizes the rest into A, B.
Outputs at initialization equal the base model's; after training the adapter is saved twice: as a plain LoRA of
rank 2r that loads on the untouched base model, and merged into the weights (the base for stage t + 1).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch


def toy_batches(n, vocab, seed, batch=4, seq=32, shift=0):
    """Stand-in for a task: token sequences following a simple rule (next = (token + shift) mod vocab)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        ids = (start + shift * torch.arange(seq)) % vocab
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--model", default=None, help="local model directory or hub id (default: a tiny Llama)")
    ap.add_argument("--method", default="slice", choices=["slice", "lora_ga", "lora_ga_peft", "loram", "lora"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=4, help="batches per gradient estimate")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = ap.parse_args(argv)

    from peft import LoraConfig, PeftModel

    import slice_kernels as sk

    model = load_model(args.model)
    vocab = model.config.vocab_size
    # Task t = 3: the current task, plus replay buffers of tasks 1 and 2.
    current = toy_batches(args.steps + args.train_steps, vocab, seed=3, shift=3)
    replay = [toy_batches(args.steps, vocab, seed=1, shift=1), toy_batches(args.steps, vocab, seed=2, shift=2)]

    lora_config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        use_rslora=True,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    slice_config = sk.SliceConfig(method=args.method, current_steps=args.steps, replay_steps=args.steps)

    probe = current[-1]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=probe).logits
    peft_model = sk.get_slice_model(model, lora_config, slice_config, current=current, replay=replay)
    with torch.no_grad():
        at_init = peft_model(input_ids=probe).logits
    rep = peft_model.slice_init_report
    print(
        f"init {args.method}: gamma={rep.gamma} cos={rep.cos} "
        f"max|Δlogits| at init={(at_init - before).abs().max().item():.2e}"
    )

    out = args.out or tempfile.mkdtemp(prefix="slice_init_")
    init_dir = os.path.join(out, "slice_init")
    sk.save_initial_adapter(peft_model, init_dir)  # before training: needed to convert to plain LoRA later

    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for i, batch in enumerate(current[args.steps :]):
        loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i == 0 or i == args.train_steps - 1:
            print(f"step {i}: loss {loss.item():.4f}")
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(input_ids=probe).logits

    lora_dir = os.path.join(out, "lora")
    sk.save_as_lora(peft_model, lora_dir, init_dir)  # rank-2r LoRA for the untouched base model
    reloaded = PeftModel.from_pretrained(load_model(args.model), lora_dir)
    with torch.no_grad():
        diff_reload = (reloaded(input_ids=probe).logits - trained).abs().max().item()

    merged = peft_model.merge_and_unload()  # the weights for stage t + 1
    with torch.no_grad():
        diff_merge = (merged(input_ids=probe).logits - trained).abs().max().item()
    summary = {
        "method": args.method,
        "gamma": rep.gamma,
        "cos": rep.cos,
        "out": out,
        "max_abs_diff_reloaded": diff_reload,
        "max_abs_diff_merged": diff_merge,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
