"""How much of its start a pretrained symmetric student should keep (``start_weight``), chosen on dev queries.

    python benchmarks/start_weight.py --out benchmarks/results/start_weight.json

Reads the tables ``benchmarks/quality.py --start-weight-sweep 0 0.25 0.5 0.75 1`` wrote: in each, the ``minilm-sym``
EmbedDistill row was trained once and then scored with its weights averaged with the start at each W.

* ``dev`` (``--dev-tables``, the ``quality_DATASET_s42_dev.json`` tables: held-out *training* queries, SQuAD's by
  whole article): per W, nDCG@10 retention over the teacher on each set and their mean. ``dev_choice`` is the W
  with the best mean: the library's ``start_weight: auto`` uses it. Tables named ``..._dev_mix.json`` (the MS MARCO
  queries mixed into training) are summarised beside them as ``dev_with_msmarco_queries``.
* ``label_free``: per dev set, the W the label-free check (agreement with the teacher on held-out training queries,
  all of them and the real ones alone) would have chosen: whether a user without labels could choose it.
* ``test`` (``--tables``): per W, the five-set retention (seed means) as ``benchmarks/headline.py`` computes it;
  read only after the choice, to report it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
from _common import REPO, git_commit
from headline import METRIC, collect, five_set_means, load_tables

from embeddistill.storage import atomic_write_json

STUDENT_ROW = "minilm-sym/embeddistill"


def sweeps(table: dict) -> dict[str, dict]:
    return table["rows"].get(STUDENT_ROW, {}).get("start_weight_sweep", {})


def dev_summary(paths: list[Path]) -> dict:
    """Per W: the retention on each dev set and the mean over sets; and what the label-free check would choose."""
    by_weight: dict[str, dict[str, float]] = {}
    label_free: dict[str, dict] = {}
    for path in paths:
        table = json.loads(path.read_text(encoding="utf-8"))
        teacher = table["rows"]["teacher"]["evaluations"]["dev"]["metrics"][METRIC]
        sweep = sweeps(table)
        for weight, scored in sweep.items():
            student = scored["evaluations"]["dev"]["metrics"][METRIC]
            by_weight.setdefault(weight, {})[table["dataset"]] = student / teacher
        if sweep:
            label_free[table["dataset"]] = {
                name: max(sweep, key=lambda w, name=name: sweep[w]["label_free"].get(name, -1.0))
                for name in ("agreement_nDCG@10", "agreement_nDCG@10_real")
            }
            label_free[table["dataset"]]["best_on_dev"] = max(
                sweep, key=lambda w: sweep[w]["evaluations"]["dev"]["metrics"][METRIC]
            )
    summary = {w: {"per_set": sets, "mean": float(np.mean(list(sets.values())))} for w, sets in by_weight.items()}
    return {"retention": summary, "label_free_choice": label_free}


def seed_mean(by_seed: dict[int, dict[str, float]]) -> float:
    return float(np.mean([np.mean(list(scores.values())) for scores in by_seed.values()]))


def test_summary(tables: list[dict]) -> dict:
    """Per W, the five-set retention of nDCG@10 (per seed, then the mean), from the sweeps of the test tables."""
    teacher = five_set_means(collect(tables, "teacher"))
    teacher_mean = teacher[min(teacher)]
    weights = sorted({w for table in tables for w in sweeps(table)}, key=float)
    summary = {}
    for weight in weights:
        swept = [{**table, "rows": {STUDENT_ROW: sweeps(table)[weight]}} for table in tables if weight in sweeps(table)]
        found = collect(swept, STUDENT_ROW)
        means = five_set_means(found)
        summary[weight] = {
            "seeds": {f"{d}/{s}": sorted(v) for (d, s), v in found.items()},
            "nDCG@10": {f"{d}/{s}": seed_mean(by_seed) for (d, s), by_seed in found.items()},
            **({"retention_mean": float(np.mean([m / teacher_mean for m in means.values()]))} if means else {}),
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dev-tables", default=str(REPO / "benchmarks" / "results" / "recipe_dev"))
    parser.add_argument("--tables", default=str(REPO / "benchmarks" / "results" / "recipe"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "start_weight.json"))
    args = parser.parse_args(argv)
    dev_folder = Path(args.dev_tables)
    dev = dev_summary(sorted(dev_folder.glob("quality_*_dev.json")))
    if not dev["retention"]:
        raise SystemExit(f"{dev_folder}: no dev table with a start-weight sweep")
    choice = max(dev["retention"], key=lambda w: dev["retention"][w]["mean"])
    result = {
        "command": "python benchmarks/start_weight.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(),
        "student": STUDENT_ROW.split("/")[0],
        "dev": dev,
        "dev_choice": float(choice),
        "dev_with_msmarco_queries": dev_summary(sorted(dev_folder.glob("quality_*_dev_mix.json"))),
        "test": test_summary(load_tables(Path(args.tables))),
        "git_commit": git_commit(),
    }
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
