"""GORP's full-rank weights in checkpoints: a Trainer run interrupted and resumed equals an uninterrupted one,
GorpAdamW's state survives torch.save, the export loads on the untouched base, bad files are refused."""

import io
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

from slice_kernels.errors import NotFoundError
from slice_kernels.gorp import build_gorp_optimizer
from slice_kernels.gorp.persist import (
    FULL_RANK_FILE,
    GorpCheckpointError,
    full_rank_parameters,
    load_full_rank_weights,
    load_gorp_adapter,
    save_full_rank_weights,
    save_gorp_adapter,
)
from tests.helpers import lm_batches, tiny_gpt2, tiny_llama

STEPS, CUT = 6, 3
GATES = [f"model.layers.{i}.mlp.gate_proj.weight" for i in range(2)]


def _peft_model(seed=0):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(tiny_llama(seed=seed), cfg)


def _optimizer(model):
    # gap 2: projector refreshes fall on both sides of the cut; full-rank lr as large as LoRA's so the
    # full-rank weights move visibly in a few steps
    return build_gorp_optimizer(
        model, full_rank=["gate_proj"], rank=4, lr=1e-2, full_rank_lr_ratio=1.0, update_proj_gap=2
    )


def _rows(n=2 * STEPS):
    return [{k: v[0] for k, v in b.items()} for b in lm_batches(n, batch=1, seed=7)]


