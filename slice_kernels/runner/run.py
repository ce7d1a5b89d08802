"""The continual run (SPEC §2): every method over the same task sequence, data and seeds.

Per method and stage t: build the replay buffer of the finished tasks, initialize the adapter with the
method, train it, merge it, evaluate every task seen so far (row t of R); at the end GP/IP on held-out
tasks. A checkpoint is written after every stage; ``resume=True`` continues from the newest one and ends
with the same results as an uninterrupted run (every random draw is seeded per stage).
"""
from __future__ import annotations

import os
import time
import zlib

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from . import checkpoint as ckpt
from . import methods as methods_mod
from .data import TRAIN_ON, collate, encode, make_batches, pad_id, replay_sample
from .evaluate import evaluate_task
from .metrics import continual_metrics
from .methods import LoraSettings, StageContext
from .model import check_model_dir, load_model
from .profiles import RunConfig
from .tasks import Example, check_spec, load_task, task_name, train_count
from .train import collect_gradients, default_loss, train_adapter, world_and_rank


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def validate(cfg: RunConfig) -> None:
    """Every check that needs no model: run before anything is loaded or written."""
    if not cfg.tasks:
        raise ValueError("no tasks: pass --tasks with at least one reasoning-gym name or JSONL file")
    for spec in list(cfg.tasks) + list(cfg.heldout):
        check_spec(spec)
    short = [task_name(s) for s in list(cfg.tasks) + list(cfg.heldout)]
    dupes = sorted({n for n in short if short.count(n) > 1})
    if dupes:
        raise ValueError(f"task name(s) {dupes} appear twice among --tasks/--heldout (JSONL tasks are named after "
                         f"the file name without .jsonl): rename one of the files")
    overlap = sorted(set(cfg.tasks) & set(cfg.heldout))
    if overlap:
        raise ValueError(f"held-out task(s) {overlap} are also in the sequence; GP/IP need tasks outside it (--heldout)")
    for m in cfg.methods:
        methods_mod.get(m)
    # the init options exactly as the methods receive them (--tau, --strength, --svd, --method-option):
    # a bad value is named now, not at the first init after the run directory was written
    methods_mod.check_method_options({"svd": cfg.svd, "conflict_threshold": cfg.conflict_threshold,
                                      "projection_strength": cfg.projection_strength, **cfg.method_options})
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"--methods lists a method twice: {cfg.methods}")
    if cfg.train_on not in TRAIN_ON:
        raise ValueError(f"train_on={cfg.train_on!r} must be one of {TRAIN_ON}")
    for k in ("rank", "batch_size", "grad_accum", "max_len", "n_train", "n_eval", "grad_batches",
              "replay_batches", "grad_batch_size", "max_new_tokens", "eval_batch_size"):
        v = getattr(cfg, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k}={v!r} must be a positive integer")
    if cfg.steps is not None and (not isinstance(cfg.steps, int) or cfg.steps < 1):
        raise ValueError(f"steps={cfg.steps!r} must be a positive integer (training steps per task)")
    world, _ = world_and_rank()
    for k in ("grad_batches", "replay_batches"):
        if getattr(cfg, k) % world:
            raise ValueError(f"{k}={getattr(cfg, k)} must be a multiple of the {world} data-parallel processes "
                             f"(each process averages an equal share of the gradient batches)")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world} data-parallel processes")
    for spec in cfg.tasks:  # a training set smaller than one batch yields no batch at all (training would hang)
        n = train_count(spec, cfg.n_train, cfg.n_eval)
        if n < cfg.batch_size:
            raise ValueError(f"task {task_name(spec)!r} has {n} training example(s), fewer than one batch "
                             f"(batch_size={cfg.batch_size}): lower --batch-size, raise --n-train, or add examples")
    _check_device_and_dtype(cfg)
    check_model_dir(cfg.model)


def _check_device_and_dtype(cfg: RunConfig) -> None:
    # torch would only reject the device when the model is moved, after the model load (a minute for SmolLM2)
    # and with a raw traceback; the paper profile defaults to cuda, so on a CPU box this is a likely first error
    try:
        dev = torch.device(cfg.device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={cfg.device!r} is not a torch device; pass --device cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={cfg.device!r} but this torch ({torch.__version__}) sees no CUDA device"
                             f"{' (the paper profile defaults to cuda)' if cfg.profile == 'paper' else ''}; "
                             f"pass --device cpu or run on a GPU machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={cfg.device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={cfg.dtype!r} must be one of float32, bfloat16, float16")


