"""SliceSaveCallback with a real transformers.Trainer on a tiny Llama: the initial adapter saved once, a plain
LoRA for the untouched base beside every checkpoint and at the end, and resume_from_checkpoint reusing the saved
initial adapter (never overwriting it with a trained one)."""

import os

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import Trainer, TrainingArguments

from slice_kernels import SliceConfig, SliceInitError, get_slice_model
from slice_kernels.integrations import SliceSaveCallback
from slice_kernels.integrations.trainer_callback import CONVERTED_SUBDIR
from tests.helpers import lm_batches, tiny_llama

X = lm_batches(1, seed=5)[0]["input_ids"]


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=3):
        self.rows = [{k: v[i] for k, v in b.items()} for b in lm_batches(n // 4, seed=seed) for i in range(4)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def slice_model(seed_batches=0):
    return get_slice_model(
        tiny_llama(),
        LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
        SliceConfig(method="slice", current_steps=2),
        current=lm_batches(2, seed=seed_batches),
    )


def trainer(pm, out, max_steps, callback=None):
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
    )
    return Trainer(model=pm, args=args, train_dataset=Rows(), callbacks=[callback or SliceSaveCallback()])


def logits(m):
    with torch.no_grad():
        return m(input_ids=X).logits


def load_converted(folder):
    return PeftModel.from_pretrained(tiny_llama(), os.path.join(folder, CONVERTED_SUBDIR))


def test_trainer_writes_converted_adapters_that_reproduce_the_trained_model(tmp_path):
    pm = slice_model()
    trainer(pm, tmp_path, max_steps=4).train()
    pm.eval()
    trained = logits(pm)
    assert (trained - logits(tiny_llama())).abs().max() > 1e-3  # training moved the outputs
    assert os.path.isfile(tmp_path / "slice_init" / "adapter_model.safetensors")
    for folder in (tmp_path, tmp_path / "checkpoint-4"):  # the end of training and its last checkpoint
        torch.testing.assert_close(logits(load_converted(folder)), trained, rtol=0, atol=1e-5)
    two = logits(load_converted(tmp_path / "checkpoint-2"))  # an earlier step: a different, valid adapter
    assert (two - trained).abs().max() > 1e-4
    with pytest.raises(ValueError, match="changed the base weights"):  # the checkpoint's own adapter is refused
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "checkpoint-4"))


def test_resume_reuses_the_initial_adapter(tmp_path):
    pm = slice_model()
    trainer(pm, tmp_path, max_steps=4).train()
    init_bytes = (tmp_path / "slice_init" / "adapter_model.safetensors").read_bytes()

    # a new process: the same init recomputed, then Trainer loads checkpoint-4's trained adapter into it
    pm2 = slice_model()
    trainer(pm2, tmp_path, max_steps=6).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    pm2.eval()
    assert (tmp_path / "slice_init" / "adapter_model.safetensors").read_bytes() == init_bytes  # not overwritten
    assert not any(n != "default" for n in pm2.peft_config)  # no converted adapter loaded as an extra adapter
    trained = logits(pm2)
    torch.testing.assert_close(logits(load_converted(tmp_path / "checkpoint-6")), trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(load_converted(tmp_path)), trained, rtol=0, atol=1e-5)


def test_resume_without_the_initial_adapter_is_refused(tmp_path):
    pm = slice_model()
    trainer(pm, tmp_path, max_steps=2).train()
    import shutil

    shutil.rmtree(tmp_path / "slice_init")
    with pytest.raises(SliceInitError, match="no initial adapter is in"):
        trainer(slice_model(), tmp_path, max_steps=4).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_a_stale_initial_adapter_of_another_init_is_refused(tmp_path):
    trainer(slice_model(), tmp_path, max_steps=2).train()
    with pytest.raises(SliceInitError, match="is not the initial adapter of the model being trained"):
        cb = SliceSaveCallback(str(tmp_path / "slice_init"))
        trainer(slice_model(seed_batches=9), tmp_path / "x", max_steps=2, callback=cb).train()


def test_non_default_adapter_name_is_refused():
    with pytest.raises(SliceInitError, match="adapter named 'default'"):
        SliceSaveCallback(adapter_name="task1")


def test_trl_sft_trainer(tmp_path):
    """TRL's SFTTrainer subclasses Trainer: the same callback, the same converted adapters."""
    pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tests.helpers.runner_tiny import char_tokenizer

    pm = slice_model()
    rows = [r.tolist() for b in lm_batches(4, seed=3) for r in b["input_ids"]]
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
    )
    train_set = Dataset.from_dict({"input_ids": rows})
    SFTTrainer(
        model=pm, args=args, train_dataset=train_set, processing_class=char_tokenizer(), callbacks=[SliceSaveCallback()]
    ).train()
    # TRL replaces forward (on the PeftModel and on the transformers model) by a fused-loss one whose .logits are
    # not the logits: drop the instance attributes, back to the classes' forward
    for m in (pm, pm.base_model.model):
        vars(m).pop("forward", None)
    pm.eval()
    trained = logits(pm)
    assert (trained - logits(tiny_llama())).abs().max() > 1e-3
    for folder in (tmp_path, tmp_path / "checkpoint-4"):
        torch.testing.assert_close(logits(load_converted(folder)), trained, rtol=0, atol=1e-5)


def test_callback_on_a_model_without_offset_or_not_peft(tmp_path):
    from transformers import TrainerControl, TrainerState

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    plain = get_slice_model(tiny_llama(), LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"]), SliceConfig("lora"))
    cb = SliceSaveCallback()
    with pytest.warns(UserWarning, match="already fit the original model"):
        cb.on_train_begin(args, TrainerState(), TrainerControl(), model=plain)
    cb.on_save(args, TrainerState(global_step=2), TrainerControl(), model=plain)  # inactive: writes nothing
    assert not os.listdir(tmp_path)
    with pytest.raises(SliceInitError, match="needs the PeftModel of get_slice_model"):
        SliceSaveCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=tiny_llama())
