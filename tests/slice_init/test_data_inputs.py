"""Data plumbing of the init (issue 17, item 3): current=/replay= (and collect_gradients) take collated batches, a
DataLoader, or tokenized examples (a datasets.Dataset, a list of {"input_ids": [...]}) with a data collator and a
batch size; every missing piece is named before any forward pass."""

import warnings

import pytest
import torch
from peft import LoraConfig

from slice_kernels import SliceConfig, SliceInitError, collect_gradients, get_slice_model
from slice_kernels.slice_init.collect import collect_replay_gradients, replay_streams
from tests.helpers import lm_batches, tiny_llama
from tests.helpers.runner_tiny import char_tokenizer

datasets = pytest.importorskip("datasets", reason="the datasets package is in the test extra; pip install datasets")

TEXTS = ["12+3=15", "7+8=15", "100+1=101", "2+2=4", "9+9=18", "31+4=35", "5+50=55", "6+1=7", "44+4=48", "3+3=6"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        yield


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _examples(tok, texts=TEXTS):
    return [dict(tok(t)) for t in texts]  # ragged input_ids/attention_mask lists, as Dataset.map(tokenizer) gives


def _lm_collator(tok):
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tok, mlm=False)


def _forward_counter(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("form", ["list", "dataset", "torch-format dataset"])
def test_examples_with_a_collator_equal_the_batches_collated_by_hand(tok, form):
    ex = _examples(tok)
    coll = _lm_collator(tok)
    src = ex
    if form != "list":
        src = datasets.Dataset.from_list(ex)
        if form == "torch-format dataset":
            src = src.with_format("torch")
    model = tiny_llama()
    got = collect_gradients(model, ["q_proj", "down_proj"], src, 3, data_collator=coll, batch_size=3)
    by_hand = [coll(ex[i : i + 3]) for i in range(0, 9, 3)]
    _same(got, collect_gradients(model, ["q_proj", "down_proj"], by_hand, 3))


def test_seq2seq_collator_with_prompt_masked_labels(tok):
    from transformers import DataCollatorForSeq2Seq

    ex = []
    for t in TEXTS:
        e = dict(tok(t))
        cut = t.index("=") + 1  # loss on the answer only: the prompt's labels are -100
        e["labels"] = [-100] * cut + e["input_ids"][cut:]
        ex.append(e)
    coll = DataCollatorForSeq2Seq(tok)
    model = tiny_llama()
    got = collect_gradients(model, ["v_proj"], ex, 2, data_collator=coll, batch_size=4)
    _same(got, collect_gradients(model, ["v_proj"], [coll(ex[0:4]), coll(ex[4:8])], 2))


def test_get_slice_model_with_a_dataset_and_example_replay_equals_collated_batches(tok):
    coll = _lm_collator(tok)
    ex = _examples(tok)
    cfg = LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"])
    sc = SliceConfig(current_steps=2, replay_steps=2)
    cur_ds = datasets.Dataset.from_list(ex[:6])
    replay_ex = [ex[6:10], ex[:4]]  # two earlier tasks, oldest first
    pm = get_slice_model(tiny_llama(), cfg, sc, current=cur_ds, replay=replay_ex, data_collator=coll, batch_size=2)
    cur = [coll(ex[i : i + 2]) for i in (0, 2)]
    rep = [[coll(t[i : i + 2]) for i in (0, 2)] for t in replay_ex]
    ref = get_slice_model(tiny_llama(), cfg, sc, current=cur, replay=rep)
    assert pm.slice_init_report.gamma == pytest.approx(ref.slice_init_report.gamma, rel=1e-6, abs=1e-12)
    got, want = pm.state_dict(), ref.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_a_dataloader_and_collated_batches_are_used_as_they_are(tok):
    coll = _lm_collator(tok)
    ex = _examples(tok)
    loader = torch.utils.data.DataLoader(ex, batch_size=3, collate_fn=coll)
    model = tiny_llama()
    # a collator passed beside a DataLoader is not applied twice: the loader collates
    got = collect_gradients(model, ["q_proj"], loader, 2, data_collator=coll, batch_size=5)
    _same(got, collect_gradients(model, ["q_proj"], [coll(ex[0:3]), coll(ex[3:6])], 2))


def test_replay_examples_are_collated_at_retain_batch_size(tok):
    coll = _lm_collator(tok)
    streams = replay_streams(
        [_examples(tok)], 2, "per_task", batch_size=4, data_collator=coll, example_batch_size=2, needs_labels=True
    )
    batches = list(streams[0].batches)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4]  # 10 examples: two full batches, the rest dropped
    assert "batch_size=4" in streams[0].label


