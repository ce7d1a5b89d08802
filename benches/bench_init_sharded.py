"""Sharded (FSDP2) SLICE init on CPU gloo ranks: per-rank gradient-accumulator bytes and the layer-parallel SVD's
time at 1, 2 and 3 ranks (not a timed test; the numbers go to benches/RESULTS.md).

    OMP_NUM_THREADS=1 python benches/bench_init_sharded.py --layers 6 --dim 2048 --rank 32 --worlds 1 2 3

Each rank runs one thread. The model is a stack of ``--layers`` square Linear layers (tanh between), wrapped with
PEFT and ``fully_shard``-ed per block, initialized by ``init_sharded_`` (method slice with a replay task). Columns:
``acc bytes/rank``: the float32 accumulators this rank holds for one gradient set (its shards), beside what the
replicated init holds on every rank (all full layers); ``svd s``: the slowest rank's SVD phase (median of ``--repeat`` inits) (each rank
decomposes its own layers); ``gather s`` and ``share s``: moving G̃ and W to the owners, and A, B back.
On a machine with fewer cores than ranks the ranks share cores, so the SVD time cannot fall by the rank count.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return torch.tanh(self.proj(x))


class Stack(nn.Module):
    def __init__(self, layers, d):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def batches(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, d, generator=g), torch.randn(8, d, generator=g)) for _ in range(n)]


def _worker(rank, world, port, args, out):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from peft import LoraConfig, get_peft_model
        from torch.distributed.fsdp import fully_shard

        from slice_kernels import SliceConfig
        from slice_kernels.slice_init.collect import collect_gradients
        from slice_kernels.slice_init.layer_parallel import assign_owners
        from slice_kernels.slice_init.sharded import init_sharded_, sharded_targets

        rows = []
        for _ in range(args.repeat):  # a fresh model each time: the init refuses an adapter whose B is not zero
            pm = get_peft_model(
                Stack(args.layers, args.dim), LoraConfig(r=args.rank, lora_alpha=2, target_modules=["proj"])
            )
            for b in pm.base_model.model.blocks:
                fully_shard(b)
            fully_shard(pm)
            cur = batches(2, args.dim, 10 + rank)
            replay = [batches(2, args.dim, 20 + rank)]
            bases = {n: m.get_base_layer() for n, m in sharded_targets(pm, "default").items()}
            acc = collect_gradients(pm, bases, cur, 2, loss_fn)
            acc_bytes = sum(a.numel() * a.element_size() for a in acc.values())
            del acc
            cfg = SliceConfig(current_steps=2, replay_steps=2, conflict_threshold=1.0)
            dist.barrier()  # the ranks enter the timed phases together
            ph = init_sharded_(pm, cfg, current=cur, replay=replay, loss_fn=loss_fn).phases
            rows.append(
                (ph.get("svd", {}).get("seconds", 0.0), ph["gather"]["seconds"], ph["share_factors"]["seconds"])
            )
        med = [statistics.median(col) for col in zip(*rows)]
        # the SVD work this rank owns, Σ m·n·q of its layers over all layers': what the phase's time follows on
        # idle cores (the wall times below also carry whatever else the machine runs)
        shapes = {n: (args.dim, args.dim) for n in bases}
        owner = assign_owners(shapes, args.rank, cfg, world)
        share = sum(owner[n] == rank for n in shapes) / len(shapes)
        row = {"acc_bytes": acc_bytes, "svd": med[0], "gather": med[1], "share": med[2], "work": share}
        got = [None] * world
        dist.all_gather_object(got, row)
        if rank == 0:
            torch.save(got, out)
    finally:
        dist.destroy_process_group()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--repeat", type=int, default=3, help="inits per world size; each column is the median")
    args = p.parse_args()
    replicated = args.layers * args.dim * args.dim * 4
    print(
        f"{args.layers} Linear layers {args.dim}x{args.dim}, r={args.rank}, CPU gloo, 1 thread per rank, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start"
    )
    print(
        f"{'ranks':>5} | {'acc bytes/rank (max)':>20} | {'replicated':>11} | {'svd s (max)':>11} | "
        f"{'gather s':>8} | {'share s':>7} | {'svd work (max rank)':>19}"
    )
    base_svd = None
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "rows.pt")
            mp.spawn(_worker, args=(world, _port(), args, out), nprocs=world, join=True)
            rows = torch.load(out)
        svd = max(r["svd"] for r in rows)
        base_svd = base_svd or svd
        print(
            f"{world:>5} | {max(r['acc_bytes'] for r in rows):>20,} | {replicated:>11,} | {svd:>11.3f} | "
            f"{max(r['gather'] for r in rows):>8.3f} | {max(r['share'] for r in rows):>7.3f} | "
            f"{max(r['work'] for r in rows):>19.2f}   "
            f"(svd {svd / base_svd:.2f}x of 1 rank)"
        )


if __name__ == "__main__":
    main()
