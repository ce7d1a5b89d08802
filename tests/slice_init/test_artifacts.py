"""Saved artifacts right by construction: the changed-base mark (plain PEFT refuses a marked adapter on load),
the converted rank-2r adapter (no mark, loads silently and correctly), and the offline ``convert_adapter`` /
``slice-kernels convert`` against PEFT's own conversion, tensor for tensor."""

import json
import os
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from slice_kernels import (
    SliceConfig,
    SliceInitError,
    convert_adapter,
    get_slice_model,
    save_as_lora,
    save_initial_adapter,
)
from slice_kernels.runner.cli import main as cli_main
from slice_kernels.slice_init.artifacts import parse_mark
from tests.helpers import lm_batches, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
X = lm_batches(1, seed=5)[0]["input_ids"]


def make(method="slice", rslora=True, seed_batches=0, r=4):
    return get_slice_model(
        tiny_llama(),
        LoraConfig(r=r, lora_alpha=2, use_rslora=rslora, target_modules=TARGETS),
        SliceConfig(method=method, current_steps=2),
        current=lm_batches(2, seed=seed_batches),
    )


def train(pm, steps=3):
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm.train()
    for b in lm_batches(steps, seed=21):
        opt.zero_grad()
        pm(**b).loss.backward()
        opt.step()
    pm.eval()


def logits(m):
    with torch.no_grad():
        return m(input_ids=X).logits


@pytest.fixture
def trained(tmp_path):
    pm = make()
    save_initial_adapter(pm, str(tmp_path / "slice_init"))
    train(pm)
    pm.save_pretrained(str(tmp_path / "plain"))  # what a user, Trainer or TRL writes
    return pm, tmp_path


def test_plain_saved_adapter_is_marked_and_refused_on_the_original_base(trained):
    pm, d = trained
    cfg = json.load(open(d / "plain" / "adapter_config.json"))
    mark = parse_mark(cfg["init_lora_weights"])
    assert mark["method"] == "slice" and len(mark["probes"]) == 4
    with pytest.raises(ValueError, match=r"changed the base weights.*slice-kernels convert"):
        PeftModel.from_pretrained(tiny_llama(), str(d / "plain"))
    with pytest.raises(ValueError, match=r"changed the base weights"):  # PEFT's other layer-building path
        PeftModel.from_pretrained(tiny_llama(), str(d / "plain"), low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match=r"changed the base weights"):  # the initial adapter too
        PeftModel.from_pretrained(tiny_llama(), str(d / "slice_init"))
    with pytest.raises(ValueError, match=r"changed the base weights"):  # transformers' loader, same layer init
        tiny_llama().load_adapter(str(d / "plain"))


def test_save_as_lora_output_is_unmarked_and_loads_correctly(trained):
    pm, d = trained
    save_as_lora(pm, str(d / "lora"), str(d / "slice_init"))
    cfg = json.load(open(d / "lora" / "adapter_config.json"))
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8
    # PEFT's conversion rewrote the initial adapter's config; save_as_lora put the mark back
    assert parse_mark(json.load(open(d / "slice_init" / "adapter_config.json"))["init_lora_weights"])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_llama(), str(d / "lora"))
    assert [str(w.message) for w in rec if issubclass(w.category, UserWarning)] == []  # silently
    torch.testing.assert_close(logits(loaded), logits(pm), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rslora", [True, False])
def test_convert_equals_peft_conversion_tensor_for_tensor(tmp_path, rslora):
    pm = make(rslora=rslora)
    save_initial_adapter(pm, str(tmp_path / "slice_init"))
    train(pm)
    pm.save_pretrained(str(tmp_path / "plain"))
    save_as_lora(pm, str(tmp_path / "peft_lora"), str(tmp_path / "slice_init"))
    argv = [
        "convert",
        str(tmp_path / "plain"),
        "--initial",
        str(tmp_path / "slice_init"),
        "--out",
        str(tmp_path / "ours"),
    ]
    assert cli_main(argv) == 0
    theirs, ours = (
        load_file(tmp_path / "peft_lora" / "adapter_model.safetensors"),
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
    )
    assert set(theirs) == set(ours) and len(ours) == 2 * 2 * len(TARGETS)
    for k in theirs:
        assert torch.equal(theirs[k], ours[k]), k
    ct, co = (json.load(open(tmp_path / n / "adapter_config.json")) for n in ("peft_lora", "ours"))
    for key in ("r", "lora_alpha", "use_rslora", "init_lora_weights", "target_modules", "peft_type"):
        assert co[key] == ct[key], key
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(loaded), logits(pm), rtol=0, atol=1e-5)
    assert (logits(pm) - logits(tiny_llama())).abs().max() > 1e-3  # training moved the outputs


