"""Small pieces of the runner pinned against hand-computed values: the SPEC §2 metrics on a 3×3 R, the
answer-only label mask, and the seeded replay buffer."""

import pytest

from slice_kernels.runner.data import encode, replay_sample
from slice_kernels.runner.metrics import continual_metrics
from slice_kernels.runner.tasks import Example
from tests.helpers.runner_tiny import char_tokenizer


def test_metrics_on_a_3x3_matrix_by_hand():
    # R[i][j]: score on task j after stage i (0-based); None above the diagonal
    R = [[0.9, None, None], [0.5, 0.8, None], [0.3, 0.6, 0.7]]
    m = continual_metrics(R)
    assert m["AP"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)  # diagonal
    assert m["FP"] == pytest.approx((0.3 + 0.6 + 0.7) / 3)  # last row
    assert m["Forgetting"] == pytest.approx(0.8 - 1.6 / 3)
    assert m["BWT"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)  # j < T only, over T - 1
    with pytest.raises(ValueError, match="missing score"):
        continual_metrics([[0.9, None], [None, 0.8]])
    with pytest.raises(ValueError, match="square"):
        continual_metrics([[0.9, None]])
    assert continual_metrics([[0.4]]) == {"AP": 0.4, "FP": 0.4, "Forgetting": 0.0, "BWT": 0.0}


