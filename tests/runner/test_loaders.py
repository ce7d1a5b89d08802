"""The SLICE paper's benchmarks from local files: ``superni:`` (Super-NaturalInstructions task files) and ``trace:``
(TRACE dataset folders/files) task specs: prompt form, metric choice, max-over-outputs scoring, the seeded split,
every bad-input error (file and line named), the fingerprint of the files read, and a tiny end-to-end run."""

import json
import os
import pathlib
import types

import pytest

from slice_kernels.runner import make_config, run
from slice_kernels.runner.cli import main as cli_main
from slice_kernels.runner.errors import TaskError
from slice_kernels.runner.fingerprint import input_fingerprint
from slice_kernels.runner.loaders.superni import reference_metric
from slice_kernels.runner.tasks import check_spec, is_path, load_task, task_files, task_name
from tests.helpers.runner_tiny import save_tiny_llama

FIX = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
SST2 = str(FIX / "superni" / "task363_sst2_polarity_classification.json")
TITLES = str(FIX / "superni" / "task619_ohsumed_abstract_title_generation.json")
OTHER = str(FIX / "superni" / "task9999_fixture_repeat.json")
FOMC = str(FIX / "trace" / "FOMC")
MEETING = str(FIX / "trace" / "MeetingBank" / "train.json")


def _superni(tmp_path, instances, name="task363_x.json", **extra):
    doc = {"Definition": ["Say it."], "Positive Examples": [], "Instances": instances, **extra}
    p = tmp_path / name
    p.write_text(json.dumps(doc, indent=4))
    return str(p)


# -- SuperNI ---------------------------------------------------------------------------------------------------------


def test_superni_prompt_is_the_references_definition_then_input():
    t = load_task(f"superni:{SST2}", 0, 3, seed=0)
    definition = "Given a sentence, classify its sentiment as POSITIVE or NEGATIVE."
    for ex in t.train + t.eval:
        assert ex.prompt.startswith(definition + "\n\nInput: it is ")
        assert "Example" not in ex.prompt  # the reference puts no positive example in the prompt
    assert t.name == "task363_sst2_polarity_classification" == task_name(f"superni:{SST2}")
    assert is_path(f"superni:{SST2}")


def test_superni_positive_examples_option():
    t = load_task(f"superni:{SST2}?pos=2&metric=exact", 0, 3, seed=0)
    ex = t.eval[0]
    head = (
        "Given a sentence, classify its sentiment as POSITIVE or NEGATIVE.\n\n"
        "Example 1:\nInput: a fine film.\nOutput: POSITIVE\n\nExample 2:\nInput: a dreary film.\nOutput: NEGATIVE"
        "\n\nInput: it is "
    )
    assert ex.prompt.startswith(head)
    with pytest.raises(TaskError, match=r"pos=3 but .*task363_sst2_polarity_classification.json has 2"):
        check_spec(f"superni:{SST2}?pos=3")


def test_superni_bad_positive_example_is_named(tmp_path):
    p = _superni(tmp_path, [{"input": "a", "output": ["x"]}] * 2)
    doc = json.load(open(p))
    doc["Positive Examples"] = [{"input": "a", "output": "x"}, {"input": "b"}]
    pathlib.Path(p).write_text(json.dumps(doc, indent=4))
    with pytest.raises(TaskError, match=r"task363_x.json, positive example 1 \(line 10\): expected an object"):
        check_spec(f"superni:{p}?pos=2")
    check_spec(f"superni:{p}?pos=1")  # only the examples put in the prompt are checked


def test_superni_metric_follows_the_reference_table():
    assert reference_metric("task363_sst2_polarity_classification") == "exact"  # classification
    assert reference_metric("task1290_xsum_summarization") == "rouge_l"  # generation
    assert reference_metric("task002_quoref_answer_generation") == "rouge_l"  # leading zeros
    assert reference_metric("task448_opus_paracrawl_en_tl_translation") == "rouge_l"  # the reference's "NI488"
    assert reference_metric("task9999_fixture_repeat") is None
    assert {e.metric for e in load_task(f"superni:{SST2}", 0, 3, 0).eval} == {"exact"}
    t = load_task(f"superni:{TITLES}", 0, 3, 0)
    assert {e.metric for e in t.train + t.eval} == {"rouge_l"} and "rouge_l" in t.scorer_name
    # an override wins over the table
    assert {e.metric for e in load_task(f"superni:{SST2}?metric=rouge_l", 0, 3, 0).eval} == {"rouge_l"}


