"""Adversarial sequence mining (SPEC §2): the task subset whose base-model gradients conflict most.

Each task's gradient (averaged over a few batches on the base model, every target weight) is compressed
with a CountSketch of k buckets: entry i of layer ℓ goes to bucket h_ℓ(i) with sign s_ℓ(i), both drawn from
a generator seeded by (seed, layer name) so they agree across tasks, and E⟨sk_a, sk_b⟩ = ⟨g_a, g_b⟩. Norms are
exact (accumulated while sketching), so cos(a, b) = ⟨sk_a, sk_b⟩ / (‖g_a‖‖g_b‖). The estimate's standard
deviation is √((‖g_a‖²‖g_b‖² + ⟨g_a, g_b⟩²)/k), i.e. a cosine error of about √(1+cos²)/√k: ±0.003 at the
default k = 200,000. Only k floats per task are kept, never a full gradient per task.

Subset choice: the size-s subset with the lowest mean pairwise cosine. Exhaustive when C(n, s) ≤ 5,000,000
(the SLICE paper's pool, C(46, 5) = 1,370,754 subsets, takes about a second: the subsets are scored in
vectorized chunks from the n × n matrix, ties going to the lexicographically first subset); otherwise a greedy
start (the most conflicting pair, then repeatedly the task that lowers the mean most) followed by single-swap
local search until no swap improves; the result says which search ran.

Gradient cache: each task's sketch and norm are saved under ``<out>/grad_cache/`` (``--cache``) keyed by
everything they depend on (the model files' sha256, the task spec, the seed, the batch settings, the targets,
the buckets, the loss and prompt format, the package version), so mining a larger pool, or the same pool
again, computes only the tasks it has not seen.
"""

from __future__ import annotations

import itertools
import math
import os
import zlib

import torch

EXHAUSTIVE_LIMIT = 5_000_000
_CHUNK = 1 << 18  # subsets scored per vectorized chunk


def _layer_seed(seed: int, name: str) -> int:
    return (zlib.crc32(name.encode()) * 1000003 + seed) % (2**63 - 1)


