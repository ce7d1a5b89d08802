"""A non-finite training loss stops training with a clear error, and under data parallelism every process
raises it, also those whose own loss was finite (they would otherwise wait in the next all-reduce)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slice_kernels.runner.train import train_adapter


class _NanOnRank:
    """A method whose extra loss is NaN on one rank only."""

    def __init__(self, bad_rank):
        self.bad_rank = bad_rank

    def make_optimizer(self, ctx, model, params, lr):
        return None

    def extra_loss(self, ctx, model, batch):
        rank = dist.get_rank() if dist.is_initialized() else 0
        return torch.tensor(float("nan")) if rank == self.bad_rank else None


class _Ctx:
    fsdp = False


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, 2, generator=g)} for _ in range(n)]


def _loss(m, b):
    return ((m(b["x"]) - b["y"]) ** 2).mean()


def _train(method):
    model = torch.nn.Linear(3, 2)
    train_adapter(model, method, _Ctx(), iter(_batches()), steps=3, lr=0.1, grad_accum=1, loss_fn=_loss, progress=False)


def test_nonfinite_loss_raises_in_one_process():
    with pytest.raises(FloatingPointError, match="non-finite .*lower the learning rate"):
        _train(_NanOnRank(0))


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _train(_NanOnRank(1))
        msg = "finished"
    except FloatingPointError as e:
        msg = f"raised: {e}"
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(msg)


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_raises_on_every_rank(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    try:
        done = False
        for _ in range(120):  # before the fix rank 0 waited forever in the next all-reduce
            if ctx.join(timeout=1):
                done = True
                break
        assert done, "a process did not finish within 120 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    for rank in (0, 1):
        msg = (tmp_path / f"rank{rank}.txt").read_text()
        assert msg.startswith("raised:") and "on 1 of 2 processes" in msg, (rank, msg)