def test_superni_task_outside_the_table_needs_a_metric():
    with pytest.raises(TaskError, match=r"task9999_fixture_repeat is not one of .*\?metric=exact"):
        check_spec(f"superni:{OTHER}")
    check_spec(f"superni:{OTHER}?metric=exact")


def test_superni_scores_the_best_of_all_outputs():
    t = load_task(f"superni:{TITLES}", 0, 1, seed=0)
    ex = t.eval[0]
    first, second = ex.entry["outputs"]
    assert ex.answer == first  # trained on the first output, as the reference does
    assert t.score(second, ex) == 1.0  # the second accepted answer scores fully
    assert t.score(first, ex) == 1.0
    partial = second.split()[0]
    expected = max(
        2 * (1 / 1) * (1 / len(r.split())) / (1 + 1 / len(r.split())) if partial in r.split() else 0.0
        for r in (first, second)
    )
    assert t.score(partial, ex) == pytest.approx(expected) and 0 < expected < 1


def test_superni_exact_match_accepts_any_output(tmp_path):
    p = _superni(tmp_path, [{"input": f"q{i}", "output": ["yes", "y"]} for i in range(4)])
    t = load_task(f"superni:{p}", 0, 1, seed=0)
    assert t.score("Y", t.eval[0]) == 1.0 and t.score("yes", t.eval[0]) == 1.0 and t.score("no", t.eval[0]) == 0.0


def test_superni_split_is_seeded_disjoint_and_option_independent():
    a = load_task(f"superni:{SST2}", 0, 3, seed=1)
    b = load_task(f"superni:{SST2}", 0, 3, seed=1)
    c = load_task(f"superni:{SST2}", 0, 3, seed=2)
    assert [e.prompt for e in a.eval] == [e.prompt for e in b.eval]
    assert [e.prompt for e in a.train] == [e.prompt for e in b.train]
    assert [e.prompt for e in a.eval] != [e.prompt for e in c.eval]
    assert len(a.eval) == 3 and len(a.train) == 13 and not {e.prompt for e in a.eval} & {e.prompt for e in a.train}
    # the metric option does not move instances between the splits
    d = load_task(f"superni:{SST2}?metric=rouge_l", 0, 3, seed=1)
    assert [e.prompt for e in d.eval] == [e.prompt for e in a.eval]
    assert len(load_task(f"superni:{SST2}", 5, 3, seed=1).train) == 5


def test_superni_duplicate_instance_does_not_leak_into_training(tmp_path):
    p = _superni(tmp_path, [{"input": "same", "output": ["a"]}] * 5 + [{"input": "other", "output": ["b"]}])
    t = load_task(f"superni:{p}", 0, 1, seed=0)
    assert not {e.prompt for e in t.eval} & {e.prompt for e in t.train}


@pytest.mark.parametrize(
    "instances, message",
    [
        ([{"input": "a", "output": ["x"]}, {"input": "b", "output": []}], "instance 1 (line 13): 'output' is missing"),
        ([{"input": "a", "output": ["x"]}, {"output": ["y"]}], "instance 1 (line 13): 'input' is missing"),
        ([{"input": "a", "output": ["x"]}, {"input": "b", "output": "y"}], "instance 1 (line 13): 'output' is missing"),
        ([{"input": "a", "output": ["x"]}, {"input": "b", "output": ["y", 3]}], "instance 1 (line 13): 'output' holds"),
        ([{"input": "a", "output": ["x"]}, "text"], "instance 1 (line 13): expected an object"),
        ([{"input": "a", "output": ["x"]}], "needs at least 2 instances"),
    ],
)
def test_superni_bad_instance_names_file_index_and_line(tmp_path, instances, message):
    p = _superni(tmp_path, instances)
    with pytest.raises(TaskError) as e:
        check_spec(f"superni:{p}")
    assert p in str(e.value) and message in str(e.value)
    line = message.split("(line ")[1].split(")")[0] if "(line" in message else None
    if line:  # the line named is where that instance starts in the file
        assert p.endswith(".json") and open(p).read().splitlines()[int(line) - 1].strip().startswith(("{", '"'))


