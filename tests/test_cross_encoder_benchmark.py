"""``benchmarks/cross_encoder.py``: result parts merged by dataset, teacher and seed; dataset entries; reuse checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cross_encoder  # noqa: E402

DP, STANDARD = "dual-pooling", "standard"
SCORE, EM = cross_encoder.SHORT_VARIANTS["score"], cross_encoder.SHORT_VARIANTS["em"]


def _part(command: str, teachers: dict[str, dict[str, list[int]]], dataset="scifact", query_ids=("1", "2")) -> dict:
    """A call's result file: ``teachers`` maps an architecture to {variant: seeds} evaluated on one dataset."""
    found = {}
    for architecture, variants in teachers.items():
        students = {
            v: {str(s): {"seed": s, "metrics": {"nDCG@10": s / 100}} for s in seeds} for v, seeds in variants.items()
        }
        found[architecture] = {"weights_blake2b": f"hash-{architecture}", "students": students}
    return {
        "command": command,
        "git_commit": "abc",
        "device": "cpu",
        "cross_encoders": {a: {"weights_blake2b": f"hash-{a}", "training": {}} for a in teachers},
        "datasets": {dataset: {"query_ids": list(query_ids), "first_stage": {}, "teachers": found}},
    }


def test_parts_merge_by_dataset_teacher_and_seed_and_keep_every_call():
    parts = [
        _part("a", {DP: {SCORE: [42], EM: [42]}}),
        _part("b", {DP: {SCORE: [43, 44], EM: [43, 44]}}),
        _part("c", {STANDARD: {SCORE: [42, 43, 44]}}),
        _part("d", {STANDARD: {SCORE: [42]}}, dataset="nfcorpus"),
    ]
    merged = cross_encoder.merge_reports(parts, "python benchmarks/cross_encoder.py --merge ...")
    assert [call["command"] for call in merged["calls"]] == ["a", "b", "c", "d"]
    assert merged["git_commit"] == "abc" and set(merged["cross_encoders"]) == {DP, STANDARD}
    teachers = merged["datasets"]["scifact"]["teachers"]
    assert sorted(teachers[DP]["students"][EM]) == ["42", "43", "44"]
    assert teachers[STANDARD]["students"][SCORE]["43"]["metrics"]["nDCG@10"] == 0.43
    assert list(merged["datasets"]["nfcorpus"]["teachers"]) == [STANDARD]
    again = cross_encoder.merge_reports([merged, _part("e", {STANDARD: {SCORE: [43]}}, dataset="nfcorpus")], "m")
    assert [call["command"] for call in again["calls"]] == ["a", "b", "c", "d", "e"]  # a merged file merges on


def _retrained(part: dict) -> dict:
    """The part as if its call had trained its own dual-pooling CE."""
    part["cross_encoders"][DP]["weights_blake2b"] = "another"
    for entry in part["datasets"].values():
        entry["teachers"][DP]["weights_blake2b"] = "another"
    return part


def test_merging_refuses_other_teachers_other_queries_repeated_rows_and_the_old_layout():
    first = _part("a", {DP: {SCORE: [42]}})
    with pytest.raises(ValueError, match="scifact has rows of another dual-pooling CE"):
        cross_encoder.merge_reports([first, _retrained(_part("b", {DP: {SCORE: [43]}}))], "m")
    with pytest.raises(ValueError, match="other queries"):
        cross_encoder.merge_reports([first, _part("b", {DP: {SCORE: [43]}}, query_ids=("1", "3"))], "m")
    with pytest.raises(ValueError, match="seed 42 twice"):
        cross_encoder.merge_reports([first, _part("b", {DP: {SCORE: [42]}})], "m")
    old = json.loads((Path(cross_encoder.__file__).parent / "results" / "cross_encoder.json").read_text())
    with pytest.raises(ValueError, match="layout before per-teacher results"):
        cross_encoder.merge_reports([old, first], "m")


def test_merge_command_writes_the_parts_as_one_file(tmp_path):
    paths = []
    for i, part in enumerate([_part("a", {DP: {EM: [42]}}), _part("b", {STANDARD: {SCORE: [42]}})]):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(part))
    out = tmp_path / "merged.json"
    assert cross_encoder.main(["--merge", *map(str, paths), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["command"].startswith("python benchmarks/cross_encoder.py --merge")
    assert set(merged["datasets"]["scifact"]["teachers"]) == {DP, STANDARD}


def test_a_dataset_entry_names_its_result_key_and_squad_can_be_its_article_split(tmp_path):
    args = cross_encoder.parse_args(["--base", "b", "--first-stage", "f", "--out", "o", "--squad-article-split"])
    assert cross_encoder.dataset_spec("/data/scifact", args, tmp_path) == ("scifact", "/data/scifact")
    assert cross_encoder.dataset_spec("squad=/tmp/data/squad-split", args, tmp_path) == (
        "squad",
        "/tmp/data/squad-split",
    )
    source = tmp_path / "squad-dev"
    (source / "qrels").mkdir(parents=True)
    (source / "corpus.jsonl").write_text(
        "".join(
            json.dumps({"_id": f"sq-{a}-{p}", "text": f"article {a} paragraph {p}"}) + "\n"
            for a in range(4)
            for p in range(2)
        )
    )
    (source / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{a}", "text": f"about {a}"}) + "\n" for a in range(4))
    )
    (source / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{a}\tsq-{a}-0\t1\n" for a in range(4))
    )
    folder = cross_encoder.squad_article_split(tmp_path / "work", str(source))
    split = json.loads((folder / "split.json").read_text())
    assert split["queries"] == {"train": 2, "test": 2} and split["seed"] == 42 and split["train_fraction"] == 0.5
    assert not set(split["train_groups"]) & set(split["test_groups"])


def test_reusing_teachers_that_were_never_trained_fails_clearly(tmp_path):
    argv = ["--base", "b", "--first-stage", "f", "--work", str(tmp_path), "--reuse-teachers", "--device", "cpu"]
    with pytest.raises(SystemExit, match="holds no trained dual-pooling cross-encoder"):
        cross_encoder.main([*argv, "--out", str(tmp_path / "out.json")])


def test_calls_that_trained_their_own_teachers_merge_other_datasets_and_list_every_teacher():
    other = _retrained(_part("b", {DP: {SCORE: [42]}}, dataset="nfcorpus"))
    merged = cross_encoder.merge_reports([_part("a", {DP: {EM: [42], SCORE: [42]}}), other], "m")
    assert merged["cross_encoders"][DP]["weights_blake2b"] == "hash-dual-pooling"
    assert [t["weights_blake2b"] for t in merged["other_cross_encoders"][DP]] == ["another"]
    assert merged["datasets"]["nfcorpus"]["teachers"][DP]["weights_blake2b"] == "another"
    assert list(merged["datasets"]["scifact"]["teachers"][DP]["students"]) == [SCORE, EM]  # in VARIANTS order
