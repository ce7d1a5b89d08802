"""Bad input to the runner: each a clear error naming the thing at fault, raised before anything is written."""

import json
import sys

import pytest

from slice_kernels.runner.cli import main
from slice_kernels.runner.model import ModelError, check_model_dir
from slice_kernels.runner.tasks import TaskError, check_spec, expand_task_list, load_task
from tests.helpers.runner_tiny import save_not_causal, save_tiny_llama, write_jsonl


@pytest.mark.reasoning_gym
def test_unknown_task_name_cli(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--model", "smollm2", "--tasks", "basic_arithmetc,chain_sum", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown task 'basic_arithmetc'" in err and "did you mean basic_arithmetic" in err
    assert not out.exists()  # validated before the output directory is created


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": "4"}\n{"prompt": "oops"\n')
    with pytest.raises(TaskError, match=r"t\.jsonl, line 3: not valid JSON"):
        check_spec(str(p))
    p.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": 4}\n')
    with pytest.raises(TaskError, match=r"t\.jsonl, line 2: field 'answer' is missing or not a string"):
        check_spec(str(p))
    p.write_text('{"prompt": "1+1", "answer": "2", "metric": "bleu"}\n{"prompt": "2+2", "answer": "4"}\n')
    with pytest.raises(TaskError, match=r"line 1: metric 'bleu'"):
        check_spec(str(p))


def test_malformed_jsonl_cli_exit_code(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "answer": "b"}\nnot json\n')
    rc = main(["run", "--tasks", str(p), "--heldout", "", "--out", str(tmp_path / "o")])
    assert rc == 2 and "bad.jsonl, line 2" in capsys.readouterr().err


def test_jsonl_task_metrics(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": f"the answer {i}", "metric": "rouge_l"} for i in range(10)]
    t = load_task(write_jsonl(str(tmp_path / "free.jsonl"), rows), n_train=8, n_eval=2, seed=0)
    assert len(t.eval) == 2 and len(t.train) == 8 and t.name == "free"
    ex = t.eval[0]
    assert t.score(ex.answer, ex) == 1.0
    assert t.score("the answer", ex) == pytest.approx(0.8)  # LCS 2 of 2 / 3 tokens: P=1, R=2/3
    assert t.score("nothing", ex) == 0.0


def test_model_dir_not_a_causal_lm(tmp_path):
    d = save_not_causal(str(tmp_path / "bert"))
    with pytest.raises(ModelError, match="not a causal language model"):
        check_model_dir(d)
    with pytest.raises(ModelError, match="no config.json"):
        check_model_dir(str(tmp_path))
    with pytest.raises(ModelError, match="is not a directory"):
        check_model_dir(str(tmp_path / "missing"))


@pytest.mark.reasoning_gym
def test_model_not_causal_cli(tmp_path, capsys):
    d = save_not_causal(str(tmp_path / "bert"))
    rc = main(["run", "--model", d, "--tasks", "chain_sum", "--out", str(tmp_path / "o")])
    assert rc == 2 and "not a causal language model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.reasoning_gym
def test_resume_without_a_run(tmp_path, capsys):
    rc = main(["run", "--tasks", "chain_sum", "--resume", "--out", str(tmp_path)])
    assert rc == 2 and "holds no run to resume" in capsys.readouterr().err
    rc = main(["run", "--tasks", "chain_sum", "--resume", "--out", str(tmp_path / "typo")])
    assert rc == 2 and not (tmp_path / "typo").exists()  # a mistyped --out is not created


def test_tasks_from_mined_json(tmp_path):
    p = tmp_path / "mined.json"
    p.write_text(json.dumps({"sequence": ["chain_sum", "basic_arithmetic"], "cosines": [[1, 0], [0, 1]]}))
    assert expand_task_list(f"@{p}") == ["chain_sum", "basic_arithmetic"]
    assert expand_task_list(" a , b ") == ["a", "b"]
    with pytest.raises(TaskError, match="twice"):
        expand_task_list("a,a")
    with pytest.raises(TaskError, match="cannot read"):
        expand_task_list(f"@{tmp_path / 'nope.json'}")


@pytest.mark.reasoning_gym
def test_unknown_method(capsys, tmp_path):
    rc = main(["run", "--tasks", "chain_sum", "--methods", "slice,nope", "--out", str(tmp_path / "o")])
    assert rc == 2 and "unknown method 'nope'" in capsys.readouterr().err


@pytest.mark.reasoning_gym
def test_reasoning_gym_options_in_the_spec():
    t = load_task("chain_sum?min_terms=2&max_terms=2&max_digits=1", n_train=4, n_eval=2, seed=0)
    assert len(t.train) == 4 and len(t.eval) == 2
    assert all(ex.entry["metadata"]["num_terms"] == 2 and ex.entry["metadata"]["num_digits"] == 1 for ex in t.train)
    ex = t.eval[0]
    assert t.score(ex.answer, ex) == 1.0 and t.score("not a number", ex) == 0.0
    with pytest.raises(TaskError, match=r"unknown option\(s\) \['max_term'\] for chain_sum"):
        check_spec("chain_sum?max_term=2")
    with pytest.raises(TaskError, match="must look like key=value"):
        check_spec("chain_sum?max_terms")


def test_two_jsonl_files_with_the_same_name(tmp_path):
    from slice_kernels.runner import make_config
    from slice_kernels.runner.run import validate

    rows = [{"prompt": "p", "answer": "a"}] * 3
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    f1, f2 = write_jsonl(str(tmp_path / "a" / "x.jsonl"), rows), write_jsonl(str(tmp_path / "b" / "x.jsonl"), rows)
    with pytest.raises(ValueError, match=r"\['x'\] appear twice"):
        validate(make_config("default", tasks=[f1, f2], heldout=[]))


def test_unknown_method_option_cli(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--model", "smollm2", "--method-option", "ps_lamda=0.5", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown method option(s) ['ps_lamda']" in err and "ps_lambda" in err
    assert not out.exists()


@pytest.mark.reasoning_gym
def test_training_set_smaller_than_a_batch_is_refused_not_a_hang(tmp_path):
    """A task with fewer training examples than one batch used to make the training stream loop forever
    (DistributedSampler with drop_last yields no full batch); the check counts the built task's training set,
    so what the evaluation split and the removal of duplicated questions take away is accounted for."""
    from slice_kernels.runner import make_config
    from slice_kernels.runner.run import check_task_sizes

    def check(spec, **kw):
        cfg = make_config("default", tasks=[spec], heldout=[], **kw)
        check_task_sizes([load_task(spec, cfg.n_train, cfg.n_eval, cfg.seed)], cfg)

    small = write_jsonl(str(tmp_path / "small.jsonl"), [{"prompt": f"q{i}", "answer": str(i)} for i in range(6)])
    with pytest.raises(TaskError, match=r"task 'small' has 5 training example\(s\) once its 1 evaluation"):
        check(small, batch_size=8)
    with pytest.raises(TaskError, match=r"task 'chain_sum' has 4 training example\(s\)"):
        check("chain_sum", n_train=4, batch_size=8)
    check(small, batch_size=5)  # exactly one batch: fine
    # the audit's hang: every line asks the same question, so once the evaluation lines are set apart their
    # duplicates leave nothing to train on (the old count, lines minus evaluation lines, said 8)
    same = write_jsonl(str(tmp_path / "same.jsonl"), [{"prompt": "2+2=", "answer": "4"}] * 10)
    with pytest.raises(TaskError, match=r"task 'same' has 0 training example\(s\) .*and their duplicates"):
        check(same, batch_size=2)


def test_make_batches_refuses_an_empty_pool_instead_of_looping():
    from slice_kernels.runner.data import make_batches
    from tests.helpers.runner_tiny import char_tokenizer

    with pytest.raises(ValueError, match="no examples"):
        make_batches(char_tokenizer(), [], 1, 2, 16, 0)


def test_a_non_utf8_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "caf\xe9", "answer": "c"}\n')
    with pytest.raises(TaskError, match=r"latin1\.jsonl, line 2: not UTF-8 \(byte 0xe9 at column 16\)"):
        check_spec(str(f))


def _jsonl_task(tmp_path) -> str:
    return write_jsonl(str(tmp_path / "t.jsonl"), [{"prompt": f"{i}+1", "answer": str(i + 1)} for i in range(12)])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", ","], "no methods: pass --methods"),
        (["--alpha", "0"], "alpha=0.0 must be a finite number > 0"),
        (["--lr=-1e-3"], "lr=-0.001 must be a finite number > 0"),
        (
            ["--methods", "ps_lora", "--method-option", "ps_lambda=abc"],
            "method option ps_lambda='abc': must be a number",
        ),
        (["--methods", "ps_lora", "--method-option", "ps_mode=cube"], "ps_mode='cube': must be one of 'tanh', 'hinge'"),
        (["--methods", "gorp", "--method-option", "gorp_rank=2.7"], "gorp_rank=2.7: must be a positive integer"),
        (["--methods", "gorp", "--method-option", "gorp_scale=NaN"], "gorp_scale=nan: must be finite"),
        (["--methods", "gorp", "--method-option", "gorp_energy=1.5"], "gorp_energy=1.5: must be ≤ 1"),
        (["--methods", "gorp", "--method-option", "gorp_full_rank=[]"], "gorp_full_rank=[]: must be a module name"),
        (["--methods", "lora", "--method-option", "ps_lambda=0.5"], "ps_lambda is read by ps_lora, slice+ps"),
    ],
)
def test_bad_run_and_method_options_are_refused_before_the_model_loads(args, message, tmp_path, capsys, monkeypatch):
    """Each used to pass (--methods , wrote results and crashed in matplotlib; --alpha 0 trained nothing) or to
    fail only when its method's stage came, after the earlier methods had checkpointed."""
    import importlib

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(importlib.import_module("slice_kernels.runner.run"), "load_model", no_load)
    out = tmp_path / "run"
    rc = main(["run", "--tasks", _jsonl_task(tmp_path), "--heldout", "", "--batch-size", "2", "--out", str(out)] + args)
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "methods, options, message",
    [
        (["lora", "slice"], {}, r"method 'slice': layer .* needs 2r = 80 ≤ min\(m, n\) = 64"),
        (["lora", "gorp"], {"gorp_rank": 500}, r"method 'gorp': gorp: gorp_rank=500 exceeds min\(m, n\) = 64"),
        (["lora", "gorp"], {"gorp_full_rank": "nope"}, r"no linear layer of the model matches .*\['nope'\]"),
    ],
)
def test_what_only_the_model_can_tell_is_checked_for_every_method_before_the_first_stage(
    methods, options, message, tmp_path
):
    """A rank too large for a later method's init used to fail at that method's first stage, after the earlier
    methods had checkpointed, and the directory then refused the corrected command."""
    from slice_kernels.runner import make_config, run

    model = save_tiny_llama(str(tmp_path / "tiny"))
    cfg = dict(model=model, tasks=[_jsonl_task(tmp_path)], heldout=[], methods=methods, rank=40, steps=1)
    cfg.update(n_train=8, n_eval=2, batch_size=4, grad_batch_size=4, grad_batches=1, replay_batches=1, max_len=16)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run(make_config("default", method_options=options, **cfg), str(out), progress=False, log=lambda *a: None)
    assert not out.exists()  # no stage ran, nothing was kept


