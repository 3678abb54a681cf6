"""The headline: does each distilled student beat the small model a user would otherwise pick?

    python benchmarks/headline.py --out benchmarks/results/headline.json

Reads the recipe's quality tables, ``benchmarks/results/recipe/quality_DATASET_sSEED[_eEPOCHS][_c8|_c24|_sym].json``
(written by ``benchmarks/quality.py --seed SEED --split-seed 42 --out ...``, one table per dataset and training
seed), and ``benchmarks/results/speed_cpu.json``. For each student (its ``embeddistill`` rows: the library's
defaults; ``row`` names the quality table's row: the 2-layer mpnet student is the default ``--student teacher:0,-1``,
the teacher's bottom and top layers, and the 2-layer MiniLM one keeps MiniLM's bottom and top layers,
``--student-layers 0 -1``, the choice made on dev; ``first_layers`` holds both kept as their first two layers, the
earlier recipe). Each set is read from the newest tables that hold the student's row on it: ``_c24e3`` (today's
defaults: 24 crops per document, 3 epochs, ``crop_budget`` 150,000; rerun for the three asymmetric students), else
``_c24`` (24 crops, 2 epochs: the previous defaults), else ``_c8`` (8 crops, 6 epochs), else the plain tables (2
crops, 6 epochs). ``tables_by_set`` says which tables each set came from: on DL, ``_c24`` and ``_c24e3`` give the
30,005-passage pool 5 crops a passage (the budget). The
symmetric student's defaults are the plain tables' recipe (a whole pretrained student is trained gently: 2 crops, 6
epochs; ``embeddistill.config.recipe``), at most 2,000 steps, which shortens DL alone: its DL sets come from the
``_sym`` tables, the rest are plain; ``recipe`` says, per student, the command and how its tables stand against the
library's defaults.

* ``retention_mean``: the five-set mean of nDCG@10 (SciFact, NFCorpus, SQuAD, DL19, DL20) over the teacher's
  five-set mean, per training seed, then averaged over seeds; ``retention_sd`` their standard deviation (a set with
  fewer seeds, DL, lends the mean of its seeds to each seed it lacks: ``seeds`` says how many each set has);
* ``cpu_speedup_batch1``: the query encoder's speed-up over the teacher's at batch 1 on the CPU (``speed_cpu.json``);
* ``beats_off_the_shelf``: ``retention_mean`` above all-MiniLM-L6-v2's as it comes (its own index);
* ``vs_off_the_shelf``: per set, the mean per-query nDCG@10 difference (per-query values averaged over seeds first)
  and its paired permutation p-value, Holm-corrected over every test this file makes.

``third_epoch``: for the students rerun at today's 3 epochs, per set the mean per-query nDCG@10 difference against
the same student at 2 epochs (``_c24``, the seeds both hold), paired permutation p and Holm over these tests alone,
and each seed's three-set retention under both: whether the gain exceeds the spread of the seeds.

``with_general_queries``: the same, with 2 crops per document (the earlier default), for the recipe chosen on dev
queries (``benchmarks/results/recipe_dev/``, 20% of the labelled training queries held out) for the asymmetric
students: the library's defaults plus 13,817 general
real queries (MS MARCO dev-small and eval-small, no labels: ``--extra-queries FILE``) mixed into training
(tables ``quality_DATASET_sSEED_mix.json``; DL's own tables, whose training queries are these already), and for the
2-layer mpnet student the teacher's layers 0 and 11 (``--student teacher:0,11``; same architecture and CPU cost as
``teacher:2``) and for the 2-layer MiniLM student its first two layers. ``dev`` holds the three-set dev
retention of every candidate that choice was made from.

``label_free.spearman_vs_test_retention``: across every trained row of every table, the Spearman correlation of
the label-free teacher agreement of the weights the run ends with (held-out training queries, no labels) with the
row's test retention of nDCG@10 (each DL row counted on DL19 and DL20 as one mean);
``spearman_gain_vs_test_retention`` the same for the agreement's rise from the run's start (read after the fact).
``real_queries_only``: whether agreement on the real held-out queries alone would rank runs better, per dataset,
against the same runs' mixed agreement: on the dev tables (against dev retention: what a choice may use) and on the
test tables. ``query_cosine``: the same for the check's mean query cosine to the teacher, on test and dev, and how
many of the runs' own choices (learning rate, kept checkpoint) it would have made otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np
from _common import REPO, decode_values, git_commit
from _report_format import SPEED_CPU_ENCODERS

from embeddistill.evaluation.significance import paired_permutation_test
from embeddistill.runtime import environment_record
from embeddistill.storage import atomic_write_json

THREE_SETS = ("scifact", "nfcorpus", "squad")  # the sets with 3 training seeds
SETS = (("scifact", "test"), ("nfcorpus", "test"), ("squad", "test"), ("msmarco-dl", "dl19"), ("msmarco-dl", "dl20"))
# The headline's students and the quality-table row each is measured by (the recipe's layer choice).
STUDENTS = {
    "mpnet-2L-asym": "mpnet-L0L11-asym",
    "minilm-asym": "minilm-asym",
    "minilm-2L-asym": "minilm-L0L5-asym",
    "minilm-sym": "minilm-sym",
}
# The command that gives each student, and how its tables' recipe stands against the library's defaults today
# (embeddistill.config.recipe: a whole named student is symmetric, 2 crops, 6 epochs, at most 2000 steps; any other
# 24 crops, 3 epochs).
RECIPES = {  # the seeds each set has are the entry's ``seeds``, read from the tables, not restated here
    "mpnet-2L-asym": "distill (the default student, teacher:0,-1): its defaults, asymmetric, 24 crops, 3 epochs",
    "minilm-asym": "--student all-MiniLM-L6-v2 --asymmetric: its defaults, 24 crops, 3 epochs",
    "minilm-2L-asym": "--student all-MiniLM-L6-v2 --student-layers 0 -1: asymmetric, its defaults, 24 crops, 3 epochs",
    "minilm-sym": "--student all-MiniLM-L6-v2: its defaults, symmetric, 2 crops, 6 epochs or at most 2000 steps, "
    "start weight 0.5 (the cap shortens DL alone, to 2000 steps of its 6 x 1,150)",
}
FIRST_LAYERS = ("mpnet-2L-asym", "minilm-2L-asym")  # the same students keeping their first two layers
OFF_THE_SHELF = "all-MiniLM-L6-v2"
METHOD = "embeddistill"
METRIC = "nDCG@10"
GENERAL = "mix"  # the tables trained with general queries mixed in
# Tables of later recipes than the plain ones, oldest first: a set that a later one holds the row on is read from that
# one alone. c8: 8 crops, 6 epochs; c24: 24 crops, 2 epochs; c24e3: today's asymmetric defaults (24 crops, 3 epochs);
# sym: today's symmetric defaults where the step cap changed them (DL: 2000 steps rather than 6 epochs).
LATER_RECIPES = ("c8", "c24", "c24e3", "sym")
DEV_SUFFIX = {
    "dev_mix": " + general queries",
    "dev_c8": " + 8 crops per document",
    "dev_c16e3": " + 16 crops per document, 3 epochs",
    "dev_c24e2": " + 24 crops per document, 2 epochs",
    "dev_c48e1": " + 48 crops per document, 1 epoch",
    "dev_rq0": " + 24 crops per document, 2 epochs (rerun)",
    "dev_rq6": " + 24 crops per document, 2 epochs, each real query 3 times an epoch",
    "dev_c24e3": " + 24 crops per document, 3 epochs",
    "dev_c24e2_lr2e-5": " + 24 crops per document, 2 epochs, encoder learning rate 2e-5",
    "dev_c24e2_lr3e-4": " + 24 crops per document, 2 epochs, encoder learning rate 3e-4",
    "dev_c24e2_pq8": " + 24 crops per document, 2 epochs, 8 perturbations per real query",
    "dev_c24e2_mix": " + 24 crops per document, 2 epochs, general queries",
    "dev_c24e5": " + 24 crops per document, 5 epochs",
    "dev_c24e3lr": " + 24 crops per document, 3 epochs, 3e-4 added to the learning-rate candidates",
    "dev_c24e5lr": " + 24 crops per document, 5 epochs, 3e-4 added to the learning-rate candidates",
}
# A table's name: its dataset, training seed, epochs where not the recipe's, and variant (for a dev table, the
# candidate: one of DEV_SUFFIX's); a name of any other form (a one-seed test of a dev candidate) is not read.
TABLE_NAME = re.compile(
    r"^quality_(?P<dataset>[a-z-]+)_s(?P<seed>\d+)(?:_e(?P<epochs>\d+))?"
    rf"(?:_(?P<variant>{'|'.join(re.escape(v) for v in ('mix', 'dev', *LATER_RECIPES, *DEV_SUFFIX))}))?\.json$"
)
GENERAL_STUDENTS = ("mpnet-2L-asym", "mpnet-L0L11-asym", "minilm-asym", "minilm-2L-asym", "minilm-L0L5-asym")


def load_tables(folder: Path) -> list[dict]:
    tables = []
    for path in sorted(folder.glob("quality_*.json")):
        match = TABLE_NAME.match(path.name)
        if match:
            table = json.loads(path.read_text(encoding="utf-8"))
            tables.append(
                {"file": path.name, "seed": int(match["seed"]), "epochs": match["epochs"], "variant": match["variant"]}
                | table
            )
    return tables


def general_tables(tables: list[dict]) -> list[dict]:
    """The tables of the general-queries recipe: the ``_mix`` ones, and DL's plain ones (its training queries are
    the general queries already)."""
    return [t for t in tables if t["variant"] == GENERAL or (t["variant"] is None and t["dataset"] == "msmarco-dl")]


def dev_candidates(folder: Path) -> dict[str, dict]:
    """Dev retention of nDCG@10 of every candidate row in the dev tables (seed 42): per set and three-set mean."""
    found: dict[str, dict[str, float]] = {}
    for table in load_tables(folder):
        suffix = DEV_SUFFIX.get(table["variant"], "")
        for key, row in table["rows"].items():
            if "/" in key:
                found.setdefault(key.split("/")[0] + suffix, {})[table["dataset"]] = row["evaluations"]["dev"][
                    "retention"
                ][METRIC]
    return {
        name: {**by_set, "mean": float(np.mean(list(by_set.values())))}
        for name, by_set in sorted(found.items())
        if len(by_set) == 3
    }


def per_query(row: dict, split: str, query_ids: list[str]) -> dict[str, float]:
    return dict(zip(query_ids, decode_values(row["per_query"][split][METRIC]), strict=True))


def collect(tables: list[dict], key: str) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """``{(dataset, split): {seed: {query: nDCG@10}}}`` of one row key across the tables."""
    found: dict = {}
    for table in tables:
        row = table["rows"].get(key)
        for dataset, split in SETS:
            if row is None or table["dataset"] != dataset or split not in row.get("per_query", {}):
                continue
            found.setdefault((dataset, split), {})[table["seed"]] = per_query(row, split, table["query_ids"][split])
    return found


def five_set_means(found: dict) -> dict[int, float] | None:
    """Per seed, the mean over the five sets of the mean nDCG@10; a set that lacks a seed (DL) lends it the mean of
    the seeds it has, so that each of its seeds weighs alike in the seed average."""
    if any(s not in found for s in SETS):
        return None
    seeds = sorted({seed for by_seed in found.values() for seed in by_seed})
    set_means = {s: {seed: float(np.mean(list(scores.values()))) for seed, scores in found[s].items()} for s in SETS}
    return {
        seed: float(np.mean([by_seed.get(seed, np.mean(list(by_seed.values()))) for by_seed in set_means.values()]))
        for seed in seeds
    }


def seed_averaged(by_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    queries = next(iter(by_seed.values()))
    return {q: float(np.mean([scores[q] for scores in by_seed.values()])) for q in queries}


def paired_difference(ours: dict, theirs: dict, rounds: int) -> tuple[float, float]:
    """Two rows' per-query nDCG@10 by seed (``collect``'s values for one set), each averaged over its seeds: the mean
    per-query difference and its paired permutation p."""
    ours, theirs = seed_averaged(ours), seed_averaged(theirs)
    return float(np.mean([ours[q] - theirs[q] for q in ours])), paired_permutation_test(ours, theirs, rounds=rounds)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down, kept monotone)."""
    order = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted


def spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    rank_x, rank_y = (np.argsort(np.argsort(v)).astype(float) for v in (x, y))
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


def label_free_points(tables: list[dict]) -> list[dict]:
    """Every trained row: its kept label-free agreement and its test retention of nDCG@10."""
    points = []
    for table in tables:
        for key, row in table["rows"].items():
            validation = row.get("training", {}).get("validation")
            if not validation or "/" not in key:
                continue
            kept = next(v for v in validation["history"] if v["step"] == validation["kept_step"])
            # A student averaged with its start (--start-weight) is scored as averaged: its agreement is that too.
            final = validation.get("merged") or kept
            start = validation["history"][0][validation["metric"]]
            retention = [e["retention"][METRIC] for e in row["evaluations"].values()]
            points.append(
                {
                    "table": table["file"],
                    "row": key,
                    "agreement": final[validation["metric"]],
                    "agreement_gain": final[validation["metric"]] - start,
                    "agreement_real": final.get(f"{validation['metric']}_real"),
                    "query_cosine": final.get("query_cosine"),
                    "test_retention": float(np.mean(retention)),
                }
            )
    return points


def within_dataset(points: list[dict], key: str = "agreement") -> dict[str, float | None]:
    """Spearman per dataset (tables of one dataset, any seed): what choosing settings for one corpus relies on.
    ``key`` names the agreement (``agreement_real``: the real held-out queries alone; points without it are left out).
    A dev table's ``test_retention`` is its dev retention."""
    by_dataset: dict[str, list[dict]] = {}
    for point in points:
        if point[key] is not None:
            by_dataset.setdefault(TABLE_NAME.match(point["table"])["dataset"], []).append(point)
    return {
        dataset: spearman([p[key] for p in group], [p["test_retention"] for p in group])
        for dataset, group in sorted(by_dataset.items())
    }


