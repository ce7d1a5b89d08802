"""The SLICE reference's protocol in the runner: chat-formatted examples, the loss over the whole sequence,
HF Trainer's linear warmup/decay and gradient clipping, ROUGE-L on the whole generation, and the paper profile
that turns them on."""

import pytest
import torch

from slice_kernels.runner import make_config, run
from slice_kernels.runner.data import check_prompt_format, encode, prompt_ids
from slice_kernels.runner.evaluate import scored_part
from slice_kernels.runner.tasks import Example
from slice_kernels.runner.train import lr_factor, train_adapter
from tests.helpers.runner_tiny import (
    TINY_CHAT_TEMPLATE,
    addition_tasks,
    char_tokenizer,
    save_tiny_llama,
    tiny_run_config,
)


def chat_tok():
    tok = char_tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def test_chat_encoding_puts_the_answer_in_the_assistant_turn():
    tok = chat_tok()
    ex = Example("2+3", "5")
    e = encode(tok, ex, max_len=64, fmt="chat")
    p = prompt_ids(tok, ex, fmt="chat")
    assert p == tok("<u>2+3\n<a>", add_special_tokens=False)["input_ids"]
    assert e["input_ids"][: len(p)] == p and e["labels"][: len(p)] == [-100] * len(p)
    # the answer is what the template appends after the generation prompt: the answer and its end of turn
    answer = tok("5\n", add_special_tokens=False)["input_ids"]
    assert e["labels"][len(p) :] == answer == e["input_ids"][len(p) :]
    full = encode(tok, ex, max_len=64, train_on="prompt+answer", fmt="chat")
    assert full["labels"] == full["input_ids"] == e["input_ids"]  # the reference's whole-sequence loss
    shots = prompt_ids(tok, ex, [Example("1+1", "2")], fmt="chat")
    assert shots == tok("<u>1+1\n<a>2\n<u>2+3\n<a>", add_special_tokens=False)["input_ids"]
    # the plain format is unchanged
    assert prompt_ids(tok, ex) == tok("Question: 2+3\nAnswer:", add_special_tokens=True)["input_ids"]


def test_chat_format_needs_a_template():
    with pytest.raises(ValueError, match="has none; use --prompt-format plain"):
        check_prompt_format(char_tokenizer(), "chat", "tiny")
    check_prompt_format(char_tokenizer(), "plain")
    tok = chat_tok()
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    with pytest.raises(ValueError, match="does not extend the generation prompt"):
        encode(tok, Example("2+3", "5"), max_len=64, fmt="chat")


@pytest.mark.parametrize("steps,ratio", [(10, 0.0), (10, 0.01), (100, 0.01), (7, 0.3)])
def test_linear_schedule_is_transformers(steps, ratio):
    import math

    from transformers import get_linear_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(ratio * steps), steps)  # the Trainer's warmup rule
    for step in range(steps):
        assert lr_factor(step, steps, "linear", ratio) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()
    assert lr_factor(3, 10, "constant", 0.0) == 1.0


class _Plain:
    def make_optimizer(self, ctx, model, params, lr):
        return None

    def extra_loss(self, ctx, model, batch):
        return None


def test_train_adapter_schedules_and_clips_like_the_trainer():
    """Three AdamW steps with warmup/decay and clipping at 0.5, against the same loop written with torch's
    clip_grad_norm_ and transformers' schedule."""
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 2)} for _ in range(3)]
    loss_fn = lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum() * 10  # noqa: E731  (large gradients: clipping acts)
    model = torch.nn.Linear(3, 2)
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    train_adapter(
        model, _Plain(), None, iter(batches), steps=3, lr=0.1, grad_accum=1, lr_schedule="linear",
        warmup_ratio=0.34, max_grad_norm=0.5, loss_fn=loss_fn, progress=False,
    )  # fmt: skip
    opt = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 2, 3)
    for b in batches:
        opt.zero_grad()
        loss_fn(ref, b).backward()
        assert torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5) > 0.5
        opt.step()
        sched.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_rouge_tasks_are_scored_on_the_whole_generation():
    assert scored_part("the cat\nsat on the mat", "rouge_l") == "the cat\nsat on the mat"
    assert scored_part("42\nQuestion: 1+1", "exact") == "42"


def test_paper_profile_is_the_reference_protocol():
    cfg = make_config("paper")
    assert (cfg.prompt_format, cfg.train_on, cfg.lr_schedule, cfg.warmup_ratio, cfg.max_grad_norm) == (
        "chat",
        "prompt+answer",
        "linear",
        0.01,
        1.0,
    )
    d = make_config("default")
    assert (d.prompt_format, d.train_on, d.lr_schedule, d.warmup_ratio, d.max_grad_norm) == (
        "plain",
        "answer",
        "constant",
        0.0,
        None,
    )


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(prompt_format="json"), "prompt_format"),
        (dict(lr_schedule="cosine"), "lr_schedule"),
        (dict(warmup_ratio=0.1), "needs --lr-schedule linear"),
        (dict(lr_schedule="linear", warmup_ratio=1.0), r"in \[0, 1\)"),
        (dict(max_grad_norm=0.0), "positive finite"),
    ],
)
def test_protocol_options_are_validated(tmp_path, kw, msg):
    from slice_kernels.runner.run import validate

    model = save_tiny_llama(str(tmp_path / "m"))
    with pytest.raises(ValueError, match=msg):
        validate(tiny_run_config(model, addition_tasks(str(tmp_path)), **kw))


def test_a_chat_run_end_to_end(tmp_path):
    plain_model = save_tiny_llama(str(tmp_path / "plain"))
    model = save_tiny_llama(str(tmp_path / "chat"), chat_template=TINY_CHAT_TEMPLATE)
    tasks = addition_tasks(str(tmp_path), ks=(1, 2))
    kw = dict(
        methods=["lora", "slice"],
        prompt_format="chat",
        train_on="prompt+answer",
        lr_schedule="linear",
        warmup_ratio=0.01,
        max_grad_norm=1.0,
    )
    res = run(tiny_run_config(model, tasks, **kw), str(tmp_path / "out"), progress=False, log=lambda *a: None)
    assert res["train_on"] == "prompt+answer" and len(res["methods"]["slice"]["R"]) == 2
    with pytest.raises(ValueError, match="chat template"):
        run(tiny_run_config(plain_model, tasks, **kw), str(tmp_path / "out2"), progress=False, log=lambda *a: None)
    assert not (tmp_path / "out2").exists()  # refused after the load, before any stage; the fresh run cleaned up
