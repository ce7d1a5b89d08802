#!/usr/bin/env python
"""Recipe: TRL's SFTTrainer with a SLICE-initialized LoRA adapter, completion-only loss.

The init gradients must come from the loss SFTTrainer will train: with a prompt-completion dataset and
``SFTConfig(completion_only_loss=True)`` (TRL's default for that format) SFTTrainer tokenizes each example and
sets the labels of the prompt tokens to -100 while it prepares the dataset. The recipe therefore builds a first
SFTTrainer on the plain model only for its data pipeline and draws the init batches from
``get_train_dataloader()``: the same tokenization, masking and padding as training. Then:

1. ``get_slice_model`` on the plain model with those batches, ``save_initial_adapter``;
2. an SFTTrainer given the PEFT model itself (not ``peft_config``, which would wrap the model a second time with
   PEFT's default init);
3. after training, ``save_as_lora``: a plain LoRA of rank 2r for the untouched base model.

    python python/trl_sft.py                                # tiny Llama and a character tokenizer, no download
    python python/trl_sft.py --model /path/to/SmolLM2-135M-Instruct --steps 8 --train-steps 100

Tested with trl 1.16.0 (pinned in constraints.txt).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import string
import tempfile

import torch

CHARS = string.printable[:95]


def char_tokenizer():
    """A character-level tokenizer built offline, standing in for a real model's tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in CHARS + "\n":
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if path:
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32), AutoTokenizer.from_pretrained(
            path
        )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg), char_tokenizer()


def addition_dataset(n, seed=0):
    """A prompt-completion dataset (TRL's format for completion-only loss): "a+b=" -> "c"."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in torch.randint(0, 50, (2,), generator=g))
        rows.append({"prompt": f"{a}+{b}=", "completion": f"{a + b}"})
    return Dataset.from_list(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--model", default=None, help="local model directory or hub id (default: a tiny Llama)")
    ap.add_argument("--method", default="lora_ga", choices=["slice", "lora_ga", "lora_ga_peft", "loram", "lora"])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="batches for the init gradient")
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = ap.parse_args(argv)

    from peft import LoraConfig, PeftModel
    from trl import SFTConfig, SFTTrainer

    import slice_kernels as sk

    out = args.out or tempfile.mkdtemp(prefix="trl_sft_")
    model, tokenizer = load(args.model)
    dataset = addition_dataset(64)
    config = SFTConfig(
        output_dir=os.path.join(out, "trainer"),
        completion_only_loss=True,  # the loss on the completion tokens only (the prompt's labels are -100)
        max_length=64,
        per_device_train_batch_size=4,
        max_steps=args.train_steps,
        learning_rate=1e-3,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )

    # SFTTrainer's own data pipeline on the plain model, for the init batches only
    probe = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    current = [dict(b) for b in itertools.islice(probe.get_train_dataloader(), args.steps)]
    masked = float((current[0]["labels"] == -100).float().mean())
    del probe

    lora_config = LoraConfig(
        r=args.rank, lora_alpha=2, use_rslora=True, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    peft_model = sk.get_slice_model(
        model, lora_config, sk.SliceConfig(method=args.method, current_steps=args.steps), current=current
    )
    init_dir = os.path.join(out, "slice_init")
    sk.save_initial_adapter(peft_model, init_dir)

    trainer = SFTTrainer(model=peft_model, args=config, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.model is peft_model  # trained as given, not wrapped again
    result = trainer.train()

    lora_dir = os.path.join(out, "lora")
    sk.save_as_lora(trainer.model, lora_dir, init_dir)  # loads on the untouched base model
    # SFTConfig's default bf16=True makes accelerate wrap the model's forward in autocast; compare in float32
    trained_model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    probe_ids = tokenizer("12+30=", return_tensors="pt")["input_ids"].to(trained_model.device)
    with torch.no_grad():
        trained = trained_model(input_ids=probe_ids).logits
        base, _ = load(args.model)
        reloaded = PeftModel.from_pretrained(base.to(probe_ids.device), lora_dir).eval()
        diff = (reloaded(input_ids=probe_ids).logits - trained).abs().max().item()
    summary = {
        "out": out,
        "method": args.method,
        "masked_label_fraction": masked,
        "train_loss": result.training_loss,
        "max_abs_diff_reloaded": diff,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
