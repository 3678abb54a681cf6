"""``benchmarks/claims.py``: the verdict rule, and a claim settled from quality tables written by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import claims  # noqa: E402


def _result(difference: float, p_holm: float) -> dict:
    return {"difference": difference, "p_holm": p_holm}


def test_a_claim_is_confirmed_refuted_or_mixed_by_its_significant_sets():
    unclear = _result(-0.01, 0.5)
    assert claims.verdict({"a": _result(0.02, 0.01), "b": _result(0.03, 0.02), "c": unclear})[0] == "confirmed"
    assert claims.verdict({"a": _result(-0.02, 0.01), "b": _result(-0.01, 0.03), "c": unclear})[0] == "refuted"
    assert claims.verdict({"a": _result(0.02, 0.01), "b": _result(-0.03, 0.001), "c": unclear})[0] == "mixed"
    decided, reason = claims.verdict({"a": _result(0.02, 0.2), "b": unclear, "c": unclear})
    assert decided == "mixed" and "no set shows a significant difference" in reason


def test_a_claim_significant_on_one_set_of_three_is_mixed_not_confirmed():
    decided, reason = claims.verdict({"a": _result(0.0, 1.0), "b": _result(0.0005, 1.0), "c": _result(0.014, 0.001)})
    assert decided == "mixed"
    assert reason.startswith("A is significantly better on c only") and "a +0.0000, b +0.0005" in reason


def _table(folder: Path, dataset: str, seed: int, rows: dict[str, list[float]]) -> None:
    ids = [f"q{i}" for i in range(len(next(iter(rows.values()))))]
    per_query = {k: {"per_query": {"test": {"nDCG@10": " ".join(map(str, v))}}} for k, v in rows.items()}
    table = {"dataset": dataset, "query_ids": {"test": ids}, "rows": per_query}
    (folder / f"quality_{dataset}_s{seed}.json").write_text(json.dumps(table))


def test_a_claim_needs_three_seeds_on_three_sets_and_then_gets_its_verdict(tmp_path):
    better, worse = [1.0] * 20, [0.0] * 20  # A finds every query, B none: significant on every set
    for seed in (42, 43):
        for dataset in claims.DATASETS:
            _table(tmp_path, dataset, seed, {"minilm-asym/embeddistill": better, "minilm-sym/embeddistill": worse})
    out = tmp_path / "claims.json"
    assert claims.main(["--tables", str(tmp_path), "--out", str(out), "--permutation-rounds", "200"]) == 0
    written = json.loads(out.read_text())
    assert written["c"]["verdict"] == "unsettled" and written["c"]["seeds"] == 2
    for dataset in claims.DATASETS:
        _table(tmp_path, dataset, 44, {"minilm-asym/embeddistill": better, "minilm-sym/embeddistill": worse})
    assert claims.main(["--tables", str(tmp_path), "--out", str(out), "--permutation-rounds", "200"]) == 0
    written = json.loads(out.read_text())
    assert written["c"]["verdict"] == "confirmed" and written["c"]["seeds"] == 3
    assert written["c"]["datasets"]["scifact"]["difference"] == 1.0
    assert written["a"]["verdict"] == "unsettled" and written["a"]["datasets"] == {}  # no rows for it
    assert written["d"]["verdict"] == "not run"