def real_queries_only(points: list[dict]) -> dict[str, dict]:
    """Within-dataset Spearman of the real-query agreement and of the mixed one, on the runs that have both."""
    both = [p for p in points if p["agreement_real"] is not None]
    return {"real": within_dataset(both, "agreement_real"), "mixed": within_dataset(both)}


def choices_that_differ(tables: list[dict]) -> dict[str, dict[str, int]]:
    """How often choosing by ``query_cosine`` instead of agreement would have changed a run's own choices: the
    learning rate of ``--learning-rate auto`` and the kept checkpoint."""
    counts = {"learning_rate": {"runs": 0, "differ": 0}, "kept_checkpoint": {"runs": 0, "differ": 0}}
    for table in tables:
        for row in table["rows"].values():
            training = row.get("training", {})
            for kind, options, value in (
                ("learning_rate", (training.get("learning_rate_search") or {}).get("trials"), "learning_rate"),
                ("kept_checkpoint", (training.get("validation") or {}).get("history"), "step"),
            ):
                if options:
                    by_agreement = max(options, key=lambda o: o["agreement_nDCG@10"])[value]
                    by_cosine = max(options, key=lambda o: o["query_cosine"])[value]
                    counts[kind]["runs"] += 1
                    counts[kind]["differ"] += int(by_agreement != by_cosine)
    return counts


