"""What every task source builds: an ``Example`` (prompt, answer, scoring metric), a ``Task`` (its training and
held-out examples and its scorer), the two text metrics, and the seeds and split sizes the sources share
(reasoning-gym, JSONL files and the benchmark loaders in ``loaders/``)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

METRICS = ("exact", "rouge_l")


@dataclass
class Example:
    prompt: str
    answer: str
    entry: dict | None = None  # the reasoning-gym entry its scorer needs
    metric: str = "exact"

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "metric": self.metric}


@dataclass
class Task:
    name: str
    source: str  # "reasoning_gym" or the JSONL path
    train: list = field(default_factory=list)
    eval: list = field(default_factory=list)
    scorer_name: str = ""
    _score: Callable[[str, Example], float] | None = None

    def score(self, prediction: str, ex: Example) -> float:
        return float(self._score(prediction, ex))


def _normalize(s: str) -> str:
    return " ".join(s.strip().lower().split())


def exact_match(pred: str, ref: str) -> float:
    return 1.0 if _normalize(pred) == _normalize(ref) else 0.0


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens (longest common subsequence)."""
    a, b = _normalize(pred).split(), _normalize(ref).split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def task_seed(seed: int, name: str) -> int:
    return (seed * 7919 + zlib.crc32(name.encode())) % (2**31 - 1)


def file_eval_count(n_rows: int, n_eval: int) -> int:
    """Evaluation examples a file-backed task of ``n_rows`` lines keeps (at most a fifth of them, at least one)."""
    return min(n_eval, max(1, n_rows // 5))