def test_superni_bad_files(tmp_path):
    with pytest.raises(TaskError, match="SuperNI task file .*nope.json' does not exist"):
        check_spec(f"superni:{tmp_path}/task363_nope.json")
    bad = tmp_path / "task363_bad.json"
    bad.write_text('{\n  "Definition": ["x"],\n  "Instances": [\n    {"input": "a", "output": ["b"]},,\n  ]\n}')
    with pytest.raises(TaskError, match=r"task363_bad.json, line 4, column \d+: not valid JSON"):
        check_spec(f"superni:{bad}")
    latin = tmp_path / "task363_latin.json"
    latin.write_bytes(b'{"Definition": ["caf\xe9"],\n "Instances": []}')
    with pytest.raises(TaskError, match=r"task363_latin.json, line 1: not UTF-8"):
        check_spec(f"superni:{latin}")
    arr = tmp_path / "task363_arr.json"
    arr.write_text("[]")
    with pytest.raises(TaskError, match="expected a JSON object with 'Definition' and 'Instances'"):
        check_spec(f"superni:{arr}")
    p = _superni(tmp_path, [{"input": "a", "output": ["x"]}] * 2, name="task363_def.json", Definition="Say it.")
    with pytest.raises(TaskError, match="'Definition' is missing or not a non-empty list of strings"):
        check_spec(f"superni:{p}")
    with pytest.raises(TaskError, match="unknown option 'shots'"):
        check_spec(f"superni:{SST2}?shots=2")
    with pytest.raises(TaskError, match="pos='two' must be a non-negative integer"):
        check_spec(f"superni:{SST2}?pos=two")
    with pytest.raises(TaskError, match="no path after superni:"):
        check_spec("superni:")


# -- TRACE -----------------------------------------------------------------------------------------------------------


def test_trace_folder_trains_on_train_and_evaluates_on_test():
    t = load_task(f"trace:{FOMC}", 0, 10, seed=0)
    test = json.load(open(os.path.join(FOMC, "test.json")))
    train = json.load(open(os.path.join(FOMC, "train.json")))
    assert t.name == "FOMC" == task_name(f"trace:{FOMC}")
    assert sorted(e.prompt for e in t.eval) == sorted(f"TRACE task: FOMC\n\n{r['prompt']}" for r in test)
    assert sorted(e.answer for e in t.train) == sorted(r["answer"] for r in train)
    assert task_files(f"trace:{FOMC}") == [os.path.join(FOMC, "train.json"), os.path.join(FOMC, "test.json")]
    assert len(load_task(f"trace:{FOMC}", 3, 2, seed=0).eval) == 2


def test_trace_file_is_split_like_jsonl_and_named_after_its_folder():
    a = load_task(f"trace:{MEETING}", 0, 2, seed=4)
    b = load_task(f"trace:{MEETING}", 0, 2, seed=4)
    assert a.name == "MeetingBank"
    assert len(a.eval) == 1 and len(a.train) == 4  # at most a fifth held out, as for JSONL tasks
    assert [e.prompt for e in a.eval + a.train] == [e.prompt for e in b.eval + b.train]
    seeds = {tuple(e.prompt for e in load_task(f"trace:{MEETING}", 0, 2, seed=s).eval) for s in range(6)}
    assert len(seeds) > 1


def test_trace_metric_default_reference_and_trace_official():
    t = load_task(f"trace:{FOMC}", 0, 3, seed=0)
    assert {e.metric for e in t.eval} == {"rouge_l"} and t.scorer_name == "trace.rouge_l"  # the reference's
    assert {e.metric for e in load_task(f"trace:{FOMC}?metric=trace", 0, 3, 0).eval} == {"exact"}  # accuracy
    assert {e.metric for e in load_task(f"trace:{MEETING}?metric=trace", 0, 3, 0).eval} == {"rouge_l"}
    assert {e.metric for e in load_task(f"trace:{MEETING}?metric=exact", 0, 3, 0).eval} == {"exact"}