def test_convert_refuses_the_initial_adapter_of_another_init(trained):
    pm, d = trained
    other = make(seed_batches=7)  # same shapes, other batches: another offset
    save_initial_adapter(other, str(d / "other_init"))
    with pytest.raises(SliceInitError, match="is not the initial adapter of"):
        convert_adapter(str(d / "plain"), str(d / "other_init"), str(d / "out"))
    assert not (d / "out").exists()  # nothing written
    convert_adapter(str(d / "plain"), str(d / "other_init"), str(d / "out"), check_initial=False)  # forced


def test_fingerprint_tolerates_a_dtype_cast(trained):
    pm, d = trained
    init = d / "slice_init" / "adapter_model.safetensors"
    from safetensors.torch import save_file

    sd = load_file(init)
    save_file({k: v.bfloat16().float() for k, v in sd.items()}, init, metadata={"format": "pt"})
    convert_adapter(str(d / "plain"), str(d / "slice_init"), str(d / "out"))


def test_convert_errors_are_clear(trained, tmp_path):
    pm, d = trained
    with pytest.raises(SliceInitError, match="no such folder"):
        convert_adapter(str(d / "missing"), str(d / "slice_init"), str(d / "out"))
    (d / "empty").mkdir()
    with pytest.raises(SliceInitError, match="has no adapter_config.json"):
        convert_adapter(str(d / "empty"), str(d / "slice_init"), str(d / "out"))
    # a non-default adapter name: PEFT's subfolder layout is named in the error
    (d / "named" / "task1").mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (d / "named" / "task1" / f).write_bytes((d / "plain" / f).read_bytes())
    with pytest.raises(SliceInitError, match=r"subfolders \['task1'\].*pass the subfolder"):
        convert_adapter(str(d / "named"), str(d / "slice_init"), str(d / "out"))
    # different ranks
    r8 = make(r=8)
    save_initial_adapter(r8, str(d / "init_r8"))
    with pytest.raises(SliceInitError, match="has r=4 but the initial adapter"):
        convert_adapter(str(d / "plain"), str(d / "init_r8"), str(d / "out"))
    # different targets
    qv = get_slice_model(
        tiny_llama(),
        LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "v_proj"]),
        SliceConfig(method="loram"),
    )
    save_initial_adapter(qv, str(d / "init_qv"))
    with pytest.raises(SliceInitError, match="target different layers"):
        convert_adapter(str(d / "plain"), str(d / "init_qv"), str(d / "out"))
    with pytest.raises(SliceInitError, match="is or contains the input folder"):
        convert_adapter(str(d / "plain"), str(d / "slice_init"), str(d / "plain"))
    (d / "busy").mkdir()
    (d / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(SliceInitError, match=r"holds more than a saved adapter \(\['notes.txt'\]\)"):
        convert_adapter(str(d / "plain"), str(d / "slice_init"), str(d / "busy"))
    assert (d / "busy" / "notes.txt").read_text() == "keep me"
    # a run folder with an adapter at its top (trainer.save_model) and the inputs inside: never deleted
    before = sorted(os.listdir(d))
    with pytest.raises(SliceInitError, match="is or contains the input folder"):
        convert_adapter(str(d / "plain"), str(d / "slice_init"), str(d))
    (d / "run").mkdir()
    for f in os.listdir(d / "plain"):
        (d / "run" / f).write_bytes((d / "plain" / f).read_bytes())
    (d / "run" / "checkpoint-2").mkdir()
    with pytest.raises(SliceInitError, match=r"holds more than a saved adapter \(\['checkpoint-2'\]\)"):
        convert_adapter(str(d / "plain"), str(d / "slice_init"), str(d / "run"))
    assert sorted(os.listdir(d)) == sorted(before + ["run"]) and (d / "run" / "checkpoint-2").is_dir()


def test_cli_reports_errors_with_exit_code_2(trained, capsys):
    pm, d = trained
    assert cli_main(["convert", str(d / "missing"), "--initial", str(d / "slice_init"), "--out", str(d / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_plain_lora_init_is_not_marked_and_not_converted(tmp_path):
    pm = make(method="lora")
    assert pm.peft_config["default"].init_lora_weights is True
    pm.save_pretrained(str(tmp_path / "a"))
    PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))  # loads: the base was not changed


def test_unmarked_old_adapter_converts_with_a_warning(trained):
    """Adapters saved by 0.2 say init_lora_weights=True: still convertible, with a warning that nothing is checked."""
    pm, d = trained
    cfg_file = d / "plain" / "adapter_config.json"
    cfg = json.load(open(cfg_file))
    cfg["init_lora_weights"] = True
    cfg_file.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="carries no slice-kernels mark"):
        convert_adapter(str(d / "plain"), str(d / "slice_init"), str(d / "out"))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(d / "out"))
    torch.testing.assert_close(logits(loaded), logits(pm), rtol=0, atol=1e-5)


