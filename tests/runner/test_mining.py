"""Adversarial sequence mining: CountSketch accuracy against exact inner products, and the planted most
conflicting subset recovered by the exhaustive and the greedy+swap searches."""

import math
import os

import pytest
import torch

from slice_kernels.runner.mining import EXHAUSTIVE_LIMIT, choose_subset, cosine_matrix, countsketch

SHAPES = {"layers.0.q": (37, 29), "layers.0.mlp": (53, 41), "layers.1.q": (37, 29)}


def _grads(vec):
    out, i = {}, 0
    for name, (m, n) in SHAPES.items():
        out[name] = vec[i : i + m * n].reshape(m, n).float()
        i += m * n
    return out


DIM = sum(m * n for m, n in SHAPES.values())


def test_sketch_inner_products_within_the_stated_error():
    """⟨sk_a, sk_b⟩ is unbiased with std √((‖a‖²‖b‖² + ⟨a,b⟩²)/k); every pair lies within 5 std (the inputs
    are seeded, so this is a fixed check; 5 std is exceeded with probability < 1e-6 per pair)."""
    g = torch.Generator().manual_seed(0)
    k = 2000
    base = torch.randn(DIM, generator=g, dtype=torch.float64)
    vecs = [base * w + torch.randn(DIM, generator=g, dtype=torch.float64) for w in (0.0, 0.5, 1.0, -1.0, 2.0)]
    sks = [countsketch(_grads(v), k, seed=7) for v in vecs]
    for i in range(len(vecs)):
        for j in range(i + 1, len(vecs)):
            a, b = vecs[i].float().double(), vecs[j].float().double()
            exact = float(a @ b)
            std = math.sqrt((float(a @ a) * float(b @ b) + exact**2) / k)
            est = float(sks[i][0] @ sks[j][0])
            assert abs(est - exact) <= 5 * std, (i, j, est, exact, std)
    # norms are exact, not sketched
    assert sks[2][1] == pytest.approx(float(vecs[2].float().double().square().sum()), rel=1e-12)


def test_sketch_hashes_agree_across_tasks_and_depend_on_layer_names():
    v = torch.randn(DIM, dtype=torch.float64)
    s1, _ = countsketch(_grads(v), 500, seed=1)
    s2, _ = countsketch(_grads(v), 500, seed=1)
    assert torch.equal(s1, s2)
    renamed = {f"x.{k}": t for k, t in _grads(v).items()}
    assert not torch.equal(countsketch(renamed, 500, seed=1)[0], s1)
    with pytest.raises(ValueError, match="k ≥ 1"):
        countsketch(_grads(v), 0)


