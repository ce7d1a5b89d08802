"""Tasks of a continual run: reasoning-gym datasets (scored by their own scorers) or JSONL files.

A task spec is a reasoning-gym dataset name (``basic_arithmetic``), optionally with dataset options in URL
query form (``chain_sum?max_terms=2&max_digits=1``; values are read as JSON, else as strings), or a path to a
JSONL file whose lines are ``{"prompt": str, "answer": str}`` with an optional
``"metric": "exact" | "rouge_l"`` (default exact), or one of the SLICE paper's benchmarks from local files:
``superni:<taskNNN_name.json>`` or ``trace:<dataset folder or .json>`` (see ``loaders/``).
Every task is split into a training part and a held-out evaluation part, both fixed by the run's seed.
"""

from __future__ import annotations

import difflib
import json
import os
import random

from . import loaders  # superni:/trace: specs
from .errors import TaskError
from .examples import METRICS, Example, Task, exact_match, file_eval_count, rouge_l, task_seed


def is_path(spec: str) -> bool:
    """True for tasks read from files: JSONL files and the ``superni:``/``trace:`` benchmark specs."""
    return loaders.kind(spec) is not None or spec.endswith(".jsonl") or os.sep in spec or os.path.exists(spec)


def task_files(spec: str) -> list[str]:
    """The files a task's data comes from (none for reasoning-gym tasks): what a run's fingerprint hashes."""
    if loaders.kind(spec):
        return loaders.files(spec)
    return [spec] if is_path(spec) else []


def task_name(spec: str) -> str:
    """The name a task gets in results: the spec for reasoning-gym tasks, the file's stem for JSONL files (and
    SuperNI files), the dataset folder's name for TRACE."""
    if loaders.kind(spec):
        return loaders.name(spec)
    return os.path.splitext(os.path.basename(spec))[0] if is_path(spec) else spec


def _rg_datasets() -> dict:
    """reasoning-gym's dataset table, or a TaskError that says how to get it (JSONL tasks need none of it)."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError as exc:
        raise TaskError(
            f"reasoning-gym is not importable ({exc}): the built-in tasks come from it; install it with "
            "`pip install reasoning-gym`, or give the tasks as JSONL files (see docs/runner.md)"
        ) from exc
    return DATASETS


def reasoning_gym_names() -> list[str]:
    return sorted(_rg_datasets())


def json_or_str(raw: str):
    """An option value from the command line: JSON when it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_rg_spec(spec: str) -> tuple[str, dict]:
    """``name?k=v&k=v`` -> (name, options)."""
    name, _, query = spec.partition("?")
    opts = {}
    for part in filter(None, query.split("&")):
        k, eq, v = part.partition("=")
        if not eq or not k:
            raise TaskError(f"task {spec!r}: option {part!r} must look like key=value (name?key=value&key=value)")
        opts[k] = json_or_str(v)
    return name, opts


def shared_datasets(tasks: list, heldout: list) -> list[tuple[str, str]]:
    """(held-out, sequence task) pairs that are the same reasoning-gym dataset in other settings (``gcd?max_value=20``
    and ``gcd``): allowed, since the questions differ, but GP/IP then score a kind of task the adapters trained on."""

    def dataset(spec):
        return None if loaders.kind(spec) or is_path(spec) else parse_rg_spec(spec)[0]

    return [(h, t) for h in heldout for t in tasks if h != t and dataset(h) is not None and dataset(h) == dataset(t)]


def check_spec(spec: str) -> None:
    """Fail fast (before any model is loaded) on a task that cannot be built."""
    if loaders.kind(spec):
        loaders.check(spec)
        return
    if is_path(spec):
        read_jsonl(spec)
        return
    name, opts = parse_rg_spec(spec)
    names = reasoning_gym_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise TaskError(
            f"unknown task {name!r}: not a reasoning-gym dataset name and not a JSONL file"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " (list the names with `slice-kernels tasks`)"
        )
    if opts:
        import inspect

        known = set(inspect.signature(_rg_datasets()[name][1]).parameters) - {"seed", "size"}
        bad = sorted(set(opts) - known)
        if bad:
            raise TaskError(f"task {spec!r}: unknown option(s) {bad} for {name}; it accepts {sorted(known)}")


def read_jsonl(path: str) -> list[Example]:
    if not os.path.isfile(path):
        raise TaskError(f"task file {path!r} does not exist (a task is a reasoning-gym name or a JSONL file)")
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            where = f"{path}, line {i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskError(
                    f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise TaskError(f"{where}: expected a JSON object with 'prompt' and 'answer', got {type(row).__name__}")
            for k in ("prompt", "answer"):
                if not isinstance(row.get(k), str):
                    raise TaskError(f"{where}: field {k!r} is missing or not a string")
            metric = row.get("metric", "exact")
            if metric not in METRICS:
                raise TaskError(f"{where}: metric {metric!r} is not one of {', '.join(METRICS)}")
            out.append(Example(row["prompt"], row["answer"], None, metric))
    if len(out) < 2:
        raise TaskError(f"{path}: needs at least 2 examples (one to train on, one to evaluate), has {len(out)}")
    return out