@pytest.mark.parametrize(
    "dataset, named",
    [("Py150", "edit similarity"), ("ScienceQA", "answer letter"), ("20Minuten", "SARI")],
)
def test_trace_unimplemented_official_metrics_are_refused_by_name(tmp_path, dataset, named):
    d = tmp_path / dataset
    d.mkdir()
    for f in ("train.json", "test.json"):
        (d / f).write_text(json.dumps([{"prompt": "p", "answer": "a"}]))
    with pytest.raises(TaskError, match=f"TRACE scores {dataset} by .*{named}.*metric=rouge_l"):
        check_spec(f"trace:{d}?metric=trace")
    check_spec(f"trace:{d}")  # the reference's ROUGE-L needs no such metric


def test_trace_official_metric_of_an_unknown_dataset(tmp_path):
    d = tmp_path / "MyData"
    d.mkdir()
    for f in ("train.json", "test.json"):
        (d / f).write_text(json.dumps([{"prompt": "p", "answer": "a"}]))
    with pytest.raises(TaskError, match="'MyData' is none of C-STANCE"):
        check_spec(f"trace:{d}?metric=trace")


def _trace_file(tmp_path, rows, name="train.json"):
    d = tmp_path / "FOMC"
    d.mkdir(exist_ok=True)
    (d / name).write_text(json.dumps(rows, indent=4))
    return str(d / name)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a", "answer": "b"}, {"prompt": "c"}], "record 1 (line 6): field 'answer' is missing"),
        ([{"prompt": "a", "answer": "b"}, {"prompt": 3, "answer": "d"}], "record 1 (line 6): field 'prompt'"),
        ([{"prompt": "a", "answer": "b"}, ["c", "d"]], "record 1 (line 6): expected an object"),
        ([{"prompt": "a", "answer": "b"}], "needs at least 2 records"),
    ],
)
def test_trace_bad_record_names_file_index_and_line(tmp_path, rows, message):
    p = _trace_file(tmp_path, rows)
    with pytest.raises(TaskError) as e:
        check_spec(f"trace:{p}")
    assert p in str(e.value) and message in str(e.value)