def query_cosine_signal(points: list[dict], dev_points: list[dict], tables: list[dict]) -> dict:
    """The other label-free number every check records, the mean cosine between the student's and the teacher's
    query embeddings, against test (and dev) retention as agreement is; read after the fact, choosing nothing."""
    values = [p for p in points if p["query_cosine"] is not None]
    dev = [p for p in dev_points if p["query_cosine"] is not None]
    return {
        "spearman_vs_test_retention": spearman(
            [p["query_cosine"] for p in values], [p["test_retention"] for p in values]
        ),
        "runs": len(values),
        "spearman_within_dataset": within_dataset(values, "query_cosine"),
        "dev": {
            "spearman_vs_dev_retention": spearman([p["query_cosine"] for p in dev], [p["test_retention"] for p in dev]),
            "agreement_spearman_vs_dev_retention": spearman(
                [p["agreement"] for p in dev], [p["test_retention"] for p in dev]
            ),
            "runs": len(dev),
            "spearman_within_dataset": within_dataset(dev, "query_cosine"),
        },
        "choices_that_differ": choices_that_differ(tables),
    }


@dataclasses.dataclass
class Reference:
    """What every student is measured against, and the paired tests collected for one Holm correction."""

    teacher_mean: float
    shelf_found: dict
    shelf_retention: float | None
    speed: dict
    rounds: int
    # (test name, the student entry it belongs to, split, mean difference, p)
    tests: list[tuple[str, dict, str, float, float]] = dataclasses.field(default_factory=list)