def load_task(spec: str, n_train: int, n_eval: int, seed: int) -> Task:
    """Build a task with ``n_train`` training and ``n_eval`` evaluation examples (fewer for short files)."""
    if loaders.kind(spec):
        return loaders.load(spec, n_train, n_eval, seed)
    if is_path(spec):
        rows = read_jsonl(spec)
        random.Random(task_seed(seed, spec)).shuffle(rows)
        k = file_eval_count(len(rows), n_eval)
        name = task_name(spec)
        metrics = sorted({r.metric for r in rows})
        eval_prompts = {r.prompt for r in rows[:k]}
        train = [r for r in rows[k:] if r.prompt not in eval_prompts]  # a duplicated line must not leak
        return Task(
            name=name,
            source=spec,
            train=train[:n_train] if n_train else train,
            eval=rows[:k],
            scorer_name="/".join(metrics),
            _score=lambda p, ex: rouge_l(p, ex.answer) if ex.metric == "rouge_l" else exact_match(p, ex.answer),
        )
    check_spec(spec)
    import reasoning_gym as rg

    name, opts = parse_rg_spec(spec)
    # Items are generated lazily by index, so a generous size costs nothing until read.
    size = n_train + _EVAL_SCAN_FACTOR * max(n_eval, 1) + _EVAL_SCAN_EXTRA
    try:  # a bad option value surfaces here (reasoning-gym raises TypeError, AssertionError, ...)
        ds = rg.create_dataset(name, size=size, seed=task_seed(seed, spec), **opts)
        train = [Example(e["question"], str(e["answer"]), e) for e in (ds[i] for i in range(n_train))]
    except Exception as e:
        raise TaskError(
            f"task {spec!r}: reasoning-gym cannot build {name} with options {opts} "
            f"({type(e).__name__}: {e}); fix the option values"
        ) from e
    eval_rows = _unseen_eval_items(ds, n_train, size, n_eval, {ex.prompt for ex in train}, spec)
    return Task(
        name=spec,
        source="reasoning_gym",
        train=train,
        eval=eval_rows,
        scorer_name=f"reasoning_gym.{type(ds).__name__}.score_answer",  # the dataset's own scorer
        _score=lambda p, ex: ds.score_answer(p, ex.entry) or 0.0,
    )


# Evaluation items are searched among this many × n_eval (+ extra) items after the training ones.
_EVAL_SCAN_FACTOR = 50
_EVAL_SCAN_EXTRA = 1000


def _unseen_eval_items(ds, start: int, stop: int, n_eval: int, train_prompts: set, spec: str) -> list:
    """The first ``n_eval`` items from index ``start`` on whose question is neither a training question nor
    an earlier evaluation question: a small option space (e.g. two one-digit terms: 200 questions) repeats
    questions, and a repeated one would score recall of training data, not the task."""
    seen = set(train_prompts)
    out = []
    for i in range(start, stop):
        if len(out) == n_eval:
            break
        e = ds[i]
        if e["question"] in seen:
            continue
        seen.add(e["question"])
        out.append(Example(e["question"], str(e["answer"]), e))
    if len(out) < n_eval:
        raise TaskError(
            f"task {spec!r}: only {len(out)} evaluation questions that do not occur in its {len(train_prompts)} "
            f"distinct training questions were found among {stop - start} further items (need {n_eval}); lower "
            f"--n-train / --n-eval or widen the task's options"
        )
    return out


PRESETS = os.path.join(os.path.dirname(__file__), "presets")


def preset_names() -> list[str]:
    return sorted(f[: -len(".json")] for f in os.listdir(PRESETS) if f.endswith(".json"))


def preset_path(name: str) -> str | None:
    """The file of a named preset (``@conflict_easy``), or None when ``name`` is not a preset's name."""
    if os.sep in name or name.endswith(".json") or os.path.isfile(name):
        return None
    path = os.path.join(PRESETS, name + ".json")
    if not os.path.isfile(path):
        raise TaskError(
            f"--tasks @{name}: no file {name!r} and no preset of that name; presets: {', '.join(preset_names())} "
            f"(or give a path to a mined.json)"
        )
    return path


def expand_task_list(arg: str) -> list[str]:
    """``a,b,c``, ``@file.json`` (the output of ``slice-kernels mine``: its ``sequence`` key) or ``@preset`` (a
    sequence kept in ``runner/presets/``, e.g. ``@conflict_easy``, the default profile's)."""
    arg = arg.strip()
    if arg.startswith("@"):
        path = preset_path(arg[1:]) or arg[1:]
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise TaskError(f"--tasks {arg}: cannot read {path!r} as JSON ({e})") from None
        seq = data.get("sequence") if isinstance(data, dict) else data
        if not isinstance(seq, list) or not all(isinstance(s, str) for s in seq) or not seq:
            raise TaskError(f"--tasks {arg}: {path!r} must hold a list of task specs or a dict with a 'sequence' list")
        return seq
    items = [s.strip() for s in arg.split(",") if s.strip()]
    if not items:
        raise TaskError("--tasks is empty: give a comma-separated list of reasoning-gym names or JSONL files")
    if len(set(items)) != len(items):
        raise TaskError(f"--tasks {arg!r} lists a task twice; each task appears once in a sequence")
    return items