def test_skipped_embedding_targets_survive_both_conversions(tmp_path):
    """An embedding in the target list is skipped by the init (PEFT's ordinary LoRA, B₀ = 0) but trained: both
    save_as_lora and convert_adapter keep its update, so the converted adapter reproduces the trained model on
    the untouched base. save_as_lora also checks the initial adapter against the mark, as convert does."""
    from tests.helpers import lm_batches, tiny_llama

    base = tiny_llama()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    with pytest.warns(UserWarning, match="skipping 1 module"):
        pm = get_slice_model(
            tiny_llama(), cfg, SliceConfig(method="lora_ga", current_steps=1), current=lm_batches(1, seed=3)
        )
    save_initial_adapter(pm, str(tmp_path / "slice_init"))
    with torch.no_grad():  # a "training" step that moves every factor, the embedding's too
        g = torch.Generator().manual_seed(1)
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 128, (2, 8), generator=g)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    sk_lora = tmp_path / "lora"
    save_as_lora(pm, str(sk_lora), str(tmp_path / "slice_init"))
    pm.save_pretrained(str(tmp_path / "trained"))
    convert_adapter(str(tmp_path / "trained"), str(tmp_path / "slice_init"), str(tmp_path / "offline"))
    for folder in (sk_lora, tmp_path / "offline"):
        keys = load_file(str(folder / "adapter_model.safetensors"))
        assert any("lora_embedding_A" in k for k in keys) and any("q_proj.lora_A" in k for k in keys)
        with torch.no_grad():
            got = PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    with torch.no_grad():
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-2  # the update is not negligible

    other = get_slice_model(
        tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
        SliceConfig(method="lora_ga", current_steps=1),
        current=lm_batches(1, seed=4),
    )
    save_initial_adapter(other, str(tmp_path / "other_init"))
    pq = get_slice_model(
        tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
        SliceConfig(method="lora_ga", current_steps=1),
        current=lm_batches(1, seed=3),
    )
    with pytest.raises(SliceInitError, match="is not the initial adapter of"):
        save_as_lora(pq, str(tmp_path / "wrong"), str(tmp_path / "other_init"))
    assert not (tmp_path / "wrong").exists()
