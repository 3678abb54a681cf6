"""``benchmarks/headline.py``: which tables make which rows, and the five-set retention computed by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import headline  # noqa: E402
from _report_sections import render_headline  # noqa: E402

QUERIES = 4


def _table(folder: Path, name: str, dataset: str, rows: dict[str, float]) -> None:
    splits = ["dl19", "dl20"] if dataset == "msmarco-dl" else ["test"]
    ids = {split: [f"{split}-q{i}" for i in range(QUERIES)] for split in splits}
    per_query = {
        key: {"per_query": {split: {"nDCG@10": " ".join([str(value)] * QUERIES)} for split in splits}}
        for key, value in rows.items()
    }
    table = {"dataset": dataset, "query_ids": ids, "rows": per_query}
    (folder / name).write_text(json.dumps(table))


@pytest.mark.parametrize(
    ("name", "variant", "epochs"),
    [
        ("quality_scifact_s42.json", None, None),
        ("quality_scifact_s43_mix.json", "mix", None),
        ("quality_msmarco-dl_s42_e1.json", None, "1"),
        ("quality_squad_s42_dev_mix.json", "dev_mix", None),
        ("quality_nfcorpus_s43_c8.json", "c8", None),
        ("quality_squad_s44_c24.json", "c24", None),
        ("quality_scifact_s42_dev_c24e2.json", "dev_c24e2", None),
        ("quality_nfcorpus_s42_dev_c48e1.json", "dev_c48e1", None),
        ("quality_squad_s42_dev_c24e5lr.json", "dev_c24e5lr", None),
    ],
)
def test_table_names_give_their_variant(name, variant, epochs):
    match = headline.TABLE_NAME.match(name)
    assert match["variant"] == variant and match["epochs"] == epochs


def test_a_set_with_fewer_seeds_lends_each_missing_seed_the_mean_of_those_it_has():
    found = {s: {42: {"q": 0.5}, 43: {"q": 0.5}, 44: {"q": 0.5}} for s in headline.SETS}
    for dl in [("msmarco-dl", "dl19"), ("msmarco-dl", "dl20")]:
        found[dl] = {42: {"q": 0.2}, 43: {"q": 0.4}}
    # seed 42: (3 x 0.5 + 2 x 0.2) / 5; seed 43: (1.5 + 0.8) / 5; seed 44 borrows DL's mean 0.3: (1.5 + 0.6) / 5
    assert headline.five_set_means(found) == pytest.approx({42: 0.38, 43: 0.46, 44: 0.42})


def test_tables_of_other_experiments_are_not_read_as_the_headline():
    assert headline.TABLE_NAME.match("quality_scifact_s42_nogen.json") is None


def test_each_student_is_scored_by_its_recipe_row_and_general_queries_on_their_own_tables(tmp_path):
    # The 2-layer mpnet student's headline row is the default teacher:0,-1 (mpnet-L0L11-asym); its first-two-layer
    # row is kept apart; the general-queries recipe reads the _mix tables, and DL's plain ones.
    shelf = headline.OFF_THE_SHELF
    plain = {"teacher": 1.0, shelf: 0.5, "mpnet-L0L11-asym/embeddistill": 0.4, "mpnet-2L-asym/embeddistill": 0.3}
    for dataset in ("scifact", "nfcorpus", "squad"):
        _table(tmp_path, f"quality_{dataset}_s42.json", dataset, plain)
        _table(
            tmp_path, f"quality_{dataset}_s42_mix.json", dataset, {"teacher": 1.0, "mpnet-2L-asym/embeddistill": 0.8}
        )
    dl = {"teacher": 1.0, shelf: 0.5, "mpnet-L0L11-asym/embeddistill": 0.6, "mpnet-2L-asym/embeddistill": 0.6}
    _table(tmp_path, "quality_msmarco-dl_s42.json", "msmarco-dl", dl)
    out = tmp_path / "headline.json"
    args = ["--tables", str(tmp_path), "--dev-tables", str(tmp_path / "none"), "--speed-cpu", str(tmp_path / "none")]
    assert headline.main([*args, "--out", str(out), "--permutation-rounds", "100"]) == 0
    written = json.loads(out.read_text())
    assert written["off_the_shelf"][shelf]["retention_mean"] == pytest.approx(0.5)
    default = written["students"]["mpnet-2L-asym"]
    assert default["row"] == "mpnet-L0L11-asym"
    assert default["retention_mean"] == pytest.approx((0.4 * 3 + 0.6 * 2) / 5)
    assert default["beats_off_the_shelf"] is False
    assert written["first_layers"]["mpnet-2L-asym"]["retention_mean"] == pytest.approx((0.3 * 3 + 0.6 * 2) / 5)
    general = written["with_general_queries"]["students"]["mpnet-2L-asym"]
    assert general["retention_mean"] == pytest.approx((0.8 * 3 + 0.6 * 2) / 5)
    assert general["beats_off_the_shelf"] is True
    assert general["vs_off_the_shelf"]["scifact/test"]["mean_difference"] == pytest.approx(0.3)
    assert written["with_general_queries"]["dev"] == {}
    text = "\n".join(render_headline(written))
    assert "| `mpnet-2L-asym` (row `mpnet-L0L11-asym`) | 48.0% |" in text  # the defaults' table
    assert "| `mpnet-2L-asym` | 42.0% |" in text  # the first two layers
    assert "**With general queries**" in text and "| `mpnet-2L-asym` | 72.0% |" in text


def _trained_row(retention: float, history: list[float], kept: int, merged: float | None = None) -> dict:
    validation = {
        "metric": "agreement_nDCG@10",
        "kept_step": kept,
        "history": [{"step": step, "agreement_nDCG@10": value} for step, value in enumerate(history)],
    }
    if merged is not None:
        validation["merged"] = {"agreement_nDCG@10": merged}
    return {"training": {"validation": validation}, "evaluations": {"test": {"retention": {"nDCG@10": retention}}}}


def test_label_free_points_use_the_weights_a_run_ends_with_and_its_rise_from_the_start():
    table = {
        "file": "quality_scifact_s42.json",
        "rows": {
            "teacher": {"evaluations": {}},  # not trained: no point
            "plain/embeddistill": _trained_row(0.9, [0.2, 0.7, 0.6], kept=1),
            "averaged/embeddistill": _trained_row(0.95, [0.3, 0.8], kept=1, merged=0.5),
        },
    }
    points = {p["row"]: p for p in headline.label_free_points([table])}
    assert set(points) == {"plain/embeddistill", "averaged/embeddistill"}
    assert points["plain/embeddistill"]["agreement"] == pytest.approx(0.7)  # the kept step, not the last
    assert points["plain/embeddistill"]["agreement_gain"] == pytest.approx(0.5)
    assert points["averaged/embeddistill"]["agreement"] == pytest.approx(0.5)  # scored as averaged
    assert points["averaged/embeddistill"]["agreement_gain"] == pytest.approx(0.2)
    assert points["averaged/embeddistill"]["test_retention"] == pytest.approx(0.95)


def test_real_query_agreement_is_ranked_only_on_the_runs_that_have_it():
    # Three runs with the real-query agreement (it ranks them as retention does, the mixed one in reverse) and one
    # without it, whose point must not enter either ranking.
    points = [
        {"table": "quality_scifact_s42.json", "agreement": a, "agreement_real": r, "test_retention": t}
        for a, r, t in [(0.9, 0.1, 0.90), (0.8, 0.2, 0.95), (0.7, 0.3, 0.99), (0.1, None, 0.5)]
    ]
    ranked = headline.real_queries_only(points)
    assert ranked["real"]["scifact"] == pytest.approx(1.0)
    assert ranked["mixed"]["scifact"] == pytest.approx(-1.0)


def test_a_set_reads_the_student_from_its_newest_crop_tables_alone(tmp_path):
    # SciFact has _c8 and _c24 tables (the previous and today's defaults): its value comes from _c24 alone; NFCorpus
    # has only a _c8 table and takes it; SQuAD has neither and keeps the plain tables' value; DL has a _c24 table,
    # which the headline reads and dl_at_earlier_recipe does not.
    shelf = headline.OFF_THE_SHELF
    plain = {"teacher": 1.0, shelf: 0.5, "mpnet-L0L11-asym/embeddistill": 0.4}
    for dataset in ("scifact", "nfcorpus", "squad", "msmarco-dl"):
        _table(tmp_path, f"quality_{dataset}_s42.json", dataset, plain)
    _table(tmp_path, "quality_scifact_s42_c8.json", "scifact", {"teacher": 1.0, "mpnet-L0L11-asym/embeddistill": 0.9})
    _table(tmp_path, "quality_scifact_s42_c24.json", "scifact", {"teacher": 1.0, "mpnet-L0L11-asym/embeddistill": 0.8})
    _table(tmp_path, "quality_nfcorpus_s42_c8.json", "nfcorpus", {"teacher": 1.0, "mpnet-L0L11-asym/embeddistill": 0.6})
    _table(tmp_path, "quality_msmarco-dl_s42_c24.json", "msmarco-dl", {"mpnet-L0L11-asym/embeddistill": 0.2})
    out = tmp_path / "headline.json"
    args = ["--tables", str(tmp_path), "--dev-tables", str(tmp_path / "none"), "--speed-cpu", str(tmp_path / "none")]
    assert headline.main([*args, "--out", str(out), "--permutation-rounds", "100"]) == 0
    written = json.loads(out.read_text())
    default = written["students"]["mpnet-2L-asym"]
    assert default["retention_mean"] == pytest.approx((0.8 + 0.6 + 0.4 + 0.2 * 2) / 5)
    sources = default["tables_by_set"]
    assert (sources["scifact/test"], sources["nfcorpus/test"], sources["squad/test"]) == ("c24", "c8", "plain")
    assert sources["msmarco-dl/dl19"] == sources["msmarco-dl/dl20"] == "c24"
    earlier = written["dl_at_earlier_recipe"]["students"]["mpnet-2L-asym"]
    assert earlier["retention_mean"] == pytest.approx((0.8 + 0.6 + 0.4 * 3) / 5)
    assert earlier["tables_by_set"]["msmarco-dl/dl19"] == "plain"


def test_the_third_epoch_is_read_where_a_student_has_it_and_compared_with_two_seed_by_seed(tmp_path):
    # Two students have _c24 (2 epochs) and _c24e3 (3 epochs) tables on the three seeded sets: each headline reads
    # _c24e3, and third_epoch compares the two on the seeds both hold. The symmetric MiniLM has no _c24e3 row and is
    # left out of third_epoch.
    shelf = headline.OFF_THE_SHELF
    for dataset in ("scifact", "nfcorpus", "squad", "msmarco-dl"):
        _table(tmp_path, f"quality_{dataset}_s42.json", dataset, {"teacher": 1.0, shelf: 0.5})
    for dataset, two, three in (("scifact", 0.8, 0.9), ("nfcorpus", 0.6, 0.6), ("squad", 0.4, 0.7)):
        for seed in (42, 43):
            rows = {"teacher": 1.0, "mpnet-L0L11-asym/embeddistill": two, "minilm-asym/embeddistill": two}
            _table(tmp_path, f"quality_{dataset}_s{seed}_c24.json", dataset, rows)
        rows = {"teacher": 1.0, "mpnet-L0L11-asym/embeddistill": three, "minilm-asym/embeddistill": 1.0}
        _table(tmp_path, f"quality_{dataset}_s42_c24e3.json", dataset, rows)
    _table(tmp_path, "quality_msmarco-dl_s42_c24.json", "msmarco-dl", {"mpnet-L0L11-asym/embeddistill": 0.5})
    _table(tmp_path, "quality_msmarco-dl_s43_c24.json", "msmarco-dl", {"mpnet-L0L11-asym/embeddistill": 0.5})
    out = tmp_path / "headline.json"
    args = ["--tables", str(tmp_path), "--dev-tables", str(tmp_path / "none"), "--speed-cpu", str(tmp_path / "none")]
    assert headline.main([*args, "--out", str(out), "--permutation-rounds", "100"]) == 0
    written = json.loads(out.read_text())
    assert written["students"]["mpnet-2L-asym"]["tables_by_set"]["scifact/test"] == "c24e3"
    assert written["students"]["minilm-asym"]["tables_by_set"]["scifact/test"] == "c24e3"
    assert set(written["third_epoch"]["students"]) == {"mpnet-2L-asym", "minilm-asym"}
    assert written["third_epoch"]["students"]["minilm-asym"]["vs_2_epochs"]["squad/test"]["mean_difference"] == (
        pytest.approx(0.6)
    )
    third = written["third_epoch"]["students"]["mpnet-2L-asym"]
    assert set(third) == {"vs_2_epochs", "three_set_retention_by_seed"}
    assert third["vs_2_epochs"]["scifact/test"]["seeds"] == [42]  # 43 has no 3-epoch table
    assert third["vs_2_epochs"]["scifact/test"]["mean_difference"] == pytest.approx(0.1)
    assert third["vs_2_epochs"]["squad/test"]["mean_difference"] == pytest.approx(0.3)
    assert third["vs_2_epochs"]["nfcorpus/test"]["p"] == pytest.approx(1.0)  # no difference at all
    assert "msmarco-dl/dl19" not in third["vs_2_epochs"]  # no 3-epoch DL table
    assert third["three_set_retention_by_seed"] == {
        "3 epochs": {"42": pytest.approx((0.9 + 0.6 + 0.7) / 3)},
        "2 epochs": {"42": pytest.approx(0.6), "43": pytest.approx(0.6)},
    }