def three_set_retention_by_seed(found: dict, teacher: dict) -> dict[str, float]:
    """Per seed held on all three, one row's mean retention of nDCG@10 over SciFact, NFCorpus and SQuAD (``found`` as
    ``collect`` gives it; ``teacher`` the teacher's mean per set)."""
    sets = [(d, "test") for d in THREE_SETS]
    if any(x not in found for x in sets):
        return {}
    seeds = sorted(set.intersection(*(set(found[x]) for x in sets)))
    return {
        str(seed): float(np.mean([np.mean(list(found[x][seed].values())) / teacher[x] for x in sets])) for seed in seeds
    }


def third_epoch_against_two(tables: list[dict], rounds: int) -> dict:
    """For each student rerun at 3 epochs: per set, its seed-averaged per-query nDCG@10 at 3 epochs (c24e3) against
    2 (c24), on the seeds both hold, with a paired permutation p and Holm over these tests alone; and each seed's
    three-set retention under both, to set the gain against the spread of the seeds."""
    found, tests = {}, {}
    teacher = {
        x: float(np.mean(list(seed_averaged(by_seed).values()))) for x, by_seed in collect(tables, "teacher").items()
    }
    for name, row in STUDENTS.items():
        three, two = (collect([t for t in tables if t["variant"] == v], f"{row}/{METHOD}") for v in ("c24e3", "c24"))
        if not three:
            continue
        by_set = {}
        for d, s in SETS:
            seeds = sorted(set(three.get((d, s), {})) & set(two.get((d, s), {})))
            if seeds:
                ours = {seed: three[(d, s)][seed] for seed in seeds}
                theirs = {seed: two[(d, s)][seed] for seed in seeds}
                difference, tests[f"{name}|{d}/{s}"] = paired_difference(ours, theirs, rounds)
                by_set[f"{d}/{s}"] = {"seeds": seeds, "mean_difference": difference, "p": tests[f"{name}|{d}/{s}"]}
        found[name] = {
            "vs_2_epochs": by_set,
            "three_set_retention_by_seed": {
                "3 epochs": three_set_retention_by_seed(three, teacher),
                "2 epochs": three_set_retention_by_seed(two, teacher),
            },
        }
    for test, adjusted in holm(tests).items():
        name, split = test.split("|")
        found[name]["vs_2_epochs"][split]["p_holm"] = adjusted
    return found