@pytest.mark.reasoning_gym
def test_train_stream_raises_instead_of_looping_forever(tmp_path):
    import signal

    from slice_kernels.runner import make_config
    from slice_kernels.runner.run import _train_stream
    from tests.helpers.runner_tiny import char_tokenizer

    task = load_task("chain_sum", n_train=3, n_eval=1, seed=0)
    cfg = make_config("default", tasks=["chain_sum"], heldout=[], batch_size=4, max_len=48)
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("the stream never yielded")))
    signal.alarm(30)
    try:
        with pytest.raises(ValueError, match="fewer than one batch"):
            next(_train_stream(char_tokenizer(), task, cfg, 1, 1, 0))
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("key", ["seed", "method", "current_steps", "replay_steps"])
def test_method_options_the_runner_sets_are_refused_up_front(key, tmp_path, capsys):
    """These SliceConfig fields used to pass the check and then crash the first init with a TypeError
    (duplicate keyword), after the run directory was written."""
    out = tmp_path / "run"
    rc = main(["run", "--model", "smollm2", "--method-option", f"{key}=1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"['{key}'] are set by the runner" in err
    assert not out.exists()


@pytest.mark.reasoning_gym
def test_bad_init_option_values_are_named_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--model", "smollm2", "--method-option", "scale=bogus", "--out", str(out)])
    assert rc == 2 and "SliceConfig.scale='bogus'" in capsys.readouterr().err and not out.exists()
    rc = main(["run", "--model", "smollm2", "--tau", "2", "--out", str(out)])
    assert rc == 2 and "conflict_threshold=2.0" in capsys.readouterr().err and not out.exists()


@pytest.mark.reasoning_gym
def test_bad_reasoning_gym_option_value_is_a_task_error_before_anything_is_written(tmp_path, capsys):
    """The option name is valid, its value is not: reasoning-gym raises TypeError/AssertionError. That used to
    surface as a traceback after run.json was written (so the corrected rerun was refused in that --out)."""
    with pytest.raises(TaskError, match=r"task 'chain_sum\?min_terms=5&max_terms=2': reasoning-gym cannot build"):
        load_task("chain_sum?min_terms=5&max_terms=2", 4, 2, 0)
    out = tmp_path / "run"
    rc = main(["run", "--model", "smollm2", "--tasks", "chain_sum?max_terms=abc", "--heldout", "", "--out", str(out)])
    assert rc == 2 and "reasoning-gym cannot build chain_sum" in capsys.readouterr().err
    assert not (out / "checkpoints" / "run.json").exists()


def test_missing_reasoning_gym_is_a_task_error_that_says_how_to_get_it(monkeypatch, tmp_path):
    """Where reasoning-gym is absent (the GPU image), a built-in task name gives the install line, not a
    bare ModuleNotFoundError; JSONL tasks still work without it."""
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "reasoning_gym.factory", None)
    with pytest.raises(TaskError, match="pip install reasoning-gym"):
        check_spec("chain_sum")
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    check_spec(str(f))


def test_bad_or_missing_device_is_refused_before_anything_is_written(monkeypatch, tmp_path, capsys):
    """A device torch cannot use used to surface as a traceback when the model was moved, after run.json was
    written, so the corrected rerun in the same --out was refused (e.g. --profile paper, cuda, on a CPU box)."""
    import torch

    task = write_jsonl(str(tmp_path / "t.jsonl"), [{"prompt": f"q{i}", "answer": str(i)} for i in range(12)])
    out = tmp_path / "run"
    base = ["run", "--tasks", task, "--heldout", "", "--batch-size", "2", "--out", str(out)]
    assert main(base + ["--device", "tpu"]) == 2
    assert "device='tpu' is not a torch device" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(base + ["--device", "cuda"]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err and not out.exists()
    assert main(base[:1] + ["--profile", "paper"] + base[1:]) == 2
    assert "the paper profile defaults to cuda" in capsys.readouterr().err and not out.exists()


def test_a_fresh_run_failing_before_its_first_checkpoint_leaves_the_directory_reusable(tmp_path):
    """Errors that need the model (a target matching no layer, a rank too large for a layer, a bad method option
    value) come after run.json is written; it used to stay, so the corrected rerun in the same --out was refused
    ("already holds a run") and so was --resume ("different configuration")."""
    from slice_kernels.runner import make_config, run

    model = save_tiny_llama(str(tmp_path / "tiny"))
    tasks = [
        write_jsonl(str(tmp_path / f"t{k}.jsonl"), [{"prompt": f"{i}+{k}", "answer": str(i + k)} for i in range(12)])
        for k in (1, 2)
    ]
    cfg = dict(
        model=model,
        tasks=tasks,
        heldout=[],
        methods=["slice"],
        rank=2,
        steps=1,
        n_train=8,
        n_eval=2,
        batch_size=4,
        grad_batch_size=4,
        grad_batches=1,
        replay_batches=1,
        max_len=16,
        max_new_tokens=2,
    )
    quiet = dict(progress=False, log=lambda *a: None)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="matches no module of LlamaForCausalLM; its linear layers are named"):
        run(make_config("default", **dict(cfg, targets=["q_prj"])), str(out), **quiet)
    assert not out.exists()
    out.mkdir()  # an --out the user made beforehand stays, empty
    with pytest.raises(Exception, match="needs 2r = 200"):
        run(make_config("default", **dict(cfg, rank=100)), str(out), **quiet)
    assert out.is_dir() and not any(out.iterdir())
    res = run(make_config("default", **cfg), str(out), **quiet)  # the corrected command, same --out
    assert len(res["methods"]["slice"]["R"]) == 2
    # a run that fails after a stage was checkpointed keeps run.json and the checkpoint: --resume needs them
    from slice_kernels.runner.methods import InitMethod, register

    class FailsAtStage2(InitMethod):
        def init_adapter(self, ctx):
            if ctx.stage == 2:
                raise RuntimeError("stage 2 fails")
            return super().init_adapter(ctx)

    register("fails_at_stage_2", FailsAtStage2, overwrite=True)
    again = tmp_path / "again"
    with pytest.raises(RuntimeError, match="stage 2 fails"):
        run(make_config("default", **dict(cfg, methods=["fails_at_stage_2"])), str(again), **quiet)
    assert sorted(p.name for p in (again / "checkpoints").iterdir()) == [
        "ckpt_0001.safetensors",
        "latest.json",
        "run.json",
    ]


def test_run_help_states_each_option_and_its_profile_default(capsys):
    """--rank, --alpha, --lr, --batch-size, --seed and --svd had no help; the defaults shown are the
    profiles' own values (RunConfig is the default profile, PAPER overrides some of them)."""
    from slice_kernels.runner.profiles import PAPER, PROFILES, RunConfig

    def each(field):  # "8 for default, 64 for paper, ..." in PROFILES' order
        base = getattr(RunConfig(), field)
        fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
        return ", ".join(f"{fmt(over.get(field, base))} for {name}" for name, over in PROFILES.items())

    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help at the terminal width
    d = RunConfig()
    assert f"--rank RANK LoRA rank r; default: the profile's ({d.rank} for default, {PAPER['rank']} for paper," in text
    assert f"--rank RANK LoRA rank r; default: the profile's ({each('rank')})" in text
    assert f"--alpha ALPHA LoRA α, rsLoRA scaling α/√r; default {d.alpha:g}" in text and PAPER["alpha"] == d.alpha
    assert f"--lr LR learning rate; default: the profile's ({d.lr:g} for default, {PAPER['lr']:g} for paper," in text
    assert f"--lr LR learning rate; default: the profile's ({each('lr')})" in text
    assert (
        f"--batch-size BATCH_SIZE training examples per step; default: the profile's ({each('batch_size')})"
    ) in text
    assert f"--svd {{randomized,exact}} SVD of the gradient inits; default {d.svd}" in text and "svd" not in PAPER
    assert f"--seed SEED seed of every random choice; default {d.seed}" in text and "seed" not in PAPER


@pytest.mark.parametrize("method", ["slice", "lora_ga", "loram"])
def test_a_tied_lm_head_target_is_refused_through_the_cli(method, tmp_path, capsys):
    """The runner's inits go through get_slice_model, so its refusal of a target whose weight is shared (a tied
    lm_head) holds in the runner too: the absorbed offset would change the embeddings and the outputs at init."""
    model = save_tiny_llama(str(tmp_path / "tied"), tied=True)
    task = write_jsonl(str(tmp_path / "t.jsonl"), [{"prompt": f"{i}+1", "answer": str(i + 1)} for i in range(12)])
    out = tmp_path / "run"
    rc = main(
        [
            "run",
            "--model",
            model,
            "--tasks",
            task,
            "--heldout",
            "",
            "--methods",
            method,
            "--targets",
            "q_proj,lm_head",
            "--rank",
            "2",
            "--steps",
            "1",
            "--n-train",
            "8",
            "--n-eval",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "'lm_head' shares its weight tensor with ['model.embed_tokens']" in err
    assert not out.exists()  # nothing of the refused run is left behind
