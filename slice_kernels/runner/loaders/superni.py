"""Super-NaturalInstructions task files (allenai/natural-instructions ``tasks/taskNNN_<name>.json``).

Spec: ``superni:<path to taskNNN_name.json>[?metric=exact|rouge_l][&pos=K]``; the task is named after the file's
stem. What the SLICE reference (RamiroNB/slice, ``cl_lora/load_dataset.py`` and ``eval.py``) does, and this loader
with it:

- prompt: the task's definition, a blank line, then ``Input: <instance input>`` (the reference puts no positive
  example in the prompt; ``pos=K`` puts the task's first K positive examples between the definition and the
  instance, as ``Example i:`` / ``Input:`` / ``Output:`` blocks, for the Tk-Instruct-style few-shot form);
- training target: the instance's first output (the reference's);
- metric: the reference's table of task categories, keyed by the task number: "classification" tasks are scored
  by exact match, "generation" tasks by ROUGE-L. A task outside that table has no metric in the reference, so
  it must be given (``?metric=``) rather than guessed;
- split: a seeded shuffle of the instances, evaluation questions first, like the runner's JSONL tasks.

Departure: a prediction scores the maximum over all of the instance's reference outputs (SuperNI's own evaluation
does that); the reference compares with the first output only.
"""

from __future__ import annotations

import os
import random
import re

from ..errors import TaskError
from ..examples import Example, Task, exact_match, file_eval_count, rouge_l, task_seed
from .json_file import load_json, where
from .spec import parse_spec

OPTIONS = {"metric": ("exact", "rouge_l"), "pos": int}

# The SLICE reference's category of every SuperNI task it defines (cl_lora/task_sequences.py), by task number;
# its evaluator scores "classification" by exact match and "generation" by ROUGE-L.
_REFERENCE_CLASSIFICATION = frozenset(
    (88, 92, 119, 195, 199, 209, 220, 224, 231, 273, 286, 325, 327, 360, 363, 513, 517, 828)
    + (1292, 1310, 1332, 1343, 1346, 1429, 1510)
)
_REFERENCE_GENERATION = frozenset(
    (2, 24, 77, 79, 85, 86, 87, 90, 141, 161, 163, 179, 180, 181, 183, 205, 206, 208, 243, 271, 292, 339)
    + (376, 425, 448, 511, 589, 611, 618, 619, 1152, 1290, 1355, 1357, 1582, 1711)
)


def superni_path(spec: str) -> str:
    return parse_spec(spec, OPTIONS)[0]


def superni_files(spec: str) -> list[str]:
    return [superni_path(spec)]


def superni_name(spec: str) -> str:
    return os.path.splitext(os.path.basename(superni_path(spec)))[0]


def reference_metric(task_file_stem: str) -> str | None:
    """The metric the SLICE reference scores this SuperNI task with, or None if it does not define the task."""
    m = re.match(r"task0*(\d+)_", task_file_stem)
    if not m:
        return None
    n = int(m.group(1))
    if n in _REFERENCE_CLASSIFICATION:
        return "exact"
    if n in _REFERENCE_GENERATION:
        return "rouge_l"
    return None


def _str_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)


def read_superni(spec: str) -> tuple[str, list[Example]]:
    """(metric, examples) of the whole file; every record is checked before any is returned."""
    path, opts = parse_spec(spec, OPTIONS)
    name = os.path.splitext(os.path.basename(path))[0]
    data, text = load_json(path, "SuperNI task file")
    metric = opts.get("metric") or reference_metric(name)
    if metric is None:
        raise TaskError(
            f"task {spec!r}: {name} is not one of the SuperNI tasks the SLICE reference defines, so it has no "
            f"metric to follow; give one: superni:{path}?metric=exact (classification) or ?metric=rouge_l "
            f"(free text)"
        )
    if not isinstance(data, dict):
        raise TaskError(
            f"{path}: expected a JSON object with 'Definition' and 'Instances' (a natural-instructions task file), "
            f"got a JSON {type(data).__name__}"
        )
    definition = data.get("Definition")
    if not _str_list(definition):
        raise TaskError(f"{path}: 'Definition' is missing or not a non-empty list of strings")
    instances = data.get("Instances")
    if not isinstance(instances, list):
        raise TaskError(f"{path}: 'Instances' is missing or not a list of {{'input': str, 'output': [str, ...]}}")
    k = opts.get("pos", 0)
    shots = data.get("Positive Examples", [])
    if k:
        if not isinstance(shots, list) or len(shots) < k:
            have = len(shots) if isinstance(shots, list) else 0
            raise TaskError(f"task {spec!r}: pos={k} but {path} has {have} 'Positive Examples'; lower pos")
        for i, s in enumerate(shots[:k]):
            if not (isinstance(s, dict) and isinstance(s.get("input"), str) and isinstance(s.get("output"), str)):
                raise TaskError(
                    f"{where(path, text, i, 'Positive Examples', 'positive example')}: expected an object with "
                    f"string 'input' and 'output'"
                )
    head = "\n".join(definition)
    for i, s in enumerate(shots[:k], 1):
        head += f"\n\nExample {i}:\nInput: {s['input']}\nOutput: {s['output']}"
    out = []
    for i, inst in enumerate(instances):
        problem = None
        if not isinstance(inst, dict):
            problem = f"expected an object with 'input' and 'output', got a JSON {type(inst).__name__}"
        elif not isinstance(inst.get("input"), str):
            problem = "'input' is missing or not a string"
        elif not isinstance(inst.get("output"), list) or not inst["output"]:
            problem = "'output' is missing or not a non-empty list of strings (the accepted answers)"
        elif not all(isinstance(o, str) for o in inst["output"]):
            problem = "'output' holds a value that is not a string"
        if problem:
            raise TaskError(f"{where(path, text, i, 'Instances', 'instance')}: {problem}")
        refs = list(inst["output"])
        out.append(Example(f"{head}\n\nInput: {inst['input']}", refs[0], {"outputs": refs}, metric))
    if len(out) < 2:
        raise TaskError(f"{path}: needs at least 2 instances (one to train on, one to evaluate), has {len(out)}")
    return metric, out


def score_max(pred: str, ex: Example) -> float:
    """Best score over the example's accepted answers (all outputs of a SuperNI instance)."""
    fn = rouge_l if ex.metric == "rouge_l" else exact_match
    refs = (ex.entry or {}).get("outputs") or [ex.answer]
    return max(fn(pred, r) for r in refs)


def load_superni(spec: str, n_train: int, n_eval: int, seed: int) -> Task:
    metric, rows = read_superni(spec)
    path = superni_path(spec)
    # the split follows the file alone, not the options: ?metric= or ?pos= must not change which instances are held out
    random.Random(task_seed(seed, "superni:" + path)).shuffle(rows)
    k = file_eval_count(len(rows), n_eval)
    eval_prompts = {r.prompt for r in rows[:k]}
    train = [r for r in rows[k:] if r.prompt not in eval_prompts]
    return Task(
        name=superni_name(spec),
        source=spec,
        train=train[:n_train] if n_train else train,
        eval=rows[:k],
        scorer_name=f"superni.{metric}.max_over_outputs",
        _score=score_max,
    )