def _planted_pool(n, planted, seed):
    """n task gradients: all share a positive common direction, except the planted ones, which point in
    mutually opposing directions (a regular simplex) and so have the lowest mean pairwise cosine."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(DIM, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(DIM, len(planted), generator=g, dtype=torch.float64))
    simplex = q - q.mean(1, keepdim=True)  # columns sum to zero: pairwise cos = -1/(s-1)
    vecs = []
    for t in range(n):
        noise = 0.3 * torch.randn(DIM, generator=g, dtype=torch.float64) / math.sqrt(DIM)
        if t in planted:
            v = simplex[:, planted.index(t)] / simplex[:, planted.index(t)].norm() + noise
        else:
            v = common / common.norm() + 0.7 * torch.randn(DIM, generator=g, dtype=torch.float64) / math.sqrt(DIM)
        vecs.append(v)
    return vecs


def _mine(vecs, size, k=20000):
    sk = [countsketch(_grads(v), k, seed=0) for v in vecs]
    C = cosine_matrix([s for s, _ in sk], [q for _, q in sk])
    return choose_subset(C, size)


def test_planted_subset_exhaustive():
    planted = [1, 4, 6]
    idx, val, search = _mine(_planted_pool(8, planted, seed=0), 3)
    assert search == "exhaustive" and idx == planted and val < -0.3


def test_planted_subset_greedy_when_exhaustive_is_too_costly():
    planted = [2, 5, 11, 17, 23, 29, 33, 38]
    n = 40
    assert math.comb(n, len(planted)) > EXHAUSTIVE_LIMIT
    idx, val, search = _mine(_planted_pool(n, planted, seed=1), len(planted), k=4000)
    assert search == "greedy+swap" and idx == planted


def _python_search(C, size):
    """The plain search the vectorized one must equal: lowest mean, then the lexicographically first subset."""
    import itertools

    from slice_kernels.runner.mining import _mean_pairwise

    return list(min(itertools.combinations(range(len(C)), size), key=lambda s: (_mean_pairwise(C, s), s)))


@pytest.mark.parametrize("n,size,seed", [(9, 3, 0), (12, 4, 1), (10, 5, 2), (7, 2, 3)])
def test_vectorized_exhaustive_equals_the_plain_search(n, size, seed, monkeypatch):
    from slice_kernels.runner import mining

    monkeypatch.setattr(mining, "_CHUNK", 37)  # many chunks, so the first-minimum rule crosses chunk borders
    g = torch.Generator().manual_seed(seed)
    C = torch.empty(n, n).uniform_(-1, 1, generator=g)
    C = ((C + C.T) / 2).fill_diagonal_(1.0)
    C = (C * 4).round() / 4  # coarse values: many exact ties
    C = C.tolist()
    assert mining._exhaustive(C, size) == _python_search(C, size)


def test_the_paper_pool_size_is_searched_exhaustively():
    assert math.comb(46, 5) <= EXHAUSTIVE_LIMIT  # the SLICE paper's pool: 1,370,754 subsets


def test_choose_subset_bad_size():
    C = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    for size in (4, 1, 0):  # a single task has no pair to score
        with pytest.raises(ValueError, match="between 2 and 3"):
            choose_subset(C, size)


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--buckets", "0"], "--buckets must be at least 1, got 0"),
        (["--batches", "0"], "--batches must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--size", "1"], "--size 1 must be between 2 and the pool size 3"),
        (["--size", "4"], "--size 4 must be between 2 and the pool size 3"),
    ],
)
def test_mine_cli_refuses_bad_values_before_loading_the_model(tmp_path, monkeypatch, capsys, args, msg):
    from slice_kernels.runner import model as model_mod
    from slice_kernels.runner.cli import main
    from tests.helpers.runner_tiny import write_jsonl

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(model_mod, "load_model", no_load)
    pool = ",".join(write_jsonl(str(tmp_path / f"{t}.jsonl"), [{"prompt": "p", "answer": "a"}]) for t in "abc")
    out = tmp_path / "mined"
    assert main(["mine", "--pool", pool, "--out", str(out), *args]) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.reasoning_gym
def test_mine_cli_on_a_tiny_model(tmp_path, capsys):
    """The command end to end: prints the matrix and the sequence, saves mined.json (readable by
    ``run --tasks @mined.json``) and the heatmap."""
    import json

    from slice_kernels.runner.cli import main
    from slice_kernels.runner.tasks import expand_task_list
    from tests.helpers.runner_tiny import save_tiny_llama, write_jsonl

    model = save_tiny_llama(str(tmp_path / "tiny"))
    jl = write_jsonl(str(tmp_path / "echo.jsonl"), [{"prompt": f"say {w}", "answer": w} for w in "abcdefgh"])
    out = tmp_path / "mined"
    rc = main(
        [
            "mine",
            "--pool",
            f"basic_arithmetic,chain_sum,{jl}",
            "--size",
            "2",
            "--model",
            model,
            "--targets",
            "q_proj,v_proj",
            "--buckets",
            "3000",
            "--batches",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.load(open(out / "mined.json"))
    assert res["pool"] == ["basic_arithmetic", "chain_sum", "echo"] and res["search"] == "exhaustive"
    C = res["cosines"]
    assert len(res["sequence"]) == 2 and all(C[i][i] == 1.0 for i in range(3))
    pairs = {(0, 1): C[0][1], (0, 2): C[0][2], (1, 2): C[1][2]}
    best = min(pairs, key=pairs.get)
    names = ["basic_arithmetic", "chain_sum", jl]
    assert expand_task_list(f"@{out / 'mined.json'}") == [names[best[0]], names[best[1]]]
    assert (out / "cosines.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert ",".join(res["sequence"]) in printed and "chain_sum" in printed


def test_gradient_sketches_are_cached_per_task(tmp_path):
    """A second mining of a larger pool computes only the new task; other settings or another model miss."""
    from slice_kernels.runner.mining import GradientSketchCache, mine
    from slice_kernels.runner.model import load_model
    from slice_kernels.runner.tasks import load_task
    from tests.helpers.runner_tiny import save_tiny_llama, write_jsonl

    model_dir = save_tiny_llama(str(tmp_path / "tiny"))
    model, tok = load_model(model_dir, "cpu")
    paths = [
        write_jsonl(str(tmp_path / f"{t}.jsonl"), [{"prompt": f"{t} {i}", "answer": str(i)} for i in range(8)])
        for t in "abc"
    ]
    tasks = [load_task(p, 4, 0, 0) for p in paths]
    cache = GradientSketchCache(str(tmp_path / "cache"), {"m": "1"})
    kw = dict(size=2, buckets=500, batches=1, batch_size=4, max_len=16, targets=["q_proj"], progress=False)
    logs = []
    first = mine(model, tok, tasks[:2], cache=cache, log=logs.append, **kw)
    second = mine(model, tok, tasks, cache=cache, log=logs.append, **kw)
    assert "0 of 2 task(s) read, 2 computed" in logs[0] and "2 of 3 task(s) read, 1 computed" in logs[1]
    # read back exactly (the dot products may round differently in the last bit: memory alignment changes SIMD order)
    assert second["cosines"][0][1] == pytest.approx(first["cosines"][0][1], rel=1e-12)
    mine(model, tok, tasks[:1] + tasks[1:2], cache=cache, log=logs.append, **{**kw, "batch_size": 2})
    assert "0 of 2 task(s) read" in logs[2]  # other settings: computed again
    other = GradientSketchCache(str(tmp_path / "cache"), {"m": "2"})  # another model's files
    mine(model, tok, tasks[:2], cache=other, log=logs.append, **kw)
    assert "0 of 2 task(s) read" in logs[3]
    uncached = mine(model, tok, tasks, **kw)  # no cache: the same numbers
    assert uncached["cosines"] == [pytest.approx(row, rel=1e-12) for row in second["cosines"]]
    for f in os.listdir(tmp_path / "cache"):  # a torn file is recomputed, not trusted
        (tmp_path / "cache" / f).write_bytes(b"torn")
    mine(model, tok, tasks, cache=cache, log=logs.append, **kw)
    assert "0 of 3 task(s) read" in logs[4]


def test_mine_pool_all_leaves_out_datasets_that_cannot_generate(tmp_path, monkeypatch, capsys):
    import json

    from slice_kernels.runner import tasks as tasks_mod
    from slice_kernels.runner.cli import main
    from tests.helpers.runner_tiny import save_tiny_llama

    model = save_tiny_llama(str(tmp_path / "tiny"))
    monkeypatch.setattr(tasks_mod, "reasoning_gym_names", lambda: ["basic_arithmetic", "chain_sum", "gcd"])
    real = tasks_mod.load_task

    def load(spec, *a, **k):
        if spec == "gcd":
            raise RuntimeError("cannot generate here")
        return real(spec, *a, **k)

    monkeypatch.setattr(tasks_mod, "load_task", load)
    out = tmp_path / "mined"
    args = ["mine", "--pool", "all", "--size", "2", "--model", model, "--targets", "q_proj", "--buckets", "300"]
    assert main(args + ["--batches", "1", "--batch-size", "2", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "mined.json").read_text())
    assert res["pool"] == ["basic_arithmetic", "chain_sum"]
    assert res["skipped"] == {"gcd": "RuntimeError: cannot generate here"}
    assert "left out gcd" in capsys.readouterr().out
    assert len(os.listdir(out / "grad_cache")) == 2


def test_a_whole_pool_prints_the_chosen_block_and_the_worst_pairs_and_plots_small(tmp_path):
    from slice_kernels.runner.mining import FULL_MATRIX_MAX, format_matrix, most_conflicting_pairs, plot_cosines

    n = FULL_MATRIX_MAX + 24
    names = [f"task_{i:02d}" for i in range(n)]
    C = [[1.0 if i == j else 0.1 + 0.001 * (i + j) for j in range(n)] for i in range(n)]
    C[3][30] = C[30][3] = -0.8  # the pool's most conflicting pair
    C[5][7] = C[7][5] = -0.5
    res = {"pool": names, "cosines": C, "sequence": ["task_03", "task_30", "task_07"]}
    assert most_conflicting_pairs(res, 2) == [(-0.8, "task_03", "task_30"), (-0.5, "task_05", "task_07")]
    text = format_matrix(res)
    lines = text.splitlines()
    assert len(lines) < n  # not the whole matrix
    assert lines[1].split() == ["task_03", "task_30", "task_07"]  # the chosen block, in sequence order
    assert lines[2].split()[:3] == ["task_03", "1.000", "-0.800"]
    assert "-0.800  task_03 | task_30" in text and text.index("task_03 | task_30") < text.index("task_05 | task_07")
    plot_cosines(res, str(tmp_path / "big.png"))
    small = {"pool": names[:4], "cosines": [r[:4] for r in C[:4]], "sequence": names[:2]}
    assert len(format_matrix(small).splitlines()) == 5  # a small pool prints its whole matrix
    plot_cosines(small, str(tmp_path / "small.png"))
    assert 1000 < (tmp_path / "big.png").stat().st_size < 1_000_000
    assert (tmp_path / "small.png").stat().st_size > 1000
