"""Continual-learning metrics of SPEC §2 from the score matrix R (R[i][j]: task j after stage i, 0-based;
entries above the diagonal, tasks not seen yet, are None)."""

from __future__ import annotations


def continual_metrics(R: list[list[float]]) -> dict:
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"R must be a square T×T matrix (rows = stages, columns = tasks); got {[len(r) for r in R]}")
    if any(R[i][j] is None for i in range(T) for j in range(i + 1)):
        raise ValueError("R has a missing score on or below the diagonal (a seen task was not evaluated)")
    AP = sum(R[j][j] for j in range(T)) / T
    FP = sum(R[T - 1][j] for j in range(T)) / T
    BWT = sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0
    return {"AP": AP, "FP": FP, "Forgetting": AP - FP, "BWT": BWT}