def test_answer_only_labels_and_prompt_plus_answer():
    tok = char_tokenizer()
    ex = Example("2+3", "5")
    e = encode(tok, ex, max_len=64)
    prompt_ids = tok("Question: 2+3\nAnswer:", add_special_tokens=True)["input_ids"]
    n = len(prompt_ids)
    assert e["input_ids"][:n] == prompt_ids
    assert e["labels"][:n] == [-100] * n  # no loss on the prompt
    answer = tok(" 5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert e["labels"][n:] == answer and e["input_ids"][n:] == answer  # loss on " 5" and the eos
    full = encode(tok, ex, max_len=64, train_on="prompt+answer")
    assert full["labels"] == full["input_ids"] == e["input_ids"]
    # an over-long prompt is cut from the left; the answer keeps its labels
    long = encode(tok, Example("x" * 200, "42"), max_len=32)
    assert len(long["input_ids"]) == 32
    assert [t for t in long["labels"] if t != -100] == tok(" 42", add_special_tokens=False)["input_ids"] + [2]


def test_replay_buffer_is_a_fixed_seeded_sample():
    data = [Example(f"q{i}", str(i)) for i in range(50)]
    a, b = replay_sample(data, 16, seed=7), replay_sample(data, 16, seed=7)
    assert a == b and len(a) == 16 and len({x.prompt for x in a}) == 16  # no repeats
    assert replay_sample(data, 16, seed=8) != a
    assert replay_sample(data[:5], 16, seed=7) and len(replay_sample(data[:5], 16, seed=7)) == 5


@pytest.mark.reasoning_gym
def test_evaluation_questions_never_occur_in_training():
    # two one-digit terms: only 200 distinct chain_sum questions, so 256 training draws repeat many of them
    from slice_kernels.runner.tasks import load_task

    t = load_task("chain_sum?min_terms=2&max_terms=2&max_digits=1", n_train=256, n_eval=24, seed=0)
    train = {ex.prompt for ex in t.train}
    evals = [ex.prompt for ex in t.eval]
    assert len(t.train) == 256 and len(evals) == 24
    assert not train & set(evals) and len(set(evals)) == len(evals)


@pytest.mark.reasoning_gym
def test_too_small_a_question_space_is_a_clear_error():
    from slice_kernels.runner.tasks import TaskError, load_task

    # 2000 training draws cover all 200 questions of this space: no unseen question is left for evaluation
    with pytest.raises(TaskError, match="evaluation questions that do not occur"):
        load_task("chain_sum?min_terms=2&max_terms=2&max_digits=1", n_train=2000, n_eval=150, seed=0)


def test_jsonl_duplicate_lines_do_not_leak_into_training(tmp_path):
    import json

    from slice_kernels.runner.tasks import load_task

    rows = [{"prompt": f"q{i % 5}", "answer": str(i % 5)} for i in range(40)]  # every prompt 8 times
    p = tmp_path / "dup.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = load_task(str(p), n_train=0, n_eval=4, seed=0)
    assert not {ex.prompt for ex in t.train} & {ex.prompt for ex in t.eval}


def test_summary_shows_where_the_surgery_acted():
    from slice_kernels.runner.report import summary_table

    row = dict(AP=0.5, FP=0.4, Forgetting=0.1, BWT=-0.1, GP=0.2, IP=0.3)
    results = {
        "tasks": ["a", "b", "c"],
        "heldout": [],
        "train_on": "answer",
        "base": {"GP": None, "IP": None},
        "methods": {
            "lora_ga": dict(row, init_reports=[{"stage": 1, "cos": None, "gamma": None}] * 3),
            "slice": dict(
                row,
                init_reports=[
                    {"stage": 1, "task": "a", "cos": None, "gamma": 0.0},
                    {"stage": 2, "task": "b", "cos": -0.25, "gamma": 1.5},
                    {"stage": 3, "task": "c", "cos": 0.4, "gamma": 0.0},
                ],
            ),
        },
    }
    md = summary_table(results)
    assert "| slice | 2 | b | -0.250 | 1.5 | projected |" in md
    assert "| slice | 3 | c | 0.400 | 0 | not applied |" in md
    assert "| lora_ga |" in md and md.count("| lora_ga |") == 1  # its metrics row only: it measures no cosine
    results["methods"] = {"lora_ga": results["methods"]["lora_ga"]}
    assert "Gradient surgery" not in summary_table(results)


def test_named_presets_expand_and_the_default_sequence_is_one():
    from slice_kernels.runner.profiles import RunConfig
    from slice_kernels.runner.tasks import TaskError, expand_task_list, preset_names

    assert {"conflict_easy", "mined_easy", "mined_pool"} <= set(preset_names())
    assert expand_task_list("@conflict_easy") == RunConfig().tasks  # the default run is the documented preset
    assert len(expand_task_list("@mined_easy")) == 3
    assert expand_task_list("@mined_pool") == ["fraction_simplification", "gcd", "survo"]  # mined from the whole pool
    with pytest.raises(TaskError, match=r"no preset of that name; presets: conflict_easy, mined_easy, mined_pool"):
        expand_task_list("@no_such_preset")


@pytest.mark.parametrize("profile", ["study", "study_gpu"])
def test_study_profiles_run_the_default_sequence_with_standard_errors_at_most_005(profile):
    from slice_kernels.runner.profiles import RunConfig, make_config

    cfg, d = make_config(profile), RunConfig()
    assert (cfg.heldout, cfg.methods) == (d.heldout, d.methods)
    if profile == "study":
        assert cfg.tasks == d.tasks and cfg.n_train == cfg.steps * cfg.batch_size  # what training uses
    else:  # the same tasks, chain_sum widened to two-digit terms so 1000 + 200 distinct questions exist
        assert cfg.tasks[:2] == d.tasks[:2] and cfg.tasks[2] == d.tasks[2].replace("max_digits=1", "max_digits=2")
    for n in (cfg.n_eval, cfg.n_heldout):  # the worst case p = 0.5 of one task's score
        assert (0.25 / n) ** 0.5 <= 0.05


def test_held_out_tasks_of_a_sequence_dataset_are_found(tmp_path):
    from slice_kernels.runner.tasks import shared_datasets

    f = tmp_path / "gcd.jsonl"  # a file is its own task, whatever its name says
    f.write_text('{"prompt": "1+1", "answer": "2"}\n')
    tasks = ["fraction_simplification", "gcd", "survo"]
    assert shared_datasets(tasks, ["gcd?max_value=20", "basic_arithmetic", str(f)]) == [("gcd?max_value=20", "gcd")]
    assert shared_datasets(["letter_counting?min_words=1&max_words=2"], ["gcd?max_value=20"]) == []
