"""``benchmarks/report.py`` and its ``_report_*.py`` parts: BENCHMARKS.md from whatever result files exist."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import quality  # noqa: E402
import report  # noqa: E402
from _report_format import RETENTION_CHART, SPEED_CHART, SPEED_CPU_ENCODERS, fmt, percent, render_generic, times  # noqa: E402
from _report_quality import headline  # noqa: E402
from _report_sections import render_defaults, render_querygen, render_symmetric_documents  # noqa: E402


def _quality_record() -> dict:
    """A small quality_*.json as quality.py writes it (two methods of one student, the teacher and BM25)."""
    query_ids = {"test": ["q1", "q2", "q3", "q4"]}
    values = {"teacher": 0.8123, "bm25": 0.5011, "s/embeddistill": 0.7777, "s/untrained": 0.4321}
    rows = {}
    for key, value in values.items():
        scored = {
            "test": {"metrics": {"nDCG@10": value}, "per_query": {"nDCG@10": dict.fromkeys(query_ids["test"], value)}}
        }
        rows[key] = quality.row_from_scores(scored, query_ids)
        student, _, method = key.rpartition("/")
        rows[key].update(method=method, label=quality.DATASET_ROW_LABELS.get(key, method))
        if student:
            rows[key].update(student=student, training={"steps": 1}, timings={"train_seconds": 12.5}, device="cpu")
    for row in rows.values():
        quality.add_retention(row, rows["teacher"])
    record = {
        "schema": quality.SCHEMA,
        "dataset": "scifact",
        "description": "a synthetic table",
        "settings": {"teacher": "all-mpnet-base-v2", "epochs": 6, "seed": 42, "overrides": {}},
        "metrics": ["nDCG@10"],
        "eval_splits": ["test"],
        "students": {"s": "student s"},
        "methods": {"embeddistill": "EmbedDistill", "untrained": "before"},
        "query_ids": query_ids,
        "rows": rows,
        "query_encoders": {
            "s": {"parameters": 1000, "latency_cpu_ms": {"teacher": {"batch1_ms": 9.0}, "student": {"batch1_ms": 3.0}}}
        },
        "invocations": [{"command": "python benchmarks/quality.py --dataset scifact", "machine": {"cpu": "x86_64"}}],
    }
    quality.update_significance(record, rounds=50)
    return record


def test_querygen_section_shows_every_row_and_the_sparse_recovery():
    data = json.loads((BENCHMARKS / "results" / "querygen.json").read_text())
    text = "\n".join(render_querygen(data))
    for row in data["scifact"]["rows"].values():
        assert f"| {fmt(row['metrics']['nDCG@10'])} | {percent(row['retention']['nDCG@10'])} |" in text
    assert percent(data["scifact"]["sparse"]["gap_recovered"]) in text
    assert fmt(data["throughput"]["generators"]["lm"]["queries_per_second"]) in text


def test_symmetric_documents_section_shows_both_ways_and_the_speedup():
    data = json.loads((BENCHMARKS / "results" / "symmetric_documents.json").read_text())
    text = "\n".join(render_symmetric_documents(data))
    for way in ("padded_batch", "sorted_chunks_cached_tokens"):
        assert f"| {fmt(data[way]['forward_backward_seconds'])} | {data[way]['tokens_run']:,} |" in text
    assert times(data["speedup"]) in text


def test_report_renders_known_generic_and_missing_files(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(
        BENCHMARKS / "results", results, ignore=shutil.ignore_patterns("*.png", "quality_*.json", "querygen.json")
    )
    (results / "quality_scifact.json").write_text(json.dumps(_quality_record()))
    (results / "speed_cpu.json").write_text(
        json.dumps(
            {
                "command": "python benchmarks/speed_cpu.py",
                "rows": [{"model": "teacher", "ms": 2.3456}, {"model": "student", "ms": 4.5678}],
            }
        )
    )  # a layout report.py does not know
    out = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()

    assert "0.7777" in text and "95.7%" in text  # the quality row and its retention over the teacher (0.7777/0.8123)
    assert "python benchmarks/quality.py --dataset scifact" in text
    assert "Not yet measured (`python benchmarks/quality.py --dataset nfcorpus`)" in text
    assert "2.3456" in text and "python benchmarks/speed_cpu.py" in text  # the generic table
    assert "`benchmarks/results/querygen.json` does not exist yet" in text
    cross_encoder = json.loads((results / "cross_encoder.json").read_text())["datasets"]["scifact"]
    assert fmt(cross_encoder["cross_encoder_reranker"]["metrics"]["nDCG@10"]) in text
    ablation = json.loads((results / "ablation_scifact.json").read_text())
    assert fmt(ablation["rows"]["score distillation only"]["metrics"]["nDCG@10"]) in text
    assert (results / RETENTION_CHART).stat().st_size > 0  # matplotlib comes with the dev extra
    assert (results / SPEED_CHART).stat().st_size > 0
    assert f"benchmarks/results/{RETENTION_CHART}" in text


def test_report_without_any_results_says_so(tmp_path):
    (tmp_path / "results").mkdir()
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "B.md")]) == 0
    assert (tmp_path / "B.md").read_text().count("Not yet measured") == 4 + 4


def test_generic_rendering_tolerates_any_layout():
    lines = render_generic({"a": 1, "b": [1, 2], "c": {"d": {"e": 0.5}}, "f": [{"g": 1}, {"h": "x|y"}]})
    text = "\n".join(lines)
    assert "0.5000" in text and "x\\|y" in text


def test_headline_means_over_the_five_sets_and_states_the_goal():
    def record(splits: dict[str, dict[str, float]]) -> dict:
        rows: dict[str, dict] = {}
        for split, values in splits.items():
            for key, value in values.items():
                rows.setdefault(key, {"evaluations": {}})["evaluations"][split] = {"metrics": {"nDCG@10": value}}
        return {"metrics": ["nDCG@10"], "rows": rows, "students": {"minilm-2L-asym": "smallest"}}

    def values(teacher, ours, peer):
        return {"teacher": teacher, "minilm-2L-asym/embeddistill": ours, "minilm-2L-asym/peer": peer}

    quality = {
        "quality_scifact.json": record({"test": values(0.6, 0.6, 0.5)}),
        "quality_nfcorpus.json": record({"test": values(0.3, 0.3, 0.4)}),
        "quality_squad.json": record({"test": values(0.8, 0.7, 0.6)}),
        "quality_msmarco-dl.json": record({"dl19": values(0.7, 0.6, 0.5), "dl20": values(0.6, 0.6, 0.5)}),
    }
    speed = {
        "encoders": {
            SPEED_CPU_ENCODERS["minilm-2L-asym"]: {"speedup_vs_teacher": {"batch1_ms": 12.0, "batch32_ms": 20.0}}
        }
    }
    text = "\n".join(headline(quality, speed))
    # teacher mean (0.6+0.3+0.8+0.7+0.6)/5 = 0.6; ours (0.6+0.3+0.7+0.6+0.6)/5 = 0.56, 93.3% of it; peer 0.5
    assert "| teacher |  | 0.6000 | 0.3000 | 0.8000 | 0.7000 | 0.6000 | 0.6000 | 100.0% |" in text
    assert "| minilm-2L-asym | embeddistill | 0.6000 | 0.3000 | 0.7000 | 0.6000 | 0.6000 | 0.5600 | 93.3% |" in text
    assert "93.3% of the teacher's mean nDCG@10 (not met" in text
    assert "12.00x faster at batch 1" in text and "goal >= 10x: met" in text
    assert "above peer on 4 of 5 sets (mean 0.5000)" in text  # not on NFCorpus
    assert "not measured" not in text  # every row has all five sets
    quality["quality_scifact.json"]["rows"]["minilm-2L-asym/score-only"] = {
        "evaluations": {"test": {"metrics": {"nDCG@10": 0.55}}}
    }  # measured on SciFact only: shown, with no mean and no part in the goal
    text = "\n".join(headline(quality, speed))
    assert "| minilm-2L-asym | score-only | 0.5500 | - | - | - | - | - | - |" in text
    assert "above score-only" not in text
    assert "A row with a set not measured (-) has no mean" in text
    del quality["quality_squad.json"]
    assert headline(quality, speed) == []  # no headline without all five sets


def test_defaults_summary_shows_each_point_its_runs_and_the_choice():
    data = {
        "purpose": "choose",
        "calls": [{"command": "python benchmarks/choose_defaults.py --points '[{}]'"}],
        "summary": [
            {"options": {"epochs": 12}, "retention_nDCG@10": {"a": 0.95, "b": 0.93}, "mean_retention_nDCG@10": 0.94,
             "runs": {"a": 1, "b": 1}},
            {"options": {}, "retention_nDCG@10": {"a": 0.925, "b": 0.92}, "mean_retention_nDCG@10": 0.9225,
             "runs": {"a": 2, "b": 2}, "spread": {"a": [0.92, 0.93], "b": [0.91, 0.93]}},
        ],
        "chosen": {"epochs": 12},
    }  # fmt: skip
    text = "\n".join(render_defaults(data))
    assert "| options | a retention | b retention | mean | runs | spread of the runs |" in text
    assert "| epochs: 12 | 95.0% | 93.0% | 94.0% | a: 1, b: 1 |  |" in text
    assert "| base | 92.5% | 92.0% | 92.2% | a: 2, b: 2 | a 92.0% to 93.0%, b 91.0% to 93.0% |" in text
    assert "Chosen: epochs: 12." in text and "    python benchmarks/choose_defaults.py" in text


def _compared(a_mean: float, b_mean: float) -> dict:
    return {"seeds": [42, 43, 44], "a_mean": a_mean, "a_sd": 0.001, "b_mean": b_mean, "b_sd": 0.002,
            "difference": a_mean - b_mean, "p_holm": 0.004}  # fmt: skip


def test_claims_section_renders_claim_d_with_both_rerankers_and_its_extra_comparisons():
    from _report_recipe import render_claims

    def side(teacher: str, variant: str) -> dict:
        return {"table": "cross_encoder_claims.json", "row": f"{teacher} CE -> {variant}", "teacher": teacher}

    extra = {
        "claim": "the teacher alone",
        "a": side("dual-pooling", "score distillation only"),
        "b": side("standard", "score distillation only"),
        "datasets": {"scifact": _compared(0.6111, 0.6000)},
    }
    d = {
        "claim": "a dual-pooling CE gives a better student",
        "verdict": "confirmed",
        "reasoning": "A is significantly better on scifact and significantly worse nowhere.",
        "a": side("dual-pooling", "score distillation + embedding matching"),
        "b": side("standard", "score distillation only"),
        "datasets": {"scifact": _compared(0.6543, 0.6000)},
        "rerankers": {"scifact": {"dual-pooling": 0.7180, "standard": 0.7011}},
        "extra": {"teacher_alone": extra},
        "seeds": 3,
    }
    text = "\n".join(render_claims({"metric": "nDCG@10", "significance": "paired", "d": d}))
    assert "**(d) a dual-pooling CE gives a better student**: confirmed. A is significantly better on scifact" in text
    assert "| scifact | 0.6543 ± 0.0010 | 0.6000 ± 0.0020 | +0.0543 | 0.004 | 3 |" in text
    assert "| dataset | dual-pooling CE | standard CE |" in text and "| scifact | 0.7180 | 0.7011 |" in text
    assert "Not part of the verdict: the teacher alone." in text and "| +0.0111 |" in text
    assert "`standard CE -> score distillation only` (`benchmarks/results/cross_encoder_claims.json`)" in text


def test_cross_encoder_section_renders_each_teacher_with_seed_means_of_its_students():
    from _report_sections import render_cross_encoder

    def system(value: float) -> dict:
        return {"metrics": {"nDCG@10": value}}

    students = {"score distillation only": {"42": system(0.5), "43": system(0.7)}}
    data = {
        "calls": [{"device": "NVIDIA H200"}],
        "datasets": {
            "squad": {
                "first_stage": system(0.4),
                "teachers": {
                    "standard": {"cross_encoder_reranker": system(0.8), "students": students},
                    "dual-pooling": {
                        "cross_encoder_reranker": system(0.9),
                        "student_before_distillation": system(0.1),
                        "students": {},
                    },
                },
            }
        },
    }
    text = "\n".join(render_cross_encoder(data))
    assert text.startswith("Device NVIDIA H200.") and "### squad" in text
    assert "| standard CE: score distillation only | 0.6000 ± 0.1414 | 75.0% | 2 |" in text
    assert "| dual-pooling CE: student before distillation | 0.1000 |" in text