ERRORS = [
    # (source, collator?, batch_size, match)
    ("examples", None, None, r"these look like tokenized examples \(dicts of lists\): pass data_collator=\.\.\. and "),
    ("examples", "lm", None, r"these look like tokenized examples .*pass batch_size=\.\.\."),
    ("examples", "padding", 2, r"data_collator's batches have no 'labels' .*DataCollatorForLanguageModeling"),
    ("text dataset", "lm", 2, r"string column\(s\) \['text'\].*tokenize first.*remove_columns"),
    ("text+ids dataset", "lm", 2, r"string column\(s\) \['text'\].*dataset.remove_columns\(\['text'\]\)"),
    ("text examples", "lm", 2, r"the examples hold text \(key\(s\) \['text'\]\).*tokenize first"),
    ("tokenizer output", "lm", 2, r"expected an iterable of batches.*tokenizer\(list_of_texts\) output"),
    ("late batch without labels", None, None, r"batch 1 has no 'labels'"),
    ("bad collator", "broken", 2, r"data_collator failed on the first 2 examples: RuntimeError: boom"),
    ("examples", "lm", 0, r"batch_size=0 must be a positive integer"),
]


def _source(kind, tok):
    ex = _examples(tok)
    if kind == "examples" or kind == "bad collator":
        return ex
    if kind == "text dataset":
        return datasets.Dataset.from_dict({"text": TEXTS})
    if kind == "text+ids dataset":
        return datasets.Dataset.from_list([{**e, "text": t} for e, t in zip(ex, TEXTS)])
    if kind == "text examples":
        return [{"text": t} for t in TEXTS]
    if kind == "tokenizer output":
        return dict(tok(TEXTS))
    b = lm_batches(3)
    del b[1]["labels"]
    return b


def _collator(kind, tok):
    from transformers import DataCollatorWithPadding

    if kind == "lm":
        return _lm_collator(tok)
    if kind == "padding":
        return DataCollatorWithPadding(tok)
    if kind == "broken":

        def broken(examples):
            raise RuntimeError("boom")

        return broken
    return None


@pytest.mark.parametrize("source, collator, batch_size, match", ERRORS, ids=[f"{e[0]}-{e[1]}" for e in ERRORS])
@pytest.mark.parametrize("where", ["current", "replay"])
def test_errors_name_the_missing_piece_before_any_forward(tok, source, collator, batch_size, match, where):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = _forward_counter(model)
    src = _source(source, tok)
    current, replay = (src, None) if where == "current" else (lm_batches(3), [src])
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    with pytest.raises(SliceInitError, match=match):
        get_slice_model(
            model,
            cfg,
            SliceConfig(current_steps=3, replay_steps=3),
            current=current,
            replay=replay,
            data_collator=_collator(collator, tok),
            batch_size=batch_size,
        )
    assert calls == []  # refused before the first forward pass: no batch was run, replay's included
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_collect_gradients_names_examples_without_a_collator(tok):
    with pytest.raises(SliceInitError, match=r"these look like tokenized examples"):
        collect_gradients(tiny_llama(), ["q_proj"], _examples(tok), 2)
    with pytest.raises(SliceInitError, match=r"these look like tokenized examples"):
        collect_gradients(tiny_llama(), ["q_proj"], datasets.Dataset.from_list(_examples(tok)), 2)


def test_per_task_replay_of_bare_examples_says_wrap_them(tok):
    with pytest.raises(SliceInitError, match=r"items look like tokenized examples; wrap one task's examples"):
        collect_replay_gradients(
            tiny_llama(), ["q_proj"], _examples(tok), 2, data_collator=_lm_collator(tok), batch_size=2
        )


def test_a_dataset_dict_asks_for_a_split(tok):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(_examples(tok))})
    with pytest.raises(SliceInitError, match=r"holds the splits \['train'\]: pass one, e.g. dataset\['train'\]"):
        collect_gradients(tiny_llama(), ["q_proj"], dd, 2, data_collator=_lm_collator(tok), batch_size=2)


def test_a_short_dataset_is_refused_with_its_size(tok):
    ds = datasets.Dataset.from_list(_examples(tok))
    with pytest.raises(
        SliceInitError, match=r"10 examples in batches of batch_size=4\): needs 3 batches but has only 2"
    ):
        collect_gradients(tiny_llama(), ["q_proj"], ds, 3, data_collator=_lm_collator(tok), batch_size=4)


def test_a_custom_loss_needs_no_labels(tok):
    from transformers import DataCollatorWithPadding

    def loss_fn(model, batch):
        return model(**batch, labels=batch["input_ids"]).loss

    g = collect_gradients(
        tiny_llama(), ["q_proj"], _examples(tok), 2, loss_fn, data_collator=DataCollatorWithPadding(tok), batch_size=2
    )
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in g.values())