def student_entry(
    tables: list[dict], row: str, label: str, ref: Reference, newer: dict[str, list[dict]] | None = None
) -> dict:
    """One student's seeds, per-set means, five-set retention and CPU speed-up; its paired tests against the
    off-the-shelf model go into ``ref.tests`` under ``label``, to be Holm-corrected with every other one.

    ``newer`` maps a table variant to its tables, oldest first: a set that a variant holds the row on is taken from
    the last such variant alone (``tables_by_set`` says which)."""
    found = collect(tables, f"{row}/{METHOD}")
    source: dict = {}
    for variant, variant_tables in (newer or {}).items():
        variant_found = collect(variant_tables, f"{row}/{METHOD}")
        found.update(variant_found)
        source.update(dict.fromkeys(variant_found, variant))
    means = five_set_means(found)
    entry: dict = {
        "row": row,
        "tables_by_set": {f"{d}/{s}": source.get((d, s), "plain") for d, s in SETS},
        "seeds": {f"{d}/{s}": sorted(found.get((d, s), {})) for d, s in SETS},
        "nDCG@10": {
            f"{d}/{s}": float(np.mean([np.mean(list(v.values())) for v in found[(d, s)].values()]))
            for d, s in SETS
            if (d, s) in found
        },
    }
    if means:
        retentions = [m / ref.teacher_mean for m in means.values()]
        entry.update(
            retention_mean=float(np.mean(retentions)),
            retention_sd=float(statistics.stdev(retentions)) if len(retentions) > 1 else 0.0,
            retention_by_seed=dict(zip(map(str, means), retentions, strict=True)),
            beats_off_the_shelf=bool(ref.shelf_retention is not None and np.mean(retentions) > ref.shelf_retention),
        )
    encoder = ref.speed.get("encoders", {}).get(SPEED_CPU_ENCODERS[row])
    entry["cpu_speedup_batch1"] = encoder["speedup_vs_teacher"]["batch1_ms"] if encoder else None
    for d, s in SETS:
        if (d, s) in found and (d, s) in ref.shelf_found:
            difference, p = paired_difference(found[(d, s)], ref.shelf_found[(d, s)], ref.rounds)
            ref.tests.append((f"{label}|{d}/{s}", entry, f"{d}/{s}", difference, p))
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default=str(REPO / "benchmarks" / "results" / "recipe"))
    parser.add_argument("--dev-tables", default=str(REPO / "benchmarks" / "results" / "recipe_dev"))
    parser.add_argument("--speed-cpu", default=str(REPO / "benchmarks" / "results" / "speed_cpu.json"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "headline.json"))
    parser.add_argument("--permutation-rounds", type=int, default=10000)
    args = parser.parse_args(argv)
    tables = load_tables(Path(args.tables))
    default_tables = [t for t in tables if t["variant"] is None]
    later_tables = {variant: [t for t in tables if t["variant"] == variant] for variant in LATER_RECIPES}
    speed = json.loads(Path(args.speed_cpu).read_text()) if Path(args.speed_cpu).exists() else {}
    teacher = five_set_means(collect(default_tables, "teacher"))
    if teacher is None:
        raise SystemExit(f"{args.tables}: no teacher row on every one of the five sets")
    teacher_mean = teacher[min(teacher)]
    shelf_found = collect(default_tables, OFF_THE_SHELF)
    shelf = five_set_means(shelf_found)
    shelf_retention = shelf[min(shelf)] / teacher_mean if shelf else None
    ref = Reference(teacher_mean, shelf_found, shelf_retention, speed, args.permutation_rounds)
    students = {name: student_entry(default_tables, row, name, ref, later_tables) for name, row in STUDENTS.items()}
    for name, entry in students.items():
        entry["recipe"] = RECIPES[name]
    first_layers = {row: student_entry(default_tables, row, f"{row} (first layers)", ref) for row in FIRST_LAYERS}
    general = {
        name: student_entry(general_tables(tables), name, f"{name} + general queries", ref) for name in GENERAL_STUDENTS
    }
    # Today's defaults on the three BEIR-layout sets, DL as the earlier recipe trained it: what the DL rerun changed.
    # Its own Reference: these tests repeat the headline's and stay out of its Holm correction.
    beir_later = {v: [t for t in ts if t["dataset"] != "msmarco-dl"] for v, ts in later_tables.items()}
    aside = dataclasses.replace(ref, tests=[])
    dl_earlier = {name: student_entry(default_tables, row, name, aside, beir_later) for name, row in STUDENTS.items()}
    adjusted = holm({name: p for name, _, _, _, p in ref.tests})
    for name, entry, split, difference, p in ref.tests:
        entry.setdefault("vs_off_the_shelf", {})[split] = {
            "mean_difference": difference,
            "p": p,
            "p_holm": adjusted[name],
        }
    points = label_free_points(tables)
    dev_tables = load_tables(Path(args.dev_tables))
    dev_points = label_free_points(dev_tables)
    headline = {
        "command": "python benchmarks/headline.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(),
        "tables": [t["file"] for t in tables],
        "teacher": {"mean_nDCG@10": teacher_mean},
        "off_the_shelf": {
            OFF_THE_SHELF: {"mean_nDCG@10": shelf[min(shelf)] if shelf else None, "retention_mean": shelf_retention}
        },
        "students": students,
        "first_layers": first_layers,
        "with_general_queries": {
            "recipe": "the earlier defaults (2 crops per document) + --extra-queries (13,817 MS MARCO dev-small and "
            "eval-small queries, no labels); with them, dev chose the teacher's layers 0 and 11 for the 2-layer mpnet "
            "student (mpnet-L0L11-asym) and MiniLM's first two layers for the 2-layer MiniLM one (minilm-2L-asym)",
            "students": general,
            "dev": dev_candidates(Path(args.dev_tables)),
        },
        "third_epoch": {
            "recipe": "today's defaults (24 crops, 3 epochs; c24e3 tables) against 24 crops and 2 epochs (c24), for "
            "the students rerun at 3 epochs; the same seeds, data and settings",
            "students": third_epoch_against_two(tables, args.permutation_rounds),
        },
        "dl_at_earlier_recipe": {
            "recipe": "each set but DL19 and DL20 as in students; those two from the plain tables (2 crops per "
            "passage, 6 epochs; the symmetric MiniLM 1 epoch, seed 42), as the headline read them before DL was "
            "rerun at 24 crops",
            "students": {
                name: {k: entry.get(k) for k in ("tables_by_set", "nDCG@10", "retention_mean", "retention_sd")}
                for name, entry in dl_earlier.items()
            },
        },
        "label_free": {
            "metric": "agreement_nDCG@10 on held-out training queries of the weights the run ends with (the kept "
            "checkpoint, averaged with the start where --start-weight says so)",
            "spearman_vs_test_retention": spearman(
                [p["agreement"] for p in points], [p["test_retention"] for p in points]
            ),
            "runs": len(points),
            "spearman_within_dataset": within_dataset(points),
            # Read after the fact, not used to choose anything: the rise of agreement from the run's start, which
            # takes out how easy agreement is on each corpus (within one run's choices it ranks as agreement does).
            "spearman_gain_vs_test_retention": spearman(
                [p["agreement_gain"] for p in points], [p["test_retention"] for p in points]
            ),
            "real_queries_only": {"dev": real_queries_only(dev_points), "test": real_queries_only(points)},
            "query_cosine": query_cosine_signal(points, dev_points, tables + dev_tables),
            "points": points,
        },
        "significance": "paired permutation test on per-query nDCG@10 averaged over seeds, Holm over all tests here",
        "git_commit": git_commit(),
        **environment_record(),
    }
    atomic_write_json(args.out, headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
