"""History of earlier updates (SPEC §3): forms, rms by the Gram identity, sign-bit packing, updates, saving."""

import math

import pytest
import torch

from slice_kernels import History, HistoryError, HistoryStore
from slice_kernels.modules import lora_factors, lora_layers
from slice_kernels.ops.sign_bits import pack_sign_bits, unpack_sign_bits
from slice_kernels.ps_lora.history import gram_sq_norm


def _factors(m, n, ranks, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(m, r, generator=g, dtype=dtype) for r in ranks]
    As = [torch.randn(r, n, generator=g, dtype=dtype) for r in ranks]
    return Bs, As


@pytest.mark.parametrize("n", [1, 7, 8, 9, 53])
def test_sign_bits_round_trip(n):
    H = torch.randn(13, n, dtype=torch.float64)
    H[0, 0] = 0.0  # zero packs as +1 (the bit form has no third state)
    bits = pack_sign_bits(H)
    assert bits.dtype == torch.uint8 and bits.shape == (13, (n + 7) // 8)
    expect = torch.where(H >= 0, 1.0, -1.0)
    assert torch.equal(unpack_sign_bits(bits, n, torch.float64), expect)
    # little-endian bit order inside a byte, as numpy.packbits(bitorder="little")
    import numpy as np

    ref = np.packbits((H >= 0).numpy().astype(np.uint8), axis=1, bitorder="little")
    assert np.array_equal(bits.numpy(), ref)


def test_from_factors_rms_by_gram_identity_and_scalings():
    Bs, As = _factors(37, 29, [3, 5])
    h = History.from_factors(Bs, As, [0.5, 2.0])
    H = 0.5 * Bs[0] @ As[0] + 2.0 * Bs[1] @ As[1]
    assert h.kind == "factors" and h.rank == 8 and h.shape == (37, 29)
    assert math.isclose(h.rms, float(H.pow(2).mean().sqrt()), rel_tol=1e-6)
    torch.testing.assert_close(h.to_dense(torch.float64), H, rtol=1e-5, atol=1e-5)  # factors kept in float32
    assert math.isclose(float(gram_sq_norm(Bs[0], As[0])), float((Bs[0] @ As[0]).pow(2).sum()), rel_tol=1e-12)


def test_to_sign_bits_matches_dense_signs_and_keeps_rms():
    Bs, As = _factors(300, 21, [4])  # more rows than one conversion block
    h = History.from_factors(Bs, As)
    b = h.to_sign_bits()
    assert b.kind == "bits" and b.rms == h.rms and b.bits.numel() == 300 * 3
    assert torch.equal(b.bits, pack_sign_bits(h.to_dense()))
    assert torch.equal(b.to_dense(), torch.where(h.to_dense() >= 0, 1.0, -1.0) * h.rms)


def test_append_in_each_form():
    Bs, As = _factors(40, 33, [2, 3], seed=1)
    h1 = History.from_factors(Bs[:1], As[:1], [0.7])
    full = History.from_factors(Bs, As, [0.7, 1.3])
    f = h1.append(Bs[1], As[1], 1.3)
    assert f.kind == "factors" and f.rank == 5 and math.isclose(f.rms, full.rms, rel_tol=1e-9)
    d = History.from_dense(h1.to_dense()).append(Bs[1], As[1], 1.3)
    torch.testing.assert_close(d.dense, full.to_dense(), rtol=1e-5, atol=1e-5)
    assert math.isclose(d.rms, full.rms, rel_tol=1e-5)
    # bits: the old H is only known as sign·rms, so the update folds into that reconstruction
    b = h1.to_sign_bits().append(Bs[1], As[1], 1.3)
    recon = h1.to_sign_bits().to_dense() + 1.3 * (Bs[1] @ As[1]).float()
    assert torch.equal(b.bits, pack_sign_bits(recon))
    assert math.isclose(b.rms, float(recon.double().pow(2).mean().sqrt()), rel_tol=1e-5)
    assert h1.rank == 2  # append returns a new History


def test_bad_inputs_name_the_problem():
    Bs, As = _factors(10, 12, [2])
    with pytest.raises(ValueError, match="task 0"):
        History.from_factors([Bs[0]], [As[0].T])
    with pytest.raises(ValueError, match="as many B factors"):
        History.from_factors(Bs, [], [])
    with pytest.raises(ValueError, match="2-D"):
        History.from_dense(torch.zeros(3))
    with pytest.raises(ValueError, match="do not make an update"):
        History.from_factors(Bs, As).append(Bs[0].T, As[0])
    with pytest.raises(ValueError, match="uint8"):
        History.from_bits(torch.zeros(10, 2, dtype=torch.int32), 12, 1.0)
    with pytest.raises(ValueError, match="uint8"):
        History.from_bits(torch.tensor(3, dtype=torch.uint8), 12, 1.0)  # 0-d: a named error, not IndexError


def test_history_state_dict_round_trip(tmp_path):
    Bs, As = _factors(9, 11, [2])
    for h in (
        History.from_factors(Bs, As),
        History.from_dense(Bs[0] @ As[0]),
        History.from_factors(Bs, As).to_sign_bits(),
    ):
        h2 = History.from_state_dict(h.state_dict())
        assert (h2.kind, h2.shape, h2.rms) == (h.kind, h.shape, h.rms)
        assert torch.equal(h2.to_dense(), h.to_dense())


def _peft_llama():
    from peft import LoraConfig, get_peft_model

    from tests.helpers import tiny_llama

    model = tiny_llama()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("kind", ["factors", "dense", "bits"])
def test_store_records_peft_adapters_and_saves(tmp_path, kind):
    pm = _peft_llama()
    store = HistoryStore(kind)
    store.record_task(pm)
    layers = list(lora_layers(pm))
    assert len(store) == len(layers) == 4 and store.tasks == 1
    name, mod, ad = layers[0]
    B, A, s = lora_factors(mod, ad)
    expect = History.from_factors([B], [A], [s])
    assert math.isclose(store[name].rms, expect.rms, rel_tol=1e-5)
    if kind == "bits":
        assert torch.equal(store[name].bits, expect.to_sign_bits().bits)
    else:
        torch.testing.assert_close(store[name].to_dense(), expect.to_dense())
    store.record_task(pm)
    assert store.tasks == 2
    path = tmp_path / "hist.pt"
    store.save(path)
    back = HistoryStore.load(path)
    assert back.kind == kind and back.tasks == 2 and set(back.layers) == set(store.layers)
    assert torch.equal(back[name].to_dense(), store[name].to_dense())


def test_store_refuses_a_model_without_lora():
    from tests.helpers import tiny_llama

    with pytest.raises(ValueError, match="no active PEFT LoRA layer"):
        HistoryStore().record_task(tiny_llama())
    with pytest.raises(ValueError, match="unknown history form"):
        HistoryStore("sparse")


def test_bfloat16_factors_are_scaled_in_float32_not_bf16():
    """A bf16 adapter (s·B) must not be rounded to bf16 before it is stored: the history keeps float32 factors,
    so H = s·B·A of the bf16 values to float32 accuracy, in from_factors and in every form's append."""
    Bs, As = _factors(24, 19, [3, 2], seed=4)
    Bs, As = [B.bfloat16() for B in Bs], [A.bfloat16() for A in As]
    s = 0.3  # not a power of two: s·B in bf16 would round
    exact1 = s * Bs[0].double() @ As[0].double()
    exact2 = exact1 + 1.7 * Bs[1].double() @ As[1].double()
    h = History.from_factors(Bs[:1], As[:1], [s])
    torch.testing.assert_close(h.to_dense(torch.float64), exact1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.append(Bs[1], As[1], 1.7).to_dense(torch.float64), exact2, rtol=1e-6, atol=1e-6)
    d = History.from_dense(h.to_dense()).append(Bs[1], As[1], 1.7)
    torch.testing.assert_close(d.dense.double(), exact2, rtol=1e-6, atol=1e-6)


def test_store_load_refuses_a_file_that_is_not_a_saved_history(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"layer.weight": torch.ones(2, 2)}, weights)
    text = tmp_path / "notes.txt"
    text.write_text("not a history\n")
    for path, found in ((weights, r"found a dict with keys \['layer.weight'\]"), (text, "torch.load failed")):
        with pytest.raises(
            ValueError,
            match=rf"{path.name}' is not a saved history \(expected a file written by "
            rf"HistoryStore.save.*{found}",
        ):
            HistoryStore.load(path)
    with pytest.raises(FileNotFoundError):
        HistoryStore.load(tmp_path / "missing.pt")


