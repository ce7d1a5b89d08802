"""TRACE benchmark datasets (BeyonderXX/TRACE: one folder per dataset holding ``train.json``, ``eval.json`` and
``test.json``, each a JSON array of ``{"prompt": str, "answer": str}``).

Spec: ``trace:<folder>`` or ``trace:<file.json>``, with ``?metric=rouge_l|exact|trace``.

- a folder: training examples from ``train.json``, evaluation examples from ``test.json`` (what TRACE's own
  inference scores; ``eval.json`` when there is no ``test.json``); the task is named after the folder;
- a file: a seeded train/eval split of that one file, like the runner's JSONL tasks (the SLICE reference splits
  ``train.json`` this way); a file named train/eval/test.json names the task after its folder, any other after
  its stem.

Prompt: ``TRACE task: <name>``, a blank line, then the record's prompt (the reference's form). Metric: ROUGE-L
for every dataset by default (the reference's: every TRACE task it defines says "rouge-l"). ``metric=trace``
uses TRACE's own per-dataset metric where this package implements it (accuracy, i.e. exact match, for
C-STANCE, FOMC, NumGLUE-cm and NumGLUE-ds; ROUGE-L for MeetingBank) and refuses the others by name.
"""

from __future__ import annotations

import os
import random

from ..errors import TaskError
from ..examples import Example, Task, exact_match, file_eval_count, rouge_l, task_seed
from .json_file import load_json, where
from .spec import parse_spec

OPTIONS = {"metric": ("rouge_l", "exact", "trace")}

# TRACE's own metric per dataset (its evaluations/eval_<dataset>.py); None: not implemented here, with what it is.
TRACE_METRICS = {
    "C-STANCE": ("exact", "accuracy"),
    "FOMC": ("exact", "accuracy"),
    "NumGLUE-cm": ("exact", "accuracy"),
    "NumGLUE-ds": ("exact", "accuracy"),
    "MeetingBank": ("rouge_l", "ROUGE-L"),
    "ScienceQA": (None, "accuracy of the answer letter (the first character) plus ROUGE-L of the reasoning after it"),
    "Py150": (None, "edit similarity (fuzzywuzzy ratio) after restoring the <STR_LIT>/<NUM_LIT> literals"),
    "20Minuten": (None, "SARI"),
    "Papyrus-f": (None, "keyword F1"),
}

_SPLIT_FILES = ("train.json", "eval.json", "test.json")


def _layout(spec: str) -> tuple[str, str, str | None, dict]:
    """(name, train file, eval file or None for a split of the train file, options)."""
    path, opts = parse_spec(spec, OPTIONS)
    if os.path.isdir(path):
        name = os.path.basename(os.path.normpath(path))
        train = os.path.join(path, "train.json")
        evals = [os.path.join(path, f) for f in ("test.json", "eval.json") if os.path.isfile(os.path.join(path, f))]
        if not os.path.isfile(train) or not evals:
            raise TaskError(
                f"task {spec!r}: the TRACE dataset folder {path!r} needs train.json and test.json (or eval.json); "
                f"it holds {sorted(os.listdir(path))}"
            )
        return name, train, evals[0], opts
    if not os.path.isfile(path):
        raise TaskError(
            f"task {spec!r}: {path!r} does not exist (a TRACE task is a dataset folder with train.json and "
            f"test.json, or one such .json file)"
        )
    base = os.path.basename(path)
    stem = os.path.splitext(base)[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    name = parent if base in _SPLIT_FILES and parent else stem
    return name, path, None, opts


def trace_name(spec: str) -> str:
    return _layout(spec)[0]


def trace_files(spec: str) -> list[str]:
    _, train, ev, _ = _layout(spec)
    return [train] + ([ev] if ev else [])


def _metric(spec: str, name: str, opts: dict) -> str:
    choice = opts.get("metric", "rouge_l")
    if choice != "trace":
        return choice
    if name not in TRACE_METRICS:
        raise TaskError(
            f"task {spec!r}: metric=trace needs a TRACE dataset name, and {name!r} is none of "
            f"{', '.join(TRACE_METRICS)}; name the folder after its dataset, or pass metric=rouge_l or metric=exact"
        )
    metric, what = TRACE_METRICS[name]
    if metric is None:
        raise TaskError(
            f"task {spec!r}: TRACE scores {name} by {what}, which this package does not implement (it implements "
            f"exact match and ROUGE-L); pass metric=rouge_l (the SLICE reference's choice) or metric=exact"
        )
    return metric


def _records(path: str, name: str, metric: str) -> list[Example]:
    data, text = load_json(path, "TRACE file")
    if not isinstance(data, list):
        raise TaskError(
            f"{path}: expected a JSON array of {{'prompt': str, 'answer': str}} records (TRACE's format), "
            f"got a JSON {type(data).__name__}"
        )
    out = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise TaskError(
                f"{where(path, text, i)}: expected an object with 'prompt' and 'answer', got a JSON "
                f"{type(row).__name__}"
            )
        for k in ("prompt", "answer"):
            if not isinstance(row.get(k), str):
                raise TaskError(f"{where(path, text, i)}: field {k!r} is missing or not a string")
        out.append(Example(f"TRACE task: {name}\n\n{row['prompt']}", row["answer"], None, metric))
    return out


def read_trace(spec: str) -> tuple[str, list[Example], list[Example] | None]:
    """(metric, train examples, eval examples or None when the train file is to be split); all checked."""
    name, train_file, eval_file, opts = _layout(spec)
    metric = _metric(spec, name, opts)
    train = _records(train_file, name, metric)
    if eval_file is None:
        if len(train) < 2:
            raise TaskError(
                f"{train_file}: needs at least 2 records (one to train on, one to evaluate), has {len(train)}"
            )
        return metric, train, None
    ev = _records(eval_file, name, metric)
    for f, rows in ((train_file, train), (eval_file, ev)):
        if not rows:
            raise TaskError(f"{f}: holds no records")
    return metric, train, ev


def load_trace(spec: str, n_train: int, n_eval: int, seed: int) -> Task:
    metric, train, ev = read_trace(spec)
    name = trace_name(spec)
    rng = random.Random(task_seed(seed, "trace:" + trace_files(spec)[0]))
    rng.shuffle(train)
    if ev is None:
        k = file_eval_count(len(train), n_eval)
        ev, train = train[:k], train[k:]
    else:
        rng.shuffle(ev)
        ev = ev[:n_eval]
    eval_prompts = {r.prompt for r in ev}
    train = [r for r in train if r.prompt not in eval_prompts]  # a question in both splits must not leak
    return Task(
        name=name,
        source=spec,
        train=train[:n_train] if n_train else train,
        eval=ev,
        scorer_name=f"trace.{metric}",
        _score=lambda p, ex: rouge_l(p, ex.answer) if ex.metric == "rouge_l" else exact_match(p, ex.answer),
    )