def _stop_at(step):
    """A callback that ends training after ``step``, as a crash right after that step's checkpoint would."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = True

    return StopAt()


def _trainer(model, out, *, callbacks):
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    opt = _optimizer(model)
    sched = get_linear_schedule_with_warmup(opt, 1, STEPS)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=CUT,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=_rows(), optimizers=(opt, sched), callbacks=callbacks)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _flat_state(opt):
    out = {}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{pid}.{k}"] = v
    return out


def test_trainer_run_interrupted_and_resumed_equals_the_uninterrupted_run(tmp_path):
    from slice_kernels.integrations import GorpCheckpointCallback

    full = _trainer(_peft_model(), tmp_path / "full", callbacks=[GorpCheckpointCallback()])
    full.train()
    ref_w, ref_opt = _weights(full.model), _flat_state(full.optimizer)
    assert {"proj", "exp_avg", "refreshes"} <= {k.split(".", 1)[1] for k in ref_opt}

    # the same run, stopped after the checkpoint at CUT (as a crash would), then resumed in a fresh process state
    first = _trainer(_peft_model(), tmp_path / "cut", callbacks=[GorpCheckpointCallback(), _stop_at(CUT)])
    first.train()
    ckpt = tmp_path / "cut" / f"checkpoint-{CUT}"
    assert (ckpt / FULL_RANK_FILE).is_file() and (tmp_path / "cut" / FULL_RANK_FILE).is_file()
    cb = GorpCheckpointCallback()
    resumed = _trainer(_peft_model(), tmp_path / "cut", callbacks=[cb])
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert cb.restored_from == str(ckpt)
    got_w, got_opt = _weights(resumed.model), _flat_state(resumed.optimizer)
    assert set(got_w) == set(ref_w) and set(got_opt) == set(ref_opt)
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], rtol=1e-6, atol=1e-7, msg=k)
    for k, v in ref_opt.items():
        if torch.is_tensor(v):
            torch.testing.assert_close(got_opt[k], v, rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert got_opt[k] == v, k
    pre = tiny_llama().state_dict()
    assert not torch.allclose(got_w["base_model.model.model.layers.0.mlp.gate_proj.weight"], pre[GATES[0]])

    # the failure the callback fixes: without it the resumed run restarts gate_proj from the pre-trained weights
    plain = _trainer(_peft_model(), tmp_path / "cut", callbacks=[])
    plain.train(resume_from_checkpoint=str(ckpt))
    key = "base_model.model.model.layers.0.mlp.gate_proj.weight"
    assert (plain.model.state_dict()[key] - ref_w[key]).abs().max() > 1e-5


def test_resume_without_the_full_rank_file_is_refused(tmp_path):
    from slice_kernels.integrations import GorpCheckpointCallback

    first = _trainer(_peft_model(), tmp_path, callbacks=[_stop_at(CUT)])  # a run saved without the callback
    first.train()
    resumed = _trainer(_peft_model(), tmp_path, callbacks=[GorpCheckpointCallback()])
    with pytest.raises(GorpCheckpointError, match="has no gorp_full_rank.safetensors"):
        resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{CUT}"))


def test_optimizer_state_survives_torch_save_exactly():
    batches = lm_batches(6, seed=3)

    def run(model, opt, bs):
        model.train()
        for b in bs:
            opt.zero_grad()
            model(**b).loss.backward()
            opt.step()

    a = _peft_model()
    opt_a = _optimizer(a)
    run(a, opt_a, batches[:3])
    opt_a.end_task()  # shared spaces in the state too
    buf = io.BytesIO()
    torch.save({"opt": opt_a.state_dict(), "model": a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # Trainer loads optimizer.pt with weights_only=True

    b = _peft_model()
    opt_b = _optimizer(b)
    b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    run(a, opt_a, batches[3:])
    run(b, opt_b, batches[3:])
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    sa, sb = _flat_state(opt_a), _flat_state(opt_b)
    assert sa.keys() == sb.keys() and any(k.endswith(".shared") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k], k


def _trained():
    model = _peft_model()
    opt = _optimizer(model)
    model.train()
    for b in lm_batches(3, seed=5):
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    return model.eval()


def test_export_loads_on_the_untouched_base_with_equal_logits(tmp_path):
    model = _trained()
    assert sorted(full_rank_parameters(model)) == GATES  # base-model names, no PEFT prefix
    probe = lm_batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        want = model(input_ids=probe).logits
    save_gorp_adapter(model, str(tmp_path / "export"))
    assert (tmp_path / "export" / "adapter_config.json").is_file()
    loaded = load_gorp_adapter(tiny_llama(), str(tmp_path / "export")).eval()
    with torch.no_grad():
        got = loaded(input_ids=probe).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the adapter alone (what save_pretrained keeps) does not give the trained model
    from peft import PeftModel

    adapter_only = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "export")).eval()
    with torch.no_grad():
        assert (adapter_only(input_ids=probe).logits - want).abs().max() > 1e-5


def test_files_for_other_names_shapes_or_dtypes_are_refused_untouched(tmp_path):
    model = _trained()
    save_full_rank_weights(model, str(tmp_path))
    before = {n: p.clone() for n, p in tiny_llama().state_dict().items()}

    other = _peft_model()  # no GORP optimizer: gate_proj is frozen, so not a full-rank weight here
    with pytest.raises(GorpCheckpointError, match="does not hold this model's full-rank weights"):
        load_full_rank_weights(other, str(tmp_path))

    half = tiny_llama(dtype=torch.bfloat16)
    with pytest.raises(GorpCheckpointError, match="torch_dtype=torch.float32"):
        load_full_rank_weights(half, str(tmp_path), strict=False)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    wide = LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
    )
    wide_before = {n: p.clone() for n, p in wide.state_dict().items()}
    with pytest.raises(GorpCheckpointError, match=r"\(96, 64\) torch.float32 in the file but \(80, 64\)"):
        load_full_rank_weights(wide, str(tmp_path), strict=False)
    assert all(torch.equal(wide_before[n], p) for n, p in wide.state_dict().items())

    gpt = tiny_gpt2()
    with pytest.raises(GorpCheckpointError, match="does not have"):
        load_full_rank_weights(gpt, str(tmp_path), strict=False)

    base = tiny_llama()
    model.save_pretrained(str(tmp_path / "adapter_only"))  # an adapter without its full-rank weights
    with pytest.raises(GorpCheckpointError, match="no GORP full-rank weights"):
        load_gorp_adapter(base, str(tmp_path / "adapter_only"))
    with pytest.raises(NotFoundError, match="adapter_config.json missing"):
        load_gorp_adapter(base, str(tmp_path))
    assert all(torch.equal(before[n], p) for n, p in base.state_dict().items())
    assert not any("lora" in n for n, _ in base.named_modules())  # refused before PEFT wrapped it
    with pytest.raises(GorpCheckpointError, match="not a peft.PeftModel"):
        full_rank_parameters(base)


def test_load_best_model_at_end_brings_the_best_checkpoints_full_rank_weights(tmp_path):
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    from slice_kernels.integrations import GorpCheckpointCallback

    model = _peft_model()
    opt = _optimizer(model)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=STEPS,
        save_strategy="steps",
        eval_strategy="steps",
        save_steps=2,
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the highest eval loss: an early checkpoint, not the last one
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_rows(),
        eval_dataset=_rows(4),
        optimizers=(opt, get_linear_schedule_with_warmup(opt, 1, STEPS)),
        callbacks=[GorpCheckpointCallback()],
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith(f"checkpoint-{STEPS}")
    want, last = (load_file(os.path.join(d, FULL_RANK_FILE)) for d in (best, str(tmp_path / f"checkpoint-{STEPS}")))
    got = full_rank_parameters(model)
    for name in GATES:
        assert torch.equal(got[name], want[name]) and not torch.equal(want[name], last[name]), name
    assert torch.equal(load_file(str(tmp_path / FULL_RANK_FILE))[GATES[0]], want[GATES[0]])  # the final export too


def test_export_of_a_slice_initialized_gorp_run_loads_on_the_untouched_base(tmp_path):
    from slice_kernels import SliceConfig, get_slice_model, save_as_lora, save_initial_adapter

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_slice_model(tiny_llama(), cfg, SliceConfig(method="lora_ga", current_steps=2), current=lm_batches(2))
    save_initial_adapter(model, str(tmp_path / "slice_init"))  # the init moved q/v's base weights
    opt = _optimizer(model)
    model.train()
    for b in lm_batches(3, seed=5):
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    model.eval()
    probe = lm_batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        want = model(input_ids=probe).logits
    out = str(tmp_path / "export")
    with pytest.raises(GorpCheckpointError, match="call slice_kernels.save_as_lora"):
        save_gorp_adapter(model, out, path_initial_model_for_weight_conversion=str(tmp_path / "slice_init"))
    assert not os.path.exists(out)
    save_as_lora(model, out, str(tmp_path / "slice_init"))  # checked against the mark, for the untouched base
    save_full_rank_weights(model, out)
    with torch.no_grad():
        got = load_gorp_adapter(tiny_llama(), out).eval()(input_ids=probe).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