def countsketch(grads: dict, k: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """(sketch of length k in float64, exact squared norm) of a gradient dict {layer name: tensor}."""
    if k < 1:
        raise ValueError(f"CountSketch needs k ≥ 1 buckets, got {k}")
    sk = torch.zeros(k, dtype=torch.float64)
    sq = 0.0
    for name in sorted(grads):
        g = grads[name].detach().reshape(-1).double().cpu()
        gen = torch.Generator().manual_seed(_layer_seed(seed, name))
        h = torch.randint(0, k, (g.numel(),), generator=gen)
        s = torch.randint(0, 2, (g.numel(),), generator=gen).double().mul_(2).sub_(1)
        sk.index_add_(0, h, g * s)
        sq += float(g.square().sum())
    return sk, sq


def cosine_matrix(sketches: list[torch.Tensor], sq_norms: list[float]) -> list[list[float]]:
    n = len(sketches)
    C = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            den = math.sqrt(sq_norms[i] * sq_norms[j])
            c = float(sketches[i] @ sketches[j]) / den if den > 0 else 0.0
            C[i][j] = C[j][i] = max(-1.0, min(1.0, c))
    return C


def _mean_pairwise(C, subset) -> float:
    pairs = list(itertools.combinations(subset, 2))
    return sum(C[i][j] for i, j in pairs) / len(pairs) if pairs else 0.0


def choose_subset(C: list[list[float]], size: int) -> tuple[list[int], float, str]:
    """(indices in pool order, mean pairwise cosine, search used) of the most conflicting subset."""
    n = len(C)
    # the score is a mean over pairs: a single task has none, so size 1 would "choose" an arbitrary task
    if not 2 <= size <= n:
        raise ValueError(f"cannot choose {size} tasks out of a pool of {n}; --size must be between 2 and {n}")
    if math.comb(n, size) <= EXHAUSTIVE_LIMIT:
        best = _exhaustive(C, size)
        return best, _mean_pairwise(C, best), "exhaustive"
    i, j = min(itertools.combinations(range(n), 2), key=lambda p: C[p[0]][p[1]])
    cur = [i, j]
    while len(cur) < size:
        cur.append(min((t for t in range(n) if t not in cur), key=lambda t: _mean_pairwise(C, cur + [t])))
    val = _mean_pairwise(C, cur)
    improved = True
    while improved:
        improved = False
        for a in range(size):
            for t in range(n):
                if t in cur:
                    continue
                cand = cur[:a] + [t] + cur[a + 1 :]
                v = _mean_pairwise(C, cand)
                if v < val - 1e-15:
                    cur, val, improved = cand, v, True
    return sorted(cur), val, "greedy+swap"


def _exhaustive(C, size: int) -> list[int]:
    """The lexicographically first subset with the lowest mean pairwise cosine. The pair sums accumulate in the
    order ``_mean_pairwise`` uses, so the values (and the ties) are those of the plain Python search."""
    import numpy as np

    Cn = np.asarray(C, dtype=np.float64)
    pairs = list(itertools.combinations(range(size), 2))
    it = itertools.combinations(range(len(C)), size)
    best_val, best = math.inf, None
    while True:
        flat = np.fromiter(itertools.chain.from_iterable(itertools.islice(it, _CHUNK)), dtype=np.int64)
        if flat.size == 0:
            break
        S = flat.reshape(-1, size)
        acc = np.zeros(len(S))
        for a, b in pairs:
            acc += Cn[S[:, a], S[:, b]]
        vals = acc / len(pairs)
        i = int(np.argmin(vals))  # the first minimum: combinations come in lexicographic order
        if vals[i] < best_val:
            best_val, best = float(vals[i]), [int(x) for x in S[i]]
    return best


def check_mine_args(pool_size: int, *, size: int, buckets: int, batches: int, batch_size: int) -> None:
    """Refuse values that cannot mine anything, before a model is loaded or a gradient computed."""
    if pool_size < 2:
        raise ValueError(f"mining needs a pool of at least 2 tasks, got {pool_size} (--pool a,b,...)")
    if not 2 <= size <= pool_size:
        raise ValueError(
            f"--size {size} must be between 2 and the pool size {pool_size}: the search scores "
            f"pairs of tasks (add tasks to --pool for a longer sequence)"
        )
    for opt, v in (("--buckets", buckets), ("--batches", batches), ("--batch-size", batch_size)):
        if v < 1:
            raise ValueError(
                f"{opt} must be at least 1, got {v} (defaults: --buckets 200000, --batches 2, --batch-size 8)"
            )


def mine(
    model,
    tok,
    tasks,
    *,
    size: int,
    buckets: int = 200_000,
    batches: int = 2,
    batch_size: int = 8,
    max_len: int = 64,
    targets=None,
    seed: int = 0,
    progress: bool = True,
    train_on: str = "answer",
    prompt_format: str = "plain",
    cache=None,
    log=print,
) -> dict:
    """Sketch every task's base-model gradient and choose the most conflicting subset of ``size``. ``cache`` (a
    ``GradientSketchCache`` or None) supplies the sketches it holds and keeps the new ones."""
    from .data import make_batches
    from .train import collect_gradients

    check_mine_args(len(tasks), size=size, buckets=buckets, batches=batches, batch_size=batch_size)
    settings = dict(
        buckets=buckets,
        batches=batches,
        batch_size=batch_size,
        max_len=max_len,
        targets=sorted(targets or []),
        seed=seed,
        train_on=train_on,
        prompt_format=prompt_format,
    )
    sks, sqs, hits = [], [], 0
    for t in tasks:
        got = cache.get(t.name, settings) if cache is not None else None
        if got is None:
            b = make_batches(
                tok,
                t.train,
                batches,
                batch_size,
                max_len,
                seed=zlib.crc32(f"mine/{seed}/{t.name}".encode()),
                train_on=train_on,
                fmt=prompt_format,
            )
            g = collect_gradients(model, targets, b, progress=progress)
            got = countsketch(g, buckets, seed)
            del g
            if cache is not None:
                cache.put(t.name, settings, *got)
        else:
            hits += 1
        sks.append(got[0])
        sqs.append(got[1])
    if cache is not None:
        log(
            f"[mine] gradient cache {cache.directory}: {hits} of {len(tasks)} task(s) read, {len(tasks) - hits} computed"
        )
    C = cosine_matrix(sks, sqs)
    idx, val, search = choose_subset(C, size)
    names = [t.name for t in tasks]
    return {
        "pool": names,
        "cosines": C,
        "norms": [math.sqrt(s) for s in sqs],
        "sequence": [tasks[i].source if tasks[i].source != "reasoning_gym" else tasks[i].name for i in idx],
        "mean_cosine": val,
        "search": search,
        "buckets": buckets,
        "seed": seed,
        "cosine_error_std": math.sqrt(2.0 / buckets),
        "train_on": train_on,
        "prompt_format": prompt_format,
    }


class GradientSketchCache:
    """Per-task sketches on disk, one safetensors file per (task, settings, model), named by a sha256 of them."""

    def __init__(self, directory: str, model_fingerprint: dict):
        self.directory = directory
        self.model_fingerprint = model_fingerprint

    def _path(self, task: str, settings: dict) -> str:
        import hashlib
        import json

        from .. import __version__

        key = json.dumps(
            {"task": task, "settings": settings, "model": self.model_fingerprint, "version": __version__},
            sort_keys=True,
        )
        return os.path.join(self.directory, hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")

    def get(self, task: str, settings: dict):
        from safetensors.torch import load_file

        path = self._path(task, settings)
        if not os.path.isfile(path):
            return None
        try:
            d = load_file(path)
            return d["sketch"], float(d["sq_norm"])
        except Exception:  # a torn or foreign file is recomputed, not trusted
            return None

    def put(self, task: str, settings: dict, sketch, sq: float) -> None:
        from safetensors.torch import save

        from .files import atomic_write_bytes

        os.makedirs(self.directory, exist_ok=True)
        blob = save({"sketch": sketch.contiguous(), "sq_norm": torch.tensor(sq, dtype=torch.float64)})
        atomic_write_bytes(self._path(task, settings), lambda f: f.write(blob))


# Beyond this many tasks the whole matrix is unreadable in a terminal or as annotated cells (the whole pool has
# about 105): the text shows the chosen tasks' block and the most conflicting pairs, the plot drops the numbers.
FULL_MATRIX_MAX = 16


def _matrix_lines(names: list, rows: list) -> list[str]:
    w = max(len(n) for n in names)
    lines = [" " * w + " " + " ".join(f"{n[:8]:>8}" for n in names)]
    for n, row in zip(names, rows):
        lines.append(f"{n:>{w}} " + " ".join(f"{c:8.3f}" for c in row))
    return lines


def most_conflicting_pairs(res: dict, k: int = 10) -> list[tuple[float, str, str]]:
    """The k pool pairs with the lowest cosine, lowest first."""
    names, C = res["pool"], res["cosines"]
    pairs = [(C[i][j], names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    return sorted(pairs)[:k]


def format_matrix(res: dict) -> str:
    names, C = res["pool"], res["cosines"]
    if len(names) <= FULL_MATRIX_MAX:
        return "\n".join(_matrix_lines(names, C))
    idx = [names.index(s) for s in res["sequence"]]
    lines = [f"cosines among the chosen tasks (the whole {len(names)} × {len(names)} matrix is in mined.json):"]
    lines += _matrix_lines(res["sequence"], [[C[i][j] for j in idx] for i in idx])
    lines.append("\nthe 10 most conflicting pairs of the pool:")
    lines += [f"{c:+.3f}  {a} | {b}" for c, a, b in most_conflicting_pairs(res)]
    return "\n".join(lines)


def plot_cosines(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(res["pool"])
    full = n <= FULL_MATRIX_MAX
    side = 1.0 + 0.7 * n if full else 14.0  # a fixed canvas for big pools keeps the file small and the labels legible
    fig, ax = plt.subplots(figsize=(side, side * 0.86))
    im = ax.imshow(res["cosines"], vmin=-1, vmax=1, cmap="coolwarm")
    font = 7 if full else max(3.5, min(7.0, 600 / n))
    ax.set_xticks(range(n), res["pool"], rotation=45 if full else 90, ha="right" if full else "center", fontsize=font)
    ax.set_yticks(range(n), res["pool"], fontsize=font)
    chosen = set(res["sequence"])
    for lab in ax.get_xticklabels() + ax.get_yticklabels():
        if lab.get_text() in chosen:  # the chosen tasks stand out among a hundred names
            lab.set_color("darkgreen")
            lab.set_fontweight("bold")
    if full:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{res['cosines'][i][j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title(f"gradient cosines (chosen: {', '.join(res['sequence'])})", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110 if full else 100)
    plt.close(fig)


def mine_cli(a) -> dict:
    from .data import check_prompt_format
    from .files import atomic_json
    from .fingerprint import model_files
    from .model import load_model
    from .tasks import check_spec, expand_task_list, load_task, reasoning_gym_names

    whole_pool = a.pool.strip() == "all"
    pool = reasoning_gym_names() if whole_pool else expand_task_list(a.pool)
    check_mine_args(len(pool), size=a.size, buckets=a.buckets, batches=a.batches, batch_size=a.batch_size)
    for s in pool:
        check_spec(s)
    model, tok = load_model(a.model, a.device)
    check_prompt_format(tok, a.prompt_format, a.model)
    tasks, skipped = [], {}
    for s in pool:
        try:
            tasks.append(load_task(s, a.batches * a.batch_size, 0, a.seed))
        except Exception as e:  # with --pool all, a dataset that cannot generate here is left out, and said so
            if not whole_pool:
                raise
            skipped[s] = f"{type(e).__name__}: {e}"
            print(f"[mine] left out {s}: {skipped[s]}")
    check_mine_args(len(tasks), size=a.size, buckets=a.buckets, batches=a.batches, batch_size=a.batch_size)
    cache = None
    if a.cache != "none":
        cache = GradientSketchCache(a.cache or os.path.join(a.out, "grad_cache"), model_files(a.model))
    res = mine(
        model,
        tok,
        tasks,
        size=a.size,
        buckets=a.buckets,
        batches=a.batches,
        batch_size=a.batch_size,
        max_len=a.max_len,
        targets=[t for t in a.targets.split(",") if t],
        seed=a.seed,
        progress=not a.no_progress,
        train_on=a.train_on,
        prompt_format=a.prompt_format,
        cache=cache,
    )
    if skipped:
        res["skipped"] = skipped
    os.makedirs(a.out, exist_ok=True)
    atomic_json(os.path.join(a.out, "mined.json"), res)
    plot_cosines(res, os.path.join(a.out, "cosines.png"))
    print(format_matrix(res))
    print(
        f"\nmost conflicting sequence ({res['search']} search, mean pairwise cosine {res['mean_cosine']:.4f}, "
        f"cosine error std ≈ {res['cosine_error_std']:.4f}):"
    )
    print(",".join(res["sequence"]))
    print(
        f"saved {os.path.join(a.out, 'mined.json')} and cosines.png; run it with: slice-kernels run --tasks "
        f"@{os.path.join(a.out, 'mined.json')}"
    )
    return res