def _store_of(kind):
    Bs, As = _factors(9, 11, [2])
    h = History.from_factors(Bs, As)
    h = {"factors": h, "dense": History.from_dense(h.to_dense()), "bits": h.to_sign_bits()}[kind]
    return HistoryStore(kind, {"layers.0.q_proj": h, "layers.0.v_proj": h}, tasks=1)


@pytest.mark.parametrize("rms", [float("nan"), float("inf"), -1.0], ids=["nan", "inf", "negative"])
@pytest.mark.parametrize("kind", ["factors", "dense", "bits"])
def test_store_load_refuses_a_non_finite_or_negative_rms(tmp_path, kind, rms):
    """rms(H) sets α_ℓ = α/rms and the loss's 1/rms factors: a NaN, Inf or negative one used to load and turn
    the stability loss into NaN (or flip its sign). The error names the file and the layer."""
    d = _store_of(kind).state_dict()
    d["layers"]["layers.0.v_proj"]["rms"] = rms
    path = tmp_path / "hist.pt"
    torch.save(d, path)
    with pytest.raises(HistoryError, match=rf"hist\.pt'.*layer 'layers\.0\.v_proj': rms = {rms} .*finite and ≥ 0"):
        HistoryStore.load(path)
    with pytest.raises(HistoryError, match=r"layer 'layers\.0\.v_proj': rms"):
        HistoryStore.from_state_dict(d)
    with pytest.raises(HistoryError, match="rms"):
        History.from_bits(torch.zeros(9, 2, dtype=torch.uint8), 11, rms)


def test_store_load_keeps_a_zero_rms_of_an_all_zero_history(tmp_path):
    """rms = 0 is legitimate (an all-zero H, e.g. an adapter that never moved): the loss skips such a layer."""
    store = HistoryStore("dense", {"l": History.from_dense(torch.zeros(4, 5))}, tasks=1)
    assert store["l"].rms == 0.0
    store.save(tmp_path / "zero.pt")
    assert HistoryStore.load(tmp_path / "zero.pt")["l"].rms == 0.0
