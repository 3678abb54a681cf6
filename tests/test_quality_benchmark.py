"""``benchmarks/quality.py``: rows, resume by row, settings guard, paired tests; on a tiny model and data slice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import quality  # noqa: E402

DL_POOL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "msmarco-dl-pool"
FAST = [
    "--epochs", "1", "--latency-repeats", "1", "--permutation-rounds", "200",
    "--set", "crops_per_document=1", "--set", "perturbations_per_query=1", "--set", "batch_size=16",
    "--set", "checkpoint_every=0", "--set", "threads=2", "--set", "hard_negatives=2", "--set", "learning_rate=1e-3",
]  # fmt: skip


def test_planned_rows_put_embeddistill_first_and_skip_finished_ones():
    planned = quality.planned_rows(["a", "b"], ["untrained", "bm25", "embeddistill"])
    assert planned == ["teacher", "bm25", "a/embeddistill", "a/untrained", "b/embeddistill", "b/untrained"]
    record = {"rows": {"teacher": {}, "a/embeddistill": {}}}
    assert quality.pending_rows(record, planned) == ["bm25", "a/untrained", "b/embeddistill", "b/untrained"]


def test_significance_is_filled_for_each_pair_once():
    record = {
        "query_ids": {"test": ["q1", "q2", "q3"]},
        "students": {"s": ""},
        "methods": {"embeddistill": "", "untrained": ""},
        "metrics": ["nDCG@10"],
        "rows": {
            "teacher": {"per_query": {"test": {"nDCG@10": "1 1 1"}}},
            "s/embeddistill": {"per_query": {"test": {"nDCG@10": "0.9 0.8 1"}}},
        },
    }
    quality.update_significance(record, rounds=100)
    assert set(record["significance"]["test"]["s"]) == {"teacher"}
    record["rows"]["s/untrained"] = {"per_query": {"test": {"nDCG@10": quality.encode_values([0.1, 0.2, 0.0])}}}
    quality.update_significance(record, rounds=100)
    assert set(record["significance"]["test"]["s"]) == {"teacher", "s/untrained"}


@pytest.mark.skipif(not DL_POOL.exists(), reason="needs ../shared/datasets/msmarco-dl-pool")
def test_bm25_runs_are_the_plain_bm25_files():
    runs = quality.bm25_runs(DL_POOL, ("dl19", "dl20"))
    assert {split: path.name.split(".")[1] for split, path in runs.items()} == {"dl19": "BM25", "dl20": "BM25"}
    assert "no runs/test.BM25" in quality.bm25_runs(DL_POOL, ("test",))


def test_dl_training_queries_exclude_the_dl20_topic_file():
    spec = quality.DATASETS["msmarco-dl"]
    assert spec.options["train_split"] == "" and not any("dl20" in name for name in spec.extra_query_files)


def _arguments(tmp_path, teacher: str, student: str, dataset: Path, students: str) -> list[str]:
    return [
        "--dataset", "scifact", "--dataset-path", str(dataset), "--teacher", teacher, "--minilm", student,
        "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"),
        "--out", str(tmp_path / "quality.json"), "--students", students, "--max-seq-length", "64", *FAST,
    ]  # fmt: skip


def _spy_on_rows(monkeypatch) -> list[str]:
    ran: list[str] = []
    original = quality.run_method

    def spy(context, student, method):
        ran.append(f"{student}/{method}")
        return original(context, student, method)

    monkeypatch.setattr(quality, "run_method", spy)
    return ran


@pytest.mark.slow
def test_quality_rows_resume_and_guard_their_settings(
    tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, monkeypatch
):
    out = tmp_path / "quality.json"
    common = _arguments(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, "minilm-2L-asym")
    assert quality.main([*common, "--methods", "teacher", "embeddistill", "untrained"]) == 0
    record = json.loads(out.read_text())
    assert set(record["rows"]) == {"teacher", "minilm-2L-asym/embeddistill", "minilm-2L-asym/untrained"}
    assert record["unavailable"]["bm25"].startswith("no runs/test.BM25")
    ours = record["rows"]["minilm-2L-asym/embeddistill"]
    test_ids = record["query_ids"]["test"]
    for metric in ("nDCG@10", "RR@10", "R@100"):
        assert 0.0 <= ours["evaluations"]["test"]["metrics"][metric] <= 1.0
        per_query = quality.decode_values(ours["per_query"]["test"][metric])
        assert len(per_query) == len(test_ids)
        assert abs(sum(per_query) / len(per_query) - ours["evaluations"]["test"]["metrics"][metric]) < 1e-3
        assert metric in ours["evaluations"]["test"]["retention"]
    assert ours["options"]["student_layers"] == 2
    assert set(record["significance"]["test"]["minilm-2L-asym"]) == {"teacher", "minilm-2L-asym/untrained"}
    assert record["query_encoders"]["minilm-2L-asym"]["latency_cpu_ms"]["student"]["batch1_ms"] > 0
    assert record["training_queries"]["labelled"] > 0 and record["invocations"][0]["versions"]["torch"]

    # A rerun with more methods and a second student runs only the new rows.
    ran = _spy_on_rows(monkeypatch)
    assert quality.main([*common, "--methods", "teacher", "embeddistill", "untrained", "score-only"]) == 0
    assert ran == ["minilm-2L-asym/score-only"]
    symmetric = _arguments(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, "minilm-sym")
    assert quality.main([*symmetric, "--methods", "untrained"]) == 0
    assert ran == ["minilm-2L-asym/score-only", "minilm-sym/untrained"]
    record = json.loads(out.read_text())
    assert record["rows"]["minilm-2L-asym/score-only"]["options"]["query_em_weight"] == 0.0
    assert record["rows"]["minilm-sym/untrained"]["asymmetric"] is False
    assert len(record["invocations"]) == 3
    assert quality.main([*common, "--methods", "embeddistill"]) == 0  # nothing left to do
    assert len(ran) == 2

    # Other settings cannot be mixed into the same table.
    with pytest.raises(SystemExit, match="other settings"):
        quality.main([*common, "--epochs", "2"])


def test_peer_row_trains_with_sentence_transformers(
    tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, monkeypatch
):
    common = _arguments(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, "mpnet-2L-asym")
    assert quality.main([*common, "--methods", "embeddistill", "peer"]) == 0
    record = json.loads((tmp_path / "quality.json").read_text())
    peer = record["rows"]["mpnet-2L-asym/peer"]
    assert peer["training"]["learning_rate"] == 1e-3 and peer["training"]["texts"] > 0
    assert 0.0 <= peer["evaluations"]["test"]["metrics"]["nDCG@10"] <= 1.0
    assert "mpnet-2L-asym/peer" in record["significance"]["test"]["mpnet-2L-asym"]


@pytest.mark.slow
def test_parallel_processes_fill_one_table(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice):
    """``quality_parallel.sh``: a teacher process, then one process per student, all writing one table."""
    arguments = _arguments(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, "unused")
    arguments = [a for a in arguments if a not in ("--students", "unused")]
    arguments = arguments[2:]  # the script names the dataset itself
    environment = {
        **os.environ,
        "STUDENTS": "minilm-2L-asym minilm-sym",
        "METHODS": "untrained embeddistill",
        "WORK": str(tmp_path / "work"),
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(BENCHMARKS), os.environ.get("PYTHONPATH", "")]),
    }
    script = BENCHMARKS / "quality_parallel.sh"
    done = subprocess.run(
        ["bash", str(script), "scifact", *arguments], env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr + "".join(p.read_text() for p in (tmp_path / "work/logs").glob("*"))
    record = json.loads((tmp_path / "quality.json").read_text())
    students = ("minilm-2L-asym", "minilm-sym")
    assert set(record["rows"]) == {"teacher"} | {f"{s}/{m}" for s in students for m in ("untrained", "embeddistill")}
    assert list(record["students"]) == list(students)  # table order, whichever process wrote first
    assert len(record["invocations"]) == 3 and set(record["query_encoders"]) == set(students)
    for student in students:
        assert set(record["significance"]["test"][student]) == {"teacher", f"{student}/untrained"}


def test_dev_chosen_method_needs_its_options_and_records_them():
    with pytest.raises(SystemExit):
        quality.parse_args(["--dataset", "scifact", "--teacher", "t", "--minilm", "m", "--methods", "embeddistill-dev"])
    args = quality.parse_args(
        ["--dataset", "scifact", "--teacher", "t", "--minilm", "m", "--methods", "embeddistill-dev",
         "--dev-choice", '{"epochs": 12, "query_em_weight": 0.3}']
    )  # fmt: skip
    assert quality.method_options(args, "embeddistill-dev") == {"epochs": 12, "query_em_weight": 0.3}
    assert quality.method_options(args, "score-only") == {"query_em_weight": 0.0, "document_em_weight": 0.0}
    assert (
        "embeddistill-dev"
        not in quality.parse_args(["--dataset", "scifact", "--teacher", "t", "--minilm", "m"]).methods
    )


def test_dev_chosen_row_with_other_training_data_prepares_its_own(
    tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice
):
    common = _arguments(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, "minilm-2L-asym")
    choice = ["--methods", "embeddistill-dev", "--dev-choice", '{"crops_per_document": 3}']
    # No held-out validation slice, whose seeded sample would take other labelled queries from the two sets.
    assert quality.main([*common, "--set", "validation_queries=0", *choice]) == 0
    record = json.loads((tmp_path / "quality.json").read_text())
    row = record["rows"]["minilm-2L-asym/embeddistill-dev"]
    shared = record["training_queries"]  # the table's: one crop per document (FAST)
    assert row["options"]["crops_per_document"] == 3
    # up to three crops per document where the table has one (a short document gives fewer distinct crops)
    assert 2 * shared["generated"] < row["training_queries"]["generated"] <= 3 * shared["generated"]
    assert row["training_queries"]["labelled"] == shared["labelled"]
    assert 0.0 <= row["evaluations"]["test"]["metrics"]["nDCG@10"] <= 1.0


def test_off_the_shelf_row_is_the_small_model_on_its_own_index(
    tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice
):
    common = _arguments(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, "minilm-sym")
    assert quality.main([*common, "--methods", "teacher", quality.OFF_THE_SHELF]) == 0
    record = json.loads((tmp_path / "quality.json").read_text())
    row = record["rows"][quality.OFF_THE_SHELF]
    # The tiny student stands in for all-MiniLM-L6-v2: scored by itself, so its retention is its own, not 1.
    assert row["model"] == Path(tiny_student_path).name and row["query_encoder"]["parameters"] > 0
    assert 0.0 <= row["evaluations"]["test"]["metrics"]["nDCG@10"] <= 1.0
    assert row["evaluations"]["test"]["retention"]["nDCG@10"] != 1.0
    assert row["git_commit"]


def test_a_dev_table_scores_held_out_training_queries_and_its_sweep_ends_at_the_start(
    tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice
):
    common = _arguments(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, "minilm-sym")
    assert (
        quality.main([*common, "--dev", "--methods", "embeddistill", "untrained", "--start-weight-sweep", "0", "1"])
        == 0
    )
    record = json.loads((tmp_path / "quality.json").read_text())
    assert record["eval_splits"] == ["dev"] and record["settings"]["dev"] is True
    train = quality.load_qrels(scifact_slice / "qrels" / "train.tsv")
    assert set(record["query_ids"]["dev"]) < set(train)  # training queries, never the test split's
    ours = record["rows"]["minilm-sym/embeddistill"]
    sweep = {w: s["evaluations"]["dev"]["metrics"]["nDCG@10"] for w, s in ours["start_weight_sweep"].items()}
    assert set(sweep) == {"0", "1"} and "agreement_nDCG@10" in ours["start_weight_sweep"]["0"]["label_free"]
    # All the weight on the start is the student before training; the row itself is the default, auto: 0.5.
    assert sweep["1"] == pytest.approx(
        record["rows"]["minilm-sym/untrained"]["evaluations"]["dev"]["metrics"]["nDCG@10"]
    )
    assert ours["training"]["start_weight"] == 0.5


def test_dev_refuses_a_dataset_without_labelled_training_queries():
    with pytest.raises(SystemExit, match="no labelled training queries to hold out"):
        quality.dev_spec(quality.DATASETS["msmarco-dl"])
