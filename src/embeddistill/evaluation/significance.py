"""Per-query significance: is one system's mean metric really different from another's on the same queries?

Every benchmark that compares two rows (``benchmarks/quality.py``, ``ablation.py``, ``querygen.py``,
``cross_encoder.py``) reports this p-value next to the difference, so it lives in the library, once.
"""

from __future__ import annotations

import numpy as np


def paired_permutation_test(
    a: dict[str, float], b: dict[str, float], rounds: int = 10000, seed: int = 0, chunk: int = 500
) -> float:
    """Two-sided p-value of the mean per-query difference under random sign flips (paired, same queries).

    Queries are taken in sorted order, so the p-value does not depend on the order the runs were built in.
    The sign flips are drawn ``chunk`` rounds at a time so memory stays small for thousands of queries.
    """
    if set(a) != set(b):
        raise ValueError(f"paired test needs the same queries on both sides ({len(a)} vs {len(b)})")
    differences = np.array([a[q] - b[q] for q in sorted(a)])
    observed = abs(differences.mean()) if len(differences) else 0.0
    rng = np.random.default_rng(seed)
    at_least_as_extreme = 0
    for start in range(0, rounds, chunk):
        size = min(chunk, rounds - start)
        signs = rng.choice([-1.0, 1.0], size=(size, len(differences)))
        # A tiny tolerance: floating-point noise must not make an identical difference "less extreme".
        at_least_as_extreme += int((np.abs((signs * differences).mean(axis=1)) >= observed - 1e-12).sum())
    return float((at_least_as_extreme + 1) / (rounds + 1))
