"""The continual run (SPEC §2): every method over the same task sequence, data and seeds.

Per method and stage t: build the replay buffer of the finished tasks, initialize the adapter with the
method, train it, merge it, evaluate every task seen so far (row t of R); at the end GP/IP on held-out
tasks. A checkpoint is written after every stage; ``resume=True`` continues from the newest one and ends
with the same results as an uninterrupted run (every random draw is seeded per stage).
"""

from __future__ import annotations

import math
import os
import time
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from . import checkpoint as ckpt
from . import methods as methods_mod
from .data import PROMPT_FORMATS, TRAIN_ON, check_prompt_format, collate, encode, make_batches, pad_id, replay_sample
from .errors import ResumeError, RunnerError, TaskError
from .evaluate import evaluate_task
from .files import storage_errors
from .fingerprint import input_fingerprint
from .methods import LoraSettings, StageContext
from .metrics import continual_metrics
from .model import check_model_dir, load_model
from .profiles import RunConfig
from .tasks import Example, check_spec, load_task, shared_datasets, task_name
from .train import LR_SCHEDULES, collect_gradients, default_loss, train_adapter, world_and_rank


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def validate(cfg: RunConfig) -> None:
    """Every check that needs no model: run before anything is loaded or written."""
    if not cfg.tasks:
        raise ValueError("no tasks: pass --tasks with at least one reasoning-gym name or JSONL file")
    if not cfg.methods:
        raise ValueError(f"no methods: pass --methods with at least one of {', '.join(methods_mod.available())}")
    for k in ("tasks", "heldout", "methods", "targets"):
        v = getattr(cfg, k)
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x.strip() for x in v):
            raise ValueError(f"{k}={v!r} must be a list of non-empty names")
    if not cfg.targets:
        raise ValueError("no targets: pass --targets with the module names to adapt (e.g. q_proj,v_proj)")
    for k, minimum, above in (
        ("alpha", None, 0.0),
        ("lr", None, 0.0),
        ("epochs", None, 0.0),
        ("conflict_threshold", -1.0, None),
        ("projection_strength", 0.0, None),
    ):
        v = getattr(cfg, k)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (above is not None and v <= above) or (minimum is not None and v < minimum):
            bound = f"> {above:g}" if above is not None else f"≥ {minimum:g}"
            raise ValueError(f"{k}={v!r} must be a finite number {bound}")
    if cfg.heldout and cfg.n_heldout == 0:
        raise ValueError("n_heldout=0 leaves the held-out tasks without questions: raise it, or pass --heldout ''")
    if not isinstance(cfg.use_rslora, bool):
        raise ValueError(f"use_rslora={cfg.use_rslora!r} must be true or false")
    for k in ("seed", "ip_shots", "n_heldout"):
        v = getattr(cfg, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{k}={v!r} must be a non-negative integer")
    for spec in list(cfg.tasks) + list(cfg.heldout):
        check_spec(spec)
    short = [task_name(s) for s in list(cfg.tasks) + list(cfg.heldout)]
    dupes = sorted({n for n in short if short.count(n) > 1})
    if dupes:
        raise ValueError(
            f"task name(s) {dupes} appear twice among --tasks/--heldout (JSONL tasks are named after "
            f"the file name without .jsonl): rename one of the files"
        )
    overlap = sorted(set(cfg.tasks) & set(cfg.heldout))
    if overlap:
        raise ValueError(
            f"held-out task(s) {overlap} are also in the sequence; GP/IP need tasks outside it (--heldout)"
        )
    for m in cfg.methods:
        methods_mod.get(m)
    # the init options exactly as the methods receive them (--tau, --strength, --svd, --method-option), for
    # every method of the run: a bad value is named now, not after the earlier methods have checkpointed
    methods_mod.check_method_options(_method_options(cfg), methods=list(cfg.methods))
    for m in cfg.methods:  # options in relation to the run's own (e.g. a replay batch size and the buffer)
        methods_mod.get(m).check_config(cfg)
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"--methods lists a method twice: {cfg.methods}")
    if cfg.train_on not in TRAIN_ON:
        raise ValueError(f"train_on={cfg.train_on!r} must be one of {TRAIN_ON}")
    if cfg.prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format={cfg.prompt_format!r} must be one of {PROMPT_FORMATS}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={cfg.lr_schedule!r} must be one of {LR_SCHEDULES}")
    w = cfg.warmup_ratio
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0.0 <= w < 1.0):
        raise ValueError(f"warmup_ratio={w!r} must be a number in [0, 1) (the share of each task's steps)")
    if w and cfg.lr_schedule == "constant":
        raise ValueError(f"warmup_ratio={w!r} needs --lr-schedule linear (a constant schedule has no warmup)")
    g = cfg.max_grad_norm
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0):
        raise ValueError(f"max_grad_norm={g!r} must be a positive finite number, or None to not clip")
    for k in (
        "rank",
        "batch_size",
        "grad_accum",
        "max_len",
        "n_train",
        "n_eval",
        "grad_batches",
        "replay_batches",
        "grad_batch_size",
        "max_new_tokens",
        "eval_batch_size",
    ):
        v = getattr(cfg, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k}={v!r} must be a positive integer")
    if cfg.steps is not None and (not isinstance(cfg.steps, int) or cfg.steps < 1):
        raise ValueError(f"steps={cfg.steps!r} must be a positive integer (training steps per task)")
    world, _ = world_and_rank()
    for k in ("grad_batches", "replay_batches"):
        if getattr(cfg, k) % world:
            raise ValueError(
                f"{k}={getattr(cfg, k)} must be a multiple of the {world} data-parallel processes "
                f"(each process averages an equal share of the gradient batches)"
            )
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {world} data-parallel processes")
    if not isinstance(cfg.fsdp, bool):
        raise ValueError(f"fsdp={cfg.fsdp!r} must be true or false")
    if cfg.fsdp:
        from .fsdp import check_fsdp

        check_fsdp(list(cfg.methods), world)
    _check_device_and_dtype(cfg)
    check_model_dir(cfg.model)


