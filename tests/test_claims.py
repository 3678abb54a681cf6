"""``benchmarks/claims.py``: the verdict rule, and a claim settled from quality tables written by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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
    argv = ["--tables", str(tmp_path), "--out", str(out), "--permutation-rounds", "200"]
    argv += ["--cross-encoder", str(tmp_path / "absent.json")]
    assert claims.main(argv) == 0
    written = json.loads(out.read_text())
    assert written["c"]["verdict"] == "unsettled" and written["c"]["seeds"] == 2
    for dataset in claims.DATASETS:
        _table(tmp_path, dataset, 44, {"minilm-asym/embeddistill": better, "minilm-sym/embeddistill": worse})
    assert claims.main(argv) == 0
    written = json.loads(out.read_text())
    assert written["c"]["verdict"] == "confirmed" and written["c"]["seeds"] == 3
    assert written["c"]["datasets"]["scifact"]["difference"] == 1.0
    assert written["a"]["verdict"] == "unsettled" and written["a"]["datasets"] == {}  # no rows for it
    assert written["d"]["verdict"] == "not run"


def _student(values: list[float], seed: int) -> dict:
    return {"seed": seed, "metrics": {"nDCG@10": sum(values) / len(values)}, "per_query": {"nDCG@10": _encoded(values)}}


def _encoded(values: list[float]) -> str:
    return " ".join(map(str, values))


def cross_encoder_file(path: Path, students: dict, seeds=(42, 43, 44), datasets=claims.DATASETS) -> Path:
    """A cross_encoder.py result file: ``students`` maps (teacher, variant) to a function (dataset, seed) -> the
    per-query nDCG@10 of that student; every reranker scores 0.9 (dual-pooling) and 0.8 (standard)."""
    data: dict = {"command": "python benchmarks/cross_encoder.py ...", "git_commit": "abc", "datasets": {}}
    for dataset in datasets:
        size = len(students[next(iter(students))](dataset, seeds[0]))
        teachers: dict = {}
        for (teacher, variant), values in students.items():
            found = teachers.setdefault(teacher, {"students": {}})
            found["cross_encoder_reranker"] = {"metrics": {"nDCG@10": 0.9 if teacher == "dual-pooling" else 0.8}}
            found["students"][variant] = {str(s): _student(values(dataset, s), s) for s in seeds}
        data["datasets"][dataset] = {"query_ids": [f"q{i}" for i in range(size)], "teachers": teachers}
    path.write_text(json.dumps(data))
    return path


def test_claim_d_pits_the_dual_pooling_students_with_embedding_matching_against_the_standard_ones(tmp_path):
    half = [1.0] * 10 + [0.0] * 10

    def with_em(dataset, seed):  # better than the standard CE's student on every query but on scifact
        return half if dataset == "scifact" else [1.0] * 20

    students = {
        ("dual-pooling", claims.WITH_EM): with_em,
        ("dual-pooling", claims.SCORE_ONLY): lambda dataset, seed: half,
        ("standard", claims.SCORE_ONLY): lambda dataset, seed: [0.0] * 10 + [1.0] * 10 if seed == 42 else half,
    }
    path = cross_encoder_file(tmp_path / "ce.json", students)
    out = tmp_path / "claims.json"
    argv = ["--tables", str(tmp_path), "--out", str(out), "--permutation-rounds", "200", "--cross-encoder", str(path)]
    assert claims.main(argv) == 0
    d = json.loads(out.read_text())["d"]
    assert d["verdict"] == "confirmed" and d["seeds"] == 3
    assert d["reasoning"] == "A is significantly better on nfcorpus, squad and significantly worse nowhere."
    assert list(d["datasets"]) == list(claims.DATASETS)
    assert d["datasets"]["nfcorpus"]["a_mean"] == 1.0 and d["datasets"]["nfcorpus"]["difference"] == pytest.approx(0.5)
    scifact = d["datasets"]["scifact"]  # the same mean on every seed, but another half of the queries on seed 42
    assert scifact["a_mean"] == scifact["b_mean"] == 0.5 and scifact["a_sd"] == scifact["b_sd"] == 0.0
    assert scifact["difference"] == pytest.approx(0.0) and scifact["p_holm"] == 1.0
    assert d["rerankers"]["squad"] == {"dual-pooling": 0.9, "standard": 0.8}
    assert d["a"]["teacher"] == "dual-pooling" and d["b"]["row"] == "standard CE -> score distillation only"
    teacher_alone = d["extra"]["teacher_alone"]["datasets"]["squad"]  # both score-only: no difference
    assert teacher_alone["difference"] == pytest.approx(0.0) and teacher_alone["p_holm"] == 1.0
    assert d["extra"]["embedding_matching_alone"]["datasets"]["squad"]["difference"] == pytest.approx(0.5)
    assert d["source"]["git_commit"] == "abc"


def test_claim_d_with_two_seeds_is_unsettled_and_without_its_file_not_run(tmp_path):
    ones, zeros = (lambda dataset, seed: [1.0] * 12), (lambda dataset, seed: [0.0] * 12)
    students = {("dual-pooling", claims.WITH_EM): ones, ("standard", claims.SCORE_ONLY): zeros}
    path = cross_encoder_file(tmp_path / "ce.json", students, seeds=(42, 43))
    out = tmp_path / "claims.json"
    argv = ["--tables", str(tmp_path), "--out", str(out), "--permutation-rounds", "200", "--cross-encoder", str(path)]
    assert claims.main(argv) == 0
    d = json.loads(out.read_text())["d"]
    assert d["verdict"] == "unsettled" and d["seeds"] == 2
    assert d["reasoning"].startswith("fewer than 3 seeds on 3 sets so far; A is significantly better on scifact")
    assert d["extra"]["teacher_alone"]["datasets"] == {}  # no score-only dual-pooling rows in this file
    assert claims.main([*argv[:-1], str(tmp_path / "absent.json")]) == 0
    assert json.loads(out.read_text())["d"]["verdict"] == "not run"


def test_claim_d_refuses_the_old_single_teacher_file(tmp_path):
    old = Path(claims.__file__).parent / "results" / "cross_encoder.json"
    argv = ["--tables", str(tmp_path), "--out", str(tmp_path / "c.json"), "--cross-encoder", str(old)]
    with pytest.raises(SystemExit, match="layout before per-teacher results"):
        claims.main(argv)