def _train_stream(tok, task, cfg: RunConfig, stage: int, world: int, rank: int):
    """This rank's micro-batches, epoch after epoch, from a DistributedSampler seeded per stage."""
    enc = [encode(tok, ex, cfg.max_len, cfg.train_on) for ex in task.train]
    sampler = DistributedSampler(enc, num_replicas=world, rank=rank, shuffle=True, seed=_seed(cfg.seed, stage, "train"),
                                 drop_last=True)
    per_rank = cfg.batch_size // world
    if len(sampler) < per_rank:  # validate() checks this; without it the loop below would never yield
        raise ValueError(f"task {task.name!r} has {len(enc)} training example(s), fewer than one batch "
                         f"(batch_size={cfg.batch_size}): lower --batch-size or raise --n-train")
    pad = pad_id(tok)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        idx = list(sampler)
        for i in range(0, len(idx) - per_rank + 1, per_rank):
            yield collate([enc[j] for j in idx[i : i + per_rank]], pad)
        epoch += 1


def _steps(cfg: RunConfig, n_train: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, -(-int(cfg.epochs * n_train) // (cfg.batch_size * cfg.grad_accum)))


def _heldout_scores(model, tok, heldout, cfg, progress) -> dict:
    kw = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, max_len=cfg.max_len * (cfg.ip_shots + 1),
              progress=progress)
    gp = {t.name: evaluate_task(model, tok, t, shots=0, **kw)[0] for t in heldout}
    ip = {t.name: evaluate_task(model, tok, t, shots=cfg.ip_shots, **kw)[0] for t in heldout}
    mean = lambda d: sum(d.values()) / len(d) if d else None  # noqa: E731
    return {"GP": mean(gp), "IP": mean(ip), "GP_per_task": gp, "IP_per_task": ip}


def _broadcast(obj):
    world, _ = world_and_rank()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(cfg: RunConfig, out: str, *, resume: bool = False, progress: bool = True, log=print,
        stop_after: int | None = None) -> dict:
    """Run (or resume) a continual experiment and write results.json, summary.md and plots into ``out``.

    ``stop_after`` (tests): return after that many stages have been checkpointed, as if the run was killed.
    A fresh run that raises before its first checkpoint removes the run.json it wrote, so the corrected
    command can be rerun with the same ``out``.
    """
    _, rank = world_and_rank()
    fresh = not resume and not os.path.isfile(os.path.join(ckpt.ckpt_dir(out), "run.json"))
    out_existed = os.path.exists(out)
    try:
        return _run(cfg, out, resume=resume, progress=progress, log=log, stop_after=stop_after)
    except Exception:
        if fresh and rank == 0:
            ckpt.discard_unstarted(out, remove_out=not out_existed)
        raise


def _run(cfg: RunConfig, out: str, *, resume: bool, progress: bool, log, stop_after: int | None) -> dict:
    world, rank = world_and_rank()
    validate(cfg)
    # tasks are built before the output directory is touched: a task option value that reasoning-gym rejects
    # must not leave a run.json behind (it would refuse the corrected rerun in the same --out)
    tasks = [load_task(s, cfg.n_train, cfg.n_eval, cfg.seed) for s in cfg.tasks]
    heldout = [load_task(s, max(cfg.ip_shots, 1), cfg.n_heldout, cfg.seed) for s in cfg.heldout]
    fp = cfg.fingerprint()
    fp["world_size"] = world
    if rank == 0:
        state = ckpt.prepare(out, fp, resume)  # creates --out for a fresh run only: a refused resume leaves no trace
    if world > 1:
        dist.barrier()
        if rank != 0:
            state = ckpt.prepare(out, fp, True) if resume else None
    t0 = time.perf_counter()
    device = cfg.device
    if device == "cuda" and world > 1:  # one GPU per process under torchrun
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    model, tok = load_model(cfg.model, device, cfg.dtype)
    names = [t.name for t in tasks]
    lora = LoraSettings(cfg.rank, cfg.alpha, cfg.use_rslora, list(cfg.targets))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log(f"[runner] model {cfg.model} loaded in {time.perf_counter() - t0:.1f}s; tasks {names}; methods {cfg.methods}; "
        f"training on {'answer tokens only' if cfg.train_on == 'answer' else 'prompt and answer tokens'}; "
        f"{world} process(es)")

    finished: dict = {}
    timings: list = []
    predictions: dict = {}  # method -> per stage -> task -> [{answer, prediction, score}] (rank 0)
    base_eval = None
    replay: dict = {}
    cur = None
    index = 0
    if state is not None:
        finished, base_eval, replay, cur, index, timings, predictions = (
            state["finished"], state["base_eval"], state["replay"], state.get("current"), state["index"],
            state["timings"], state["predictions"])
        ckpt.set_rng_state(state["rng"])
        replay = {k: [Example(**e) for e in v] for k, v in replay.items()}
        log(f"[runner] resuming after checkpoint {index} (methods done: {list(finished)}"
            f"{'; %s at stage %s' % (cur['method'], cur['stage']) if cur else ''})")
    if base_eval is None:
        base_eval = _broadcast(_heldout_scores(model, tok, heldout, cfg, progress) if rank == 0 else None)

    def save(payload_current):
        nonlocal index
        index += 1
        if rank == 0:
            ckpt.save(out, index, {
                "index": index, "finished": finished, "base_eval": base_eval, "current": payload_current,
                "timings": timings, "predictions": predictions,
                "replay": {k: [e.to_dict() for e in v] for k, v in replay.items()},
                "method": payload_current["method"] if payload_current else None,
                "stage": payload_current["stage"] if payload_current else None,
            })
        if world > 1:
            dist.barrier()
        return stop_after is not None and index >= stop_after

    for mname in cfg.methods:
        if mname in finished:
            continue
        method = methods_mod.get(mname)
        model.load_state_dict(base)
        R = [[None] * len(tasks) for _ in tasks]
        reports, losses, mstate, done, preds = [], [], {}, 0, []
        if cur is not None and cur["method"] == mname:
            with torch.no_grad():
                sd = model.state_dict()
                for k, v in cur["delta"].items():
                    sd[k].copy_(v)
            R, reports, losses, mstate, done, preds = (cur["R"], cur["reports"], cur["losses"], cur["state"],
                                                       cur["stage"], cur["predictions"])
        cur = None
        for t in range(done + 1, len(tasks) + 1):
            task = tasks[t - 1]
            torch.manual_seed(_seed(cfg.seed, mname, t))  # anything drawing from the global RNG is seeded per stage
            current = make_batches(tok, task.train, cfg.grad_batches, cfg.grad_batch_size, cfg.max_len,
                                   _seed(cfg.seed, t, "grad"), cfg.train_on)
            replay_b = [make_batches(tok, replay[n], cfg.replay_batches, cfg.grad_batch_size, cfg.max_len,
                                     _seed(cfg.seed, t, "replay", n), cfg.train_on) for n in names[: t - 1]]
            ctx = StageContext(
                model=model, stage=t, task_name=task.name, current=current, replay=replay_b, lora=lora, seed=cfg.seed,
                state=mstate,
                collect_gradients=lambda b: collect_gradients(model, lora.target_modules, b, progress=progress,
                                                              desc=f"{mname} t{t} gradients"),
                loss_fn=default_loss, options={"svd": cfg.svd, "conflict_threshold": cfg.conflict_threshold,
                                                     "projection_strength": cfg.projection_strength,
                                                     **cfg.method_options}, world_size=world, rank=rank,
            )
            ts = time.perf_counter()
            peft_model, rep = method.init_adapter(ctx)
            stream = _train_stream(tok, task, cfg, t, world, rank)
            ls = train_adapter(peft_model, method, ctx, stream, steps=_steps(cfg, len(task.train)), lr=cfg.lr,
                               grad_accum=cfg.grad_accum, progress=progress, desc=f"{mname} t{t} {task.name} train")
            method.end_of_task(ctx, peft_model)
            model = method.merge(ctx, peft_model)
            row = None
            if rank == 0:
                evals = [evaluate_task(model, tok, tasks[j], max_new_tokens=cfg.max_new_tokens,
                                       batch_size=cfg.eval_batch_size, max_len=cfg.max_len, progress=progress)
                         for j in range(t)]
                row = [e[0] for e in evals]
                preds.append({tasks[j].name: evals[j][1] for j in range(t)})
            row = _broadcast(row)
            R[t - 1][:t] = row
            seconds = time.perf_counter() - ts
            # timings vary run to run: they go to timings.json, so results.json of a resumed run is identical
            timing = {"method": mname, "stage": t, "seconds": seconds, "init_phases": rep.pop("phases_seconds", {})}
            rep = dict(rep, stage=t, task=task.name)
            reports.append(rep)
            timings.append(timing)
            losses.append(ls)
            # weights that differ from the base are the whole model state a resume needs (exact copies)
            delta = {k: v.detach().clone() for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
            if task.name not in replay:
                replay[task.name] = replay_sample(task.train, cfg.replay_batches * cfg.grad_batch_size,
                                                  _seed(cfg.seed, "replay_buffer", task.name))
            log(f"[runner] {mname} stage {t}/{len(tasks)} ({task.name}): loss {ls[0]:.3f} -> {ls[-1]:.3f}, "
                f"R row {[round(x, 3) for x in row]}, gamma {rep.get('gamma')}, cos {rep.get('cos')}, "
                f"{seconds:.1f}s")
            payload = {"method": mname, "stage": t, "delta": delta, "R": R, "reports": reports, "losses": losses,
                       "state": mstate, "predictions": preds}
            if t == len(tasks):
                res = dict(R=R, **continual_metrics(R))
                held = _broadcast(_heldout_scores(model, tok, heldout, cfg, progress) if rank == 0 else None)
                res.update(held, init_reports=reports, train_losses=losses)
                finished[mname] = res
                predictions[mname] = preds
                payload = None
            if save(payload):
                return {"stopped_after": index}
    results = {
        "config": cfg.to_dict(), "tasks": names, "heldout": [t.name for t in heldout],
        "scorers": {t.name: t.scorer_name for t in tasks + heldout},
        "train_on": cfg.train_on, "world_size": world,
        "base": base_eval, "methods": {m: finished[m] for m in cfg.methods},
    }
    if rank == 0:
        from .report import write_outputs

        md = write_outputs(results, out, timings, predictions)
        log(md)
    return results