def check_task_sizes(tasks: list, cfg: RunConfig) -> None:
    """A training set smaller than one batch yields no batch at all (training would hang): counted on the built
    tasks, so what the evaluation split and the removal of duplicated questions took away is accounted for."""
    for task in tasks:
        n = len(task.train)
        if n < cfg.batch_size:
            raise TaskError(
                f"task {task.name!r} has {n} training example(s) once its {len(task.eval)} evaluation question(s) "
                f"and their duplicates are set apart, fewer than one batch (batch_size={cfg.batch_size}): lower "
                f"--batch-size, raise --n-train, or add examples"
            )


def _check_device_and_dtype(cfg: RunConfig) -> None:
    # torch would only reject the device when the model is moved, after the model load (a minute for SmolLM2)
    # and with a raw traceback; the paper profile defaults to cuda, so on a CPU box this is a likely first error
    try:
        dev = torch.device(cfg.device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={cfg.device!r} is not a torch device; pass --device cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={cfg.device!r} but this torch ({torch.__version__}) sees no CUDA device"
                f"{' (the paper profile defaults to cuda)' if cfg.profile == 'paper' else ''}; "
                f"pass --device cpu or run on a GPU machine"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={cfg.device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={cfg.dtype!r} must be one of float32, bfloat16, float16")


def _train_stream(tok, task, cfg: RunConfig, stage: int, world: int, rank: int):
    """This rank's micro-batches, epoch after epoch, from a DistributedSampler seeded per stage."""
    enc = [encode(tok, ex, cfg.max_len, cfg.train_on, cfg.prompt_format) for ex in task.train]
    sampler = DistributedSampler(
        enc, num_replicas=world, rank=rank, shuffle=True, seed=_seed(cfg.seed, stage, "train"), drop_last=True
    )
    per_rank = cfg.batch_size // world
    if len(sampler) < per_rank:  # validate() checks this; without it the loop below would never yield
        raise ValueError(
            f"task {task.name!r} has {len(enc)} training example(s), fewer than one batch "
            f"(batch_size={cfg.batch_size}): lower --batch-size or raise --n-train"
        )
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


def replay_buffer(task, cfg: RunConfig) -> list:
    """The replay buffer a finished task leaves: a seeded sample of replay_batches × grad_batch_size of its
    training examples."""
    return replay_sample(
        task.train, cfg.replay_batches * cfg.grad_batch_size, _seed(cfg.seed, "replay_buffer", task.name)
    )


def stage_context(
    model, tok, task, t: int, cfg: RunConfig, lora, state: dict, replay: dict, *, mname: str, world, rank, progress
) -> StageContext:
    """What stage ``t`` of method ``mname`` sees at ``model`` = W^(t-1): the current task's gradient batches and
    one list of replay batches per earlier task (``replay``: task name -> buffer, oldest first), all seeded by
    (seed, stage), so any task placed at stage t gets the batches a run would give it. Seeds the global RNG
    per (method, stage) first, as every stage of a run does."""
    torch.manual_seed(_seed(cfg.seed, mname, t))  # anything drawing from the global RNG is seeded per stage
    current = make_batches(
        tok,
        task.train,
        cfg.grad_batches,
        cfg.grad_batch_size,
        cfg.max_len,
        _seed(cfg.seed, t, "grad"),
        cfg.train_on,
        cfg.prompt_format,
    )
    replay_b = [
        make_batches(
            tok,
            buf,
            cfg.replay_batches,
            cfg.grad_batch_size,
            cfg.max_len,
            _seed(cfg.seed, t, "replay", n),
            cfg.train_on,
            cfg.prompt_format,
        )
        for n, buf in replay.items()
    ]
    return StageContext(
        model=model,
        stage=t,
        task_name=task.name,
        current=current,
        replay=replay_b,
        lora=lora,
        seed=cfg.seed,
        state=state,
        collect_gradients=lambda b: collect_gradients(model, lora.target_modules, b, progress=progress),
        loss_fn=default_loss,
        options=_method_options(cfg),
        world_size=world,
        rank=rank,
        progress=progress,
        fsdp=cfg.fsdp,
    )


def train_stage(method, ctx: StageContext, tok, task, cfg: RunConfig, *, world, rank, progress, desc: str):
    """Init the stage's adapter, train it on ``task`` and merge it: (W^(t), init report, losses per step)."""
    peft_model, rep = method.init_adapter(ctx)
    stream = _train_stream(tok, task, cfg, ctx.stage, world, rank)
    ls = train_adapter(
        peft_model,
        method,
        ctx,
        stream,
        steps=_steps(cfg, len(task.train)),
        lr=cfg.lr,
        grad_accum=cfg.grad_accum,
        lr_schedule=cfg.lr_schedule,
        warmup_ratio=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm,
        progress=progress,
        desc=f"{desc} t{ctx.stage} {task.name} train",
    )
    method.end_of_task(ctx, peft_model)
    return method.merge(ctx, peft_model), rep, ls


def _heldout_scores(model, tok, heldout, cfg, progress) -> dict:
    kw = dict(
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.eval_batch_size,
        max_len=cfg.max_len * (cfg.ip_shots + 1),
        progress=progress,
        fmt=cfg.prompt_format,
    )
    gp = {t.name: evaluate_task(model, tok, t, shots=0, **kw) for t in heldout}
    ip = {t.name: evaluate_task(model, tok, t, shots=cfg.ip_shots, **kw) for t in heldout}
    mean = lambda d: sum(v[0] for v in d.values()) / len(d) if d else None  # noqa: E731
    # the per-example scores let a study bootstrap GP/IP over evaluation examples too (runner.stats)
    return {
        "GP": mean(gp),
        "IP": mean(ip),
        "GP_per_task": {k: v[0] for k, v in gp.items()},
        "IP_per_task": {k: v[0] for k, v in ip.items()},
        "GP_scores": {k: [r["score"] for r in v[1]] for k, v in gp.items()},
        "IP_scores": {k: [r["score"] for r in v[1]] for k, v in ip.items()},
    }


def _broadcast(obj):
    world, _ = world_and_rank()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(
    cfg: RunConfig, out: str, *, resume: bool = False, progress: bool = True, log=print, stop_after: int | None = None
) -> dict:
    """Run (or resume) a continual experiment and write results.json, summary.md and plots into ``out``.

    ``out`` is locked for the run's life (a second run into it is refused, touching nothing); a fresh run needs
    it new or empty; a resume needs the same options and inputs (runner.checkpoint, runner.fingerprint).
    ``stop_after`` (tests): return after that many stages have been checkpointed, as if the run was killed.
    A fresh run that raises before its first checkpoint removes what it wrote, so the corrected command can be
    rerun with the same ``out``.
    """
    r = _Run(cfg, out, progress=progress, log=log, stop_after=stop_after)  # validates; touches nothing
    failed = True
    try:
        r.open(resume)
        result = r.execute()
        failed = False
        return result
    finally:
        r.close(failed)


@dataclass
class _Progress:
    """Everything a checkpoint holds between stages: finished methods, the base model's GP/IP, the replay
    buffers, the method in flight (its weights' delta from the base, R so far, reports, state), timings and
    predictions."""

    finished: dict = field(default_factory=dict)
    base_eval: dict | None = None
    replay: dict = field(default_factory=dict)  # task name -> [Example]
    current: dict | None = None  # the method in flight, as saved after its last finished stage
    index: int = 0  # checkpoints written so far
    timings: list = field(default_factory=list)
    predictions: dict = field(default_factory=dict)  # method -> per stage -> task -> [{answer, prediction, score}]
    rng: dict | None = None  # the RNG states saved with the checkpoint, restored once the model is loaded

    @classmethod
    def from_checkpoint(cls, state: dict | None) -> "_Progress":
        if state is None:
            return cls()
        return cls(
            state["finished"],
            state["base_eval"],
            {k: [Example(**e) for e in v] for k, v in state["replay"].items()},
            state.get("current"),
            state["index"],
            state["timings"],
            state["predictions"],
            state["rng"],
        )

    def payload(self, current: dict | None) -> dict:
        return {
            "index": self.index,
            "finished": self.finished,
            "base_eval": self.base_eval,
            "current": current,
            "timings": self.timings,
            "predictions": self.predictions,
            "replay": {k: [e.to_dict() for e in v] for k, v in self.replay.items()},
            "method": current["method"] if current else None,
            "stage": current["stage"] if current else None,
        }


class _Run:
    """One run (or resume) of every method over the task sequence; ``execute`` returns the results."""

    def __init__(self, cfg: RunConfig, out: str, *, progress: bool, log, stop_after: int | None):
        self.cfg, self.out, self.progress, self.log, self.stop_after = cfg, out, progress, log, stop_after
        self.world, self.rank = world_and_rank()
        validate(cfg)
        ckpt.check_out(out)
        # tasks are built before the output directory is touched: a task option value that reasoning-gym rejects
        # must not leave a run.json behind (it would refuse the corrected rerun in the same --out)
        self.tasks = [load_task(s, cfg.n_train, cfg.n_eval, cfg.seed) for s in cfg.tasks]
        self.heldout = [load_task(s, max(cfg.ip_shots, 1), cfg.n_heldout, cfg.seed) for s in cfg.heldout]
        check_task_sizes(self.tasks, cfg)
        self.dir = None

    def open(self, resume: bool) -> None:
        """Claim ``out`` (rank 0 locks and checks it) and load the checkpoint a resume continues from; every rank
        raises when any rank fails, with nothing changed."""
        state, name, error = None, None, None
        if self.rank == 0:
            directory = ckpt.RunDirectory(self.out, log=self.log)
            try:  # everything rank 0 does here may fail: the other ranks must hear of it, not wait for it
                fp = dict(self.cfg.fingerprint(), world_size=self.world, **input_fingerprint(self.cfg))
                state, name = directory.open(fp, resume)
                self.dir = directory  # opened: close() releases it (open cleans up after itself when it fails)
            except Exception as e:
                error = e
        if self.world > 1:
            msg, name = _broadcast((None if error is None else str(error), name))
            if self.rank != 0 and msg is None and name is not None:
                try:
                    state = ckpt.RunDirectory(self.out, log=self.log).read(name)
                except Exception as e:
                    error = e
            errors = [None] * self.world
            dist.all_gather_object(errors, None if error is None else f"rank {self.rank}: {error}")
            if error is None and any(errors):
                if self.rank == 0:
                    self.close(failed=True)
                error = ResumeError(f"the run directory was refused: {'; '.join(e for e in errors if e)}")
        if error is not None:
            raise error
        self.state = _Progress.from_checkpoint(state)

    def close(self, failed: bool) -> None:
        if self.dir is not None:
            self.dir.close(failed)
            self.dir = None

    def _load_model(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        device = cfg.device
        if device == "cuda" and self.world > 1:  # one GPU per process under torchrun
            device = f"cuda:{os.environ.get('LOCAL_RANK', self.rank)}"
        self.model, self.tok = load_model(cfg.model, device, cfg.dtype)
        check_prompt_format(self.tok, cfg.prompt_format, cfg.model)
        self.lora = LoraSettings(cfg.rank, cfg.alpha, cfg.use_rslora, list(cfg.targets))
        self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # what only the model can tell (a rank too large for a layer, a target it lacks), for every method of the
        # run before the first stage of any: a run must not fail after the earlier methods spent their time
        options = _method_options(cfg)
        for mname in cfg.methods:
            try:
                methods_mod.get(mname).check_model(self.model, self.lora, options)
            except (RunnerError, ValueError) as e:
                raise type(e)(f"method {mname!r}: {e}") from None
        self.log(
            f"[runner] model {cfg.model} loaded in {time.perf_counter() - t0:.1f}s; tasks "
            f"{[t.name for t in self.tasks]}; methods {cfg.methods}; training on "
            f"{'answer tokens only' if cfg.train_on == 'answer' else 'prompt and answer tokens'}; "
            f"{self.world} process(es)"
        )
        for h, t in shared_datasets(cfg.tasks, cfg.heldout):
            self.log(
                f"[runner] note: held-out task {h} is the dataset of sequence task {t} in other settings, so its "
                f"GP/IP score a kind of task the adapters trained on; --heldout with other datasets measures unseen ones"
            )

    def _save(self, current: dict | None) -> bool:
        """Checkpoint after a stage; True when the caller asked to stop here (``stop_after``)."""
        self.state.index += 1
        if self.rank == 0:
            self.dir.save(self.state.index, self.state.payload(current))
        if self.world > 1:
            dist.barrier()
        return self.stop_after is not None and self.state.index >= self.stop_after

    def execute(self) -> dict:
        cfg, st = self.cfg, self.state
        self._load_model()
        if st.rng is not None:
            ckpt.set_rng_state(st.rng)
        if st.current is not None:
            cur = st.current
            self.log(
                f"[runner] resuming after checkpoint {st.index} (methods done: {list(st.finished)}; "
                f"{cur['method']} at stage {cur['stage']})"
            )
        elif st.index:
            self.log(f"[runner] resuming after checkpoint {st.index} (methods done: {list(st.finished)})")
        if st.base_eval is None:
            st.base_eval = _broadcast(self._heldout() if self.rank == 0 else None)
        for mname in cfg.methods:
            if mname not in st.finished and self._run_method(mname):
                return {"stopped_after": st.index}
        results = {
            "config": cfg.to_dict(),
            "tasks": [t.name for t in self.tasks],
            "heldout": [t.name for t in self.heldout],
            "scorers": {t.name: t.scorer_name for t in self.tasks + self.heldout},
            "train_on": cfg.train_on,
            "world_size": self.world,
            "base": st.base_eval,
            "methods": {m: st.finished[m] for m in cfg.methods},
        }
        if self.rank == 0:
            from .report import write_outputs

            with storage_errors(self.out, "the outputs"):  # the plots are written by matplotlib itself
                self.log(write_outputs(results, self.out, st.timings, st.predictions))
            self.dir.drop_fallback()
        return results

    def _heldout(self) -> dict:
        return _heldout_scores(self.model, self.tok, self.heldout, self.cfg, self.progress)

    def _run_method(self, mname: str) -> bool:
        """Every remaining stage of one method; True when the run stops early (``stop_after``)."""
        st, T = self.state, len(self.tasks)
        method = methods_mod.get(mname)
        self.model.load_state_dict(self.base)
        mrun = {
            "R": [[None] * T for _ in self.tasks],
            "reports": [],
            "losses": [],
            "state": {},
            "stage": 0,
            "predictions": [],
        }
        if st.current is not None and st.current["method"] == mname:
            with torch.no_grad():
                sd = self.model.state_dict()
                for k, v in st.current["delta"].items():
                    sd[k].copy_(v)
            mrun = {k: st.current[k] for k in mrun}
        st.current = None
        for t in range(mrun["stage"] + 1, T + 1):
            self._run_stage(method, mname, t, mrun)
            mrun["stage"] = t
            # weights that differ from the base are the whole model state a resume needs (exact copies)
            delta = {
                k: v.detach().clone() for k, v in self.model.state_dict().items() if not torch.equal(v, self.base[k])
            }
            payload = {"method": mname, "delta": delta, **mrun}
            if t == T:
                res = dict(R=mrun["R"], **continual_metrics(mrun["R"]))
                held = _broadcast(self._heldout() if self.rank == 0 else None)
                res.update(held, init_reports=mrun["reports"], train_losses=mrun["losses"])
                st.finished[mname] = res
                st.predictions[mname] = mrun["predictions"]
                payload = None
            if self._save(payload):
                return True
        return False

    def _run_stage(self, method, mname: str, t: int, mrun: dict) -> None:
        """Stage t of one method: init, train, merge, evaluate the tasks seen so far; updates ``mrun`` (R row,
        report, losses, predictions) and the replay buffers."""
        cfg, st, tok = self.cfg, self.state, self.tok
        names = [x.name for x in self.tasks]
        task = self.tasks[t - 1]
        ctx = stage_context(
            self.model,
            tok,
            task,
            t,
            cfg,
            self.lora,
            mrun["state"],
            {n: st.replay[n] for n in names[: t - 1]},
            mname=mname,
            world=self.world,
            rank=self.rank,
            progress=self.progress,
        )
        ts = time.perf_counter()
        self.model, rep, ls = train_stage(
            method, ctx, tok, task, cfg, world=self.world, rank=self.rank, progress=self.progress, desc=mname
        )
        row = None
        if self.rank == 0:
            evals = [
                evaluate_task(
                    self.model,
                    tok,
                    self.tasks[j],
                    max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.eval_batch_size,
                    max_len=cfg.max_len,
                    progress=self.progress,
                    fmt=cfg.prompt_format,
                )
                for j in range(t)
            ]
            row = [e[0] for e in evals]
            mrun["predictions"].append({self.tasks[j].name: evals[j][1] for j in range(t)})
        row = _broadcast(row)
        mrun["R"][t - 1][:t] = row
        seconds = time.perf_counter() - ts
        # timings vary run to run: they go to timings.json, so results.json of a resumed run is identical
        st.timings.append(
            {"method": mname, "stage": t, "seconds": seconds, "init_phases": rep.pop("phases_seconds", {})}
        )
        rep = dict(rep, stage=t, task=task.name)
        mrun["reports"].append(rep)
        mrun["losses"].append(ls)
        if task.name not in st.replay:
            st.replay[task.name] = replay_buffer(task, cfg)
        self.log(
            f"[runner] {mname} stage {t}/{len(self.tasks)} ({task.name}): loss {ls[0]:.3f} -> {ls[-1]:.3f}, "
            f"R row {[round(x, 3) for x in row]}, gamma {rep.get('gamma')}, cos {rep.get('cos')}, "
            f"{seconds:.1f}s"
        )


def _method_options(cfg: RunConfig) -> dict:
    """The options the methods receive: SLICE's own run options and every --method-option."""
    return {
        "svd": cfg.svd,
        "conflict_threshold": cfg.conflict_threshold,
        "projection_strength": cfg.projection_strength,
        **cfg.method_options,
    }
