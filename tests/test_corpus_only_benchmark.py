"""``benchmarks/corpus_only.py --merge``: runs of one pair on different datasets become one result file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import corpus_only  # noqa: E402


def _result(path: Path, dataset: str, student: str = "teacher:0,11") -> str:
    row = {"retention": {"nDCG@10": 0.9}, "test_queries": 3}
    result = {"command": f"run {dataset}", "git_commit": "abc", "teacher": "t", "student": student}
    path.write_text(json.dumps(result | {"datasets": {dataset: row}}))
    return str(path)


def test_merging_keeps_every_dataset_with_the_command_that_ran_it(tmp_path):
    parts = [_result(tmp_path / f"{name}.json", name) for name in ("scifact", "squad")]
    out = tmp_path / "merged.json"
    assert corpus_only.main(["--merge", *parts, "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert list(merged["datasets"]) == ["scifact", "squad"]
    assert merged["datasets"]["squad"]["command"] == "run squad"
    assert merged["command"].startswith("python benchmarks/corpus_only.py --merge")


def test_merging_runs_of_different_students_is_refused(tmp_path):
    parts = [_result(tmp_path / "a.json", "scifact"), _result(tmp_path / "b.json", "squad", student="teacher:2")]
    with pytest.raises(SystemExit, match="different teacher/student pairs"):
        corpus_only.main(["--merge", *parts, "--out", str(tmp_path / "merged.json")])
