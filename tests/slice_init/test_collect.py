"""collect_gradients / collect_replay_gradients (SPEC §1 steps 1–2) on tiny Llama and GPT-2 models."""

import pytest
import torch

import slice_kernels.slice_init.collect as collect_mod
from slice_kernels import SliceInitError, collect_gradients, collect_replay_gradients
from tests.helpers import lm_batches, tiny_gpt2, tiny_llama

LLAMA_T = ["q_proj", "v_proj", "down_proj"]
GPT2_T = ["c_attn", "c_fc"]


def manual_average(model, names, batches, conv1d=False):
    """Independent reference: plain autograd per batch, float64 sum, divided by the count."""
    mods = dict(model.named_modules())
    out = {n: torch.zeros(mods[n].weight.shape, dtype=torch.float64) for n in names}
    model.eval()
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        for n in names:
            out[n] += mods[n].weight.grad.double()
    model.zero_grad(set_to_none=True)
    return {n: (g / len(batches)).T if conv1d else g / len(batches) for n, g in out.items()}


def target_names(model, suffixes):
    return [n for n, _ in model.named_modules() if any(n.endswith("." + s) for s in suffixes)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_average_matches_plain_autograd(arch):
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    suffixes = LLAMA_T if arch == "llama" else GPT2_T
    batches = lm_batches(3)
    g = collect_gradients(model, suffixes, batches, steps=3)
    names = target_names(model, suffixes)
    assert list(g) == names
    ref = manual_average(model, names, batches, conv1d=arch == "gpt2")
    for n in names:
        assert g[n].dtype == torch.float32
        w = dict(model.named_modules())[n].weight
        assert g[n].shape == (w.shape if arch == "llama" else w.T.shape)  # (out, in)
        torch.testing.assert_close(g[n].double(), ref[n], rtol=1e-5, atol=1e-7)


def test_bf16_model_accumulates_in_float32():
    model = tiny_llama(torch.bfloat16)
    g = collect_gradients(model, ["o_proj"], lm_batches(2), steps=2)
    assert all(t.dtype == torch.float32 for t in g.values())
    ref = manual_average(model, list(g), lm_batches(2))
    for n in g:  # bf16 backward: each batch's gradient is rounded to bf16 before it is averaged
        torch.testing.assert_close(g[n].double(), ref[n], rtol=2e-2, atol=1e-4)


def test_only_steps_batches_are_used_and_state_is_restored():
    model = tiny_llama()
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    rg = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = lm_batches(5)
    g2 = collect_gradients(model, LLAMA_T, batches, steps=2)
    ref = manual_average(model, list(g2), batches[:2])
    model.train()
    for n in g2:
        torch.testing.assert_close(g2[n].double(), ref[n], rtol=1e-5, atol=1e-7)
    collect_gradients(model, LLAMA_T, batches, steps=2)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == rg
    assert all(p.grad is None for p in model.parameters())


def test_state_restored_on_error():
    model = tiny_llama()
    rg = {n: p.requires_grad for n, p in model.named_parameters()}

    def gen():
        yield from lm_batches(1)

    with pytest.raises(SliceInitError, match="needs 3 batches but the iterable gave only 1"):
        collect_gradients(model, LLAMA_T, gen(), steps=3)
    assert not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == rg
    assert all(p.grad is None for p in model.parameters())
    assert not any(
        p._post_accumulate_grad_hooks
        for p in model.parameters()
        if getattr(p, "_post_accumulate_grad_hooks", None) is not None
    )


def test_one_layer_grad_alive_at_a_time(monkeypatch):
    """Memory: at every accumulation exactly one parameter of the model holds a .grad (the layer autograd is
    finishing), and non-target parameters never get one."""
    model = tiny_llama()
    params = list(model.parameters())
    alive_counts = []
    real = collect_mod.accumulator

    def spying_accumulator(device):
        add = real(device)

        def spy(acc, grad, alpha):
            alive_counts.append(sum(p.grad is not None for p in params))
            add(acc, grad, alpha)

        return spy

    monkeypatch.setattr(collect_mod, "accumulator", spying_accumulator)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    g = collect_gradients(model, targets, lm_batches(2), steps=2)
    assert len(alive_counts) == 2 * len(g) == 2 * 14
    assert set(alive_counts) == {1}
    assert all(p.grad is None for p in params)


def test_offload_and_progress():
    model = tiny_gpt2()
    a = collect_gradients(model, GPT2_T, lm_batches(2), steps=2)
    b = collect_gradients(model, GPT2_T, lm_batches(2), steps=2, offload=True, progress=True)
    for n in a:
        assert b[n].device.type == "cpu"
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


def test_custom_loss_fn():
    model = tiny_llama()
    batches = [b["input_ids"] for b in lm_batches(2)]

    def loss_fn(m, ids):
        return m(input_ids=ids, labels=ids).loss

    g = collect_gradients(model, ["v_proj"], batches, steps=2, loss_fn=loss_fn)
    ref = manual_average(model, list(g), lm_batches(2))
    for n in g:
        torch.testing.assert_close(g[n].double(), ref[n], rtol=1e-5, atol=1e-7)


def test_replay_per_task_weights_tasks_equally_and_pooled():
    model = tiny_llama()
    t1, t2 = lm_batches(4, seed=1), lm_batches(2, seed=2)
    per = collect_replay_gradients(model, ["o_proj"], [t1, t2], steps=2, mode="per_task")
    r1 = manual_average(model, list(per), t1[:2])
    r2 = manual_average(model, list(per), t2[:2])
    for n in per:
        torch.testing.assert_close(per[n].double(), (r1[n] + r2[n]) / 2, rtol=1e-5, atol=1e-7)
    pooled_stream = t1[:1] + t2[:2]
    pooled = collect_replay_gradients(model, ["o_proj"], pooled_stream, steps=3, mode="pooled")
    rp = manual_average(model, list(pooled), pooled_stream)
    for n in pooled:
        torch.testing.assert_close(pooled[n].double(), rp[n], rtol=1e-5, atol=1e-7)
    assert collect_replay_gradients(model, ["o_proj"], None, steps=2) is None
    assert collect_replay_gradients(model, ["o_proj"], [], steps=2) is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_modules=["q_proj", "nonexistent"]), "'nonexistent' matches no module"),
        (dict(target_modules=[]), "target_modules is empty"),
        (dict(target_modules=["embed_tokens"]), "embedding"),
        (dict(target_modules=["input_layernorm"]), "not nn.Linear or transformers Conv1D"),
        (dict(batches=[]), "needs 2 batches but has only 0"),
        (dict(batches=lm_batches(1)), "needs 2 batches but has only 1"),
        (dict(steps=0), "steps=0 must be a positive integer"),
        (dict(batches={"input_ids": torch.zeros(2, 3)}), "expected an iterable of batches"),
        (dict(batches=[{"input_ids": torch.zeros(1, 4, dtype=torch.long)}] * 2), "no 'labels'"),
    ],
)
def test_bad_input_errors_and_nothing_modified(kwargs, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rg = {n: p.requires_grad for n, p in model.named_parameters()}
    args = dict(target_modules=["q_proj"], batches=lm_batches(2), steps=2)
    args.update(kwargs)
    with pytest.raises(SliceInitError, match=match):
        collect_gradients(model, args["target_modules"], args["batches"], args["steps"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == rg
    assert all(p.grad is None for p in model.parameters())


def test_quantized_layer_is_refused():
    model = tiny_llama()
    lin = model.model.layers[0].self_attn.q_proj
    lin.weight = torch.nn.Parameter(torch.zeros(lin.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(SliceInitError, match="quantized weight"):
        collect_gradients(model, ["q_proj"], lm_batches(1), steps=1)


def test_replay_shape_errors():
    model = tiny_llama()
    with pytest.raises(SliceInitError, match="items look like batches"):
        collect_replay_gradients(model, ["o_proj"], lm_batches(2), steps=2, mode="per_task")
    with pytest.raises(SliceInitError, match="takes ONE iterable"):
        collect_replay_gradients(model, ["o_proj"], [lm_batches(2), lm_batches(2)], steps=2, mode="pooled")
    with pytest.raises(SliceInitError, match="replay task 1: needs 2 batches but has only 1"):
        collect_replay_gradients(model, ["o_proj"], [lm_batches(2), lm_batches(1)], steps=2)


@pytest.mark.parametrize("train_mode", [False, True])
def test_mode_during_collection(train_mode):
    model = tiny_gpt2()  # has dropout: the mode matters
    seen = []

    def loss_fn(m, batch):
        seen.append(m.training)
        return m(**batch).loss

    collect_gradients(model, GPT2_T, lm_batches(2), steps=2, loss_fn=loss_fn, train_mode=train_mode)
    assert seen == [train_mode] * 2 and not model.training
    if not train_mode:  # eval mode: a deterministic function of weights and batches
        a = collect_gradients(model, GPT2_T, lm_batches(2), steps=2)
        b = collect_gradients(model, GPT2_T, lm_batches(2), steps=2)
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_modules_sharing_one_weight_both_get_its_gradient():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
    b.weight = a.weight
    model = torch.nn.Sequential(a, torch.nn.Tanh(), b)
    batches = [torch.randn(4, 6) for _ in range(2)]

    def loss_fn(m, x):
        return m(x).pow(2).mean()

    g = collect_gradients(model, ["0", "2"], batches, steps=2, loss_fn=loss_fn)
    ref = torch.zeros(6, 6)
    for x in batches:
        model.zero_grad()
        loss_fn(model, x).backward()
        ref += a.weight.grad / 2
    torch.testing.assert_close(g["0"], ref)
    torch.testing.assert_close(g["2"], ref)
    assert g["0"].abs().sum() > 0


def test_empty_replay_list_means_no_replay_in_both_modes():
    model = tiny_llama()
    for mode in ("per_task", "pooled"):
        assert collect_replay_gradients(model, ["o_proj"], [], steps=2, mode=mode) is None
    with pytest.raises(SliceInitError, match="replay_mode='mixed' is not"):
        collect_replay_gradients(model, ["o_proj"], [], steps=2, mode="mixed")


def test_dataloader_over_iterable_dataset_has_no_len():
    """A DataLoader over an IterableDataset (e.g. a streaming dataset) raises TypeError on len(): it is
    consumed like a generator instead of failing the length pre-check."""
    from torch.utils.data import DataLoader, IterableDataset

    batches = lm_batches(3)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from batches

    model = tiny_llama()
    g = collect_gradients(model, ["v_proj"], DataLoader(Stream(), batch_size=None), steps=2)
    ref = manual_average(model, list(g), batches[:2])
    for n in g:
        torch.testing.assert_close(g[n].double(), ref[n], rtol=1e-5, atol=1e-7)


def test_pooled_replay_of_tuple_batches():
    """(inputs, targets) tuples are batches for a custom loss_fn: a pooled list of them is one stream, and
    per_task refuses it as a list of batches."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    batches = [(torch.randn(4, 6), torch.randn(4, 3)) for _ in range(3)]

    def loss_fn(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    g = collect_replay_gradients(model, ["0"], batches, steps=3, mode="pooled", loss_fn=loss_fn)
    ref = torch.zeros(5, 6)
    for b in batches:
        model.zero_grad()
        loss_fn(model, b).backward()
        ref += model[0].weight.grad / 3
    torch.testing.assert_close(g["0"], ref)
    with pytest.raises(SliceInitError, match="items look like batches"):
        collect_replay_gradients(model, ["0"], batches, steps=3, mode="per_task", loss_fn=loss_fn)