def test_trace_bad_files(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        check_spec(f"trace:{tmp_path}/missing")
    d = tmp_path / "FOMC"
    d.mkdir()
    (d / "train.json").write_text("[]")
    with pytest.raises(TaskError, match=r"needs train.json and test.json \(or eval.json\); it holds \['train.json'\]"):
        check_spec(f"trace:{d}")
    (d / "test.json").write_text('[\n  {"prompt": "a", "answer": "b"}\n  {"prompt": "c"}\n]')
    with pytest.raises(TaskError, match=r"test.json, line 3, column 3: not valid JSON"):
        check_spec(f"trace:{d}")
    (d / "test.json").write_text('{"prompt": "a", "answer": "b"}')
    with pytest.raises(TaskError, match="test.json: expected a JSON array"):
        check_spec(f"trace:{d}")
    (d / "test.json").write_text('[{"prompt": "a", "answer": "b"}]')
    with pytest.raises(TaskError, match="train.json: holds no records"):
        check_spec(f"trace:{d}")
    with pytest.raises(TaskError, match="metric='bleu' must be one of rouge_l, exact, trace"):
        check_spec(f"trace:{FOMC}?metric=bleu")


def test_eval_file_used_when_there_is_no_test_file(tmp_path):
    d = tmp_path / "FOMC"
    d.mkdir()
    (d / "train.json").write_text(json.dumps([{"prompt": f"p{i}", "answer": "a"} for i in range(3)]))
    (d / "eval.json").write_text(json.dumps([{"prompt": "q", "answer": "b"}]))
    t = load_task(f"trace:{d}", 0, 5, 0)
    assert [e.answer for e in t.eval] == ["b"] and len(t.train) == 3


def test_a_file_edited_after_check_is_read_again(tmp_path):
    p = _superni(tmp_path, [{"input": f"q{i}", "output": ["a"]} for i in range(3)])
    check_spec(f"superni:{p}")
    os.utime(p, ns=(1, 1))  # a different mtime: the parse cache must not answer with the old content
    pathlib.Path(p).write_text(json.dumps({"Definition": ["x"], "Instances": [{"input": "q", "output": []}] * 2}))
    with pytest.raises(TaskError, match="instance 0"):
        check_spec(f"superni:{p}")


# -- the runner around them ------------------------------------------------------------------------------------------


def test_fingerprint_hashes_the_files_read(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d"}\n')
    model = tmp_path / "m"
    model.mkdir()
    (model / "w.bin").write_bytes(b"x")
    cfg = types.SimpleNamespace(
        tasks=[f"superni:{SST2}?pos=1", f"trace:{FOMC}"], heldout=[str(jsonl)], device="cpu", model=str(model)
    )
    fp = input_fingerprint(cfg)
    assert sorted(fp["task_files"]) == sorted(
        [SST2, os.path.join(FOMC, "train.json"), os.path.join(FOMC, "test.json"), str(jsonl)]
    )
    assert "reasoning_gym" not in fp["versions"]  # no task is generated by reasoning-gym


def test_cli_tasks_lists_the_file_forms(capsys):
    pytest.importorskip("reasoning_gym")
    assert cli_main(["tasks"]) == 0
    cap = capsys.readouterr()
    assert "superni:" in cap.err and "trace:" in cap.err and "superni:" not in cap.out


def test_run_refuses_a_bad_superni_file_before_loading_the_model(tmp_path):
    p = _superni(tmp_path, [{"input": "a", "output": ["x"]}, {"input": "b"}])
    cfg = make_config("default", model=str(tmp_path / "no_model"), tasks=[f"superni:{p}"], heldout=[], methods=["lora"])
    with pytest.raises(TaskError, match=r"instance 1 \(line 13\): 'output'"):
        run(cfg, str(tmp_path / "out"), progress=False, log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_tiny_run_on_superni_and_trace(tmp_path):
    model = save_tiny_llama(str(tmp_path / "tiny"))
    cfg = make_config(
        "default",
        model=model,
        tasks=[f"superni:{SST2}", f"trace:{FOMC}?metric=trace"],
        heldout=[f"superni:{TITLES}"],
        methods=["lora"],
        rank=2,
        steps=1,
        n_train=8,
        n_eval=2,
        n_heldout=1,
        ip_shots=1,
        max_new_tokens=3,
        grad_batches=1,
        replay_batches=1,
        grad_batch_size=2,
        batch_size=2,
        max_len=160,
        targets=["q_proj", "v_proj"],
        seed=0,
    )
    out = str(tmp_path / "out")
    res = run(cfg, out, progress=False, log=lambda *a: None)
    assert res["tasks"][:2] == ["task363_sst2_polarity_classification", "FOMC"]
    assert res["scorers"]["task363_sst2_polarity_classification"] == "superni.exact.max_over_outputs"
    assert res["scorers"]["FOMC"] == "trace.exact"
    R = res["methods"]["lora"]["R"]
    assert all(0.0 <= R[i][j] <= 1.0 for i in range(2) for j in range(i + 1))
    saved = json.load(open(os.path.join(out, "checkpoints", "run.json")))
    assert sorted(saved["task_files"]) == sorted(  # a resume with an edited task file is refused
        [SST2, TITLES, os.path.join(FOMC, "train.json"), os.path.join(FOMC, "test.json")]
    )
    preds = json.load(open(os.path.join(out, "predictions.json")))["lora"][1]
    assert sorted(preds) == ["FOMC", "task363_sst2_polarity_classification"]


def test_resume_after_a_superni_file_changed_is_refused(tmp_path):
    from slice_kernels.runner.checkpoint import ResumeError

    model = save_tiny_llama(str(tmp_path / "tiny"))
    task = tmp_path / "task363_sst2_polarity_classification.json"
    task.write_text(pathlib.Path(SST2).read_text())
    kw = dict(model=model, tasks=[f"superni:{task}", f"trace:{FOMC}"], heldout=[], methods=["lora"], rank=2)
    kw.update(steps=1, n_train=4, n_eval=1, max_new_tokens=2, grad_batches=1, replay_batches=1, grad_batch_size=2)
    kw.update(batch_size=2, max_len=128, targets=["q_proj"], seed=0)
    out = str(tmp_path / "out")
    run(make_config("default", **kw), out, progress=False, log=lambda *a: None, stop_after=1)
    doc = json.loads(task.read_text())
    doc["Instances"][0]["output"] = ["NEUTRAL"]
    task.write_text(json.dumps(doc))
    with pytest.raises(ResumeError, match=f"content of task file {task}"):
        run(make_config("default", **kw), out, resume=True, progress=False, log=lambda *a: None)
