"""CPU latency: the median of the repeats with their spread, progress while it runs, and reports that read it."""

from __future__ import annotations

import pytest
import torch
import yaml

from embeddistill.evaluation import latency as latency_module
from embeddistill.evaluation.latency import measure_latency, medians
from embeddistill.evaluation.model_card import render_model_card
from embeddistill.evaluation.report import report_table, write_report
from embeddistill.pipeline.summary import RunSummary, speedup


class FakeClock:
    """``perf_counter`` for the latency module: time moves only when an encoder says it took some, so the timings
    are exact whatever else the machine is doing (sleeping for them made the test fail on a loaded machine)."""

    def __init__(self):
        self.seconds = 0.0

    def perf_counter(self) -> float:
        return self.seconds


class SlowEncoder(torch.nn.Module):
    """Takes ``delays_ms[i]`` on ``clock`` for its i-th call (the last one after that): known timings."""

    def __init__(self, delays_ms: list[float], clock: FakeClock):
        super().__init__()
        self.delays_ms, self.calls, self.clock = delays_ms, 0, clock

    def tokenize(self, texts: list[str]) -> dict:
        return {"input_ids": torch.zeros(len(texts), 4, dtype=torch.long)}

    def forward(self, features: dict) -> torch.Tensor:
        self.clock.seconds += self.delays_ms[min(self.calls, len(self.delays_ms) - 1)] / 1000
        self.calls += 1
        return torch.zeros(features["input_ids"].shape[0], 8)


def test_latency_gives_the_median_and_the_spread_of_the_repeats_and_shows_progress(capsys, monkeypatch):
    # 1 warm-up call, then 5 timed repeats of 10, 20, 30, 40, 50 ms at batch size 1, and again at batch size 4.
    delays = [1, 10, 20, 30, 40, 50, 1, 10, 20, 30, 40, 50]
    clock = FakeClock()
    monkeypatch.setattr(latency_module, "time", clock)  # the module's clock alone: the progress bar keeps its own
    result = measure_latency({"slow": SlowEncoder(delays, clock)}, ["a query"], [1, 4], repeats=5, warmup=1)
    latency = result["slow"]
    assert set(latency) == {f"batch{b}_{stat}ms" for b in (1, 4) for stat in ("", "p10_", "p90_")}
    for batch in ("batch1", "batch4"):
        assert latency[f"{batch}_ms"] == pytest.approx(30, abs=8)
        assert latency[f"{batch}_p10_ms"] == pytest.approx(14, abs=6)  # between the 10 and 20 ms repeats
        assert latency[f"{batch}_p90_ms"] == pytest.approx(46, abs=8)
        assert latency[f"{batch}_p10_ms"] < latency[f"{batch}_ms"] < latency[f"{batch}_p90_ms"]
    assert "CPU latency" in capsys.readouterr().err  # the progress bar


SPREAD = {"batch1_ms": 10.0, "batch1_p10_ms": 9.0, "batch1_p90_ms": 12.5, "batch32_ms": 100.0}
SPREAD |= {"batch32_p10_ms": 95.0, "batch32_p90_ms": 130.0}
METRICS = {
    "dataset": "scifact",
    "eval_split": "test",
    "eval_queries": 3,
    "teacher": {"model": "org/teacher", "nDCG@10": 0.6, "latency": {k: 2 * v for k, v in SPREAD.items()}}
    | {"query_encoder_parameters": 4_000_000, "query_encoder_compute_parameters": 2_000_000},
    "student": {"model": "teacher:2", "asymmetric": True, "nDCG@10": 0.5, "latency": SPREAD}
    | {"query_encoder_parameters": 2_000_000, "query_encoder_compute_parameters": 1_000_000},
    "retention": {"nDCG@10": 0.8333},
    "speedup": {"batch1": 2.0, "batch32": 2.0},
    "training_queries": {"labelled": 1, "extra": 0, "generated": 2},
    "training": {"steps": 5, "train_seconds": 1.0},
    "timings": {"teacher_cache_seconds": 0.1, "train_seconds": 1.0, "evaluation_seconds": 0.5, "total_seconds": 2.0},
    "environment": {"embeddistill": "0.1.0", "torch": "2", "threads": 1},
}


def test_speedups_and_tables_use_the_medians_and_show_the_spread_beside_them(tmp_path):
    assert medians(SPREAD) == {"batch1_ms": 10.0, "batch32_ms": 100.0}
    assert speedup(METRICS["teacher"]["latency"], SPREAD) == {"batch1": 2.0, "batch32": 2.0}
    summary = RunSummary.from_dict(METRICS)
    table = report_table(summary)
    assert "CPU ms batch1" in table and "CPU ms batch32" in table and "p10" not in table
    write_report(tmp_path / "report.md", summary)
    report = (tmp_path / "report.md").read_text()
    assert "p10-p90 ms: teacher (batch 1: 18.00-25.00, 32: 190.00-260.00); student (batch 1: 9.00-12.50" in report
    card = render_model_card(summary, {})
    assert "| 1 | 20.00 (18.00-25.00) | 10.00 (9.00-12.50) | 2.00x |" in card
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "org/teacher"
