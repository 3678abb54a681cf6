"""Query generation: what generated queries add to distillation, and what each generator costs.

Two parts, each merged into the same JSON file (rows already there are kept, so parts and datasets can run on
different machines and a rerun skips what is done):

    # retention with no / cheap / LM / both kinds of generated queries (same seed, student and epochs),
    # plus a sparse-data run with 10% of the labelled training queries (SciFact)
    python benchmarks/querygen.py train --teacher PATH --dataset scifact \
        --lm-queries runs/querygen/scifact-lm.jsonl --sparse-fraction 0.1 --out benchmarks/results/querygen.json
    python benchmarks/querygen.py train --teacher PATH --dataset nfcorpus \
        --lm-queries runs/querygen/nfcorpus-lm.jsonl --out benchmarks/results/querygen.json

    # queries per second of each generator on this machine
    python benchmarks/querygen.py throughput --lm-model PATH --out benchmarks/results/querygen.json

LM query files come from ``embeddistill generate-queries --generator lm`` (they name each query's source
document, so the pipeline anchors and round-trips them like its own generated queries).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import git_commit
from ablation import run_ours

from embeddistill.data import RetrievalDataset
from embeddistill.evaluation.significance import paired_permutation_test
from embeddistill.querygen import make_generators
from embeddistill.runtime import environment_record
from embeddistill.storage import atomic_write_json

NO_CHEAP = {"crops_per_document": 0, "perturbations_per_query": 0}
METRICS = ("nDCG@10", "RR@10", "R@100")


def variants(lm_queries: str) -> dict[str, dict]:
    """Training-query mixes compared on one dataset; everything else is the library's defaults.

    'cheap, as many as lm' samples the cheap queries down to the LM file's size, so that the two generators
    are also compared query for query; the round-trip row shows the optional filter (top 10, not tuned).
    """
    with open(lm_queries, encoding="utf-8") as handle:
        lm_count = sum(1 for line in handle if line.strip())
    return {
        "none": dict(NO_CHEAP),
        "cheap": {},
        "lm": {**NO_CHEAP, "extra_queries": [lm_queries]},
        "cheap+lm": {"extra_queries": [lm_queries]},
        "cheap, as many as lm": {"max_generated": lm_count},
        "cheap+lm, round-trip top 10": {"extra_queries": [lm_queries], "roundtrip_top_k": 10},
    }


def load_results(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def train_dataset(args: argparse.Namespace) -> None:
    out = Path(args.out)
    results = load_results(out)
    section = results.setdefault(args.dataset, {"rows": {}})
    base = {"teacher": args.teacher, "dataset": args.dataset_path or args.dataset, "epochs": args.epochs}
    base["latency_repeats"] = 1
    plan = dict(variants(args.lm_queries))
    if args.sparse_fraction:
        sparse = {"train_query_fraction": args.sparse_fraction}
        plan[f"sparse {args.sparse_fraction:g}: none"] = {**NO_CHEAP, **sparse}
        plan[f"sparse {args.sparse_fraction:g}: cheap+lm"] = {**sparse, "extra_queries": [args.lm_queries]}
    with tempfile.TemporaryDirectory() as scratch:
        for name, options in plan.items():
            if name in section["rows"]:
                print(f"{args.dataset} / {name}: already measured, skipped", flush=True)
                continue
            row = run_ours(base, options, Path(scratch) / f"run{len(section['rows'])}")
            section["teacher"] = row.pop("teacher")
            row["options"] = {k: v if k != "extra_queries" else [Path(p).name for p in v] for k, v in options.items()}
            section["rows"][name] = row
            print(f"{args.dataset} / {name}: {row['metrics']} {row['training_queries']}", flush=True)
            summarise(section, args.sparse_fraction)
            results[args.dataset] = section
            results.setdefault("runs", {})[args.dataset] = provenance(sys.argv)
            atomic_write_json(out, results)  # after every row: a crash loses at most the row in progress


def summarise(section: dict, sparse_fraction: float) -> None:
    """Retention of every row, p-values against 'none' (same queries, paired), and the headline figures."""
    rows, teacher = section["rows"], section["teacher"]
    for row in rows.values():
        row["retention"] = {m: row["metrics"][m] / teacher[m] for m in METRICS}
    for name, row in rows.items():
        # Each row against the run without generated queries on the same labelled queries (full or sparse).
        baseline = rows.get(name.split(": ")[0] + ": none" if name.startswith("sparse") else "none")
        if baseline is not None and baseline is not row:
            row["p_value_vs_none"] = {
                m: paired_permutation_test(row["per_query"][m], baseline["per_query"][m]) for m in METRICS
            }
    if "lm" in rows and "cheap, as many as lm" in rows:  # the two generators, query for query
        lm, cheap = rows["lm"], rows["cheap, as many as lm"]
        section["lm_vs_cheap_same_count"] = {
            "nDCG@10": [lm["metrics"]["nDCG@10"], cheap["metrics"]["nDCG@10"]],
            "p_value": paired_permutation_test(lm["per_query"]["nDCG@10"], cheap["per_query"]["nDCG@10"]),
        }
    if "cheap+lm" in rows:
        section["with_generated"] = {"variant": "cheap+lm", "retention": rows["cheap+lm"]["retention"]}
    if "none" in rows:
        section["without_generated"] = {"variant": "none", "retention": rows["none"]["retention"]}
    without, with_ = (rows.get(f"sparse {sparse_fraction:g}: {kind}") for kind in ("none", "cheap+lm"))
    if without and with_ and "none" in rows and "cheap+lm" in rows:
        # How much of the gap between sparse-and-no-generation and the full-data result generation closes.
        full = rows["cheap+lm"]["metrics"]["nDCG@10"]
        gap = full - without["metrics"]["nDCG@10"]
        section["sparse"] = {
            "train_query_fraction": sparse_fraction,
            "retention_without_generated": without["retention"]["nDCG@10"],
            "retention_with_generated": with_["retention"]["nDCG@10"],
            "full_data_retention_with_generated": rows["cheap+lm"]["retention"]["nDCG@10"],
            "gap_recovered": (with_["metrics"]["nDCG@10"] - without["metrics"]["nDCG@10"]) / gap if gap else None,
        }


def measure_throughput(args: argparse.Namespace) -> None:
    """Queries per second of each generator, on the first documents (and training queries) of a dataset."""
    dataset = RetrievalDataset.load(args.dataset_path or args.dataset)
    documents = dict(list(dataset.corpus.items())[: args.documents])
    queries = dataset.split_queries("train")
    rows = {}
    for name in ("crop", "perturb", "lm"):
        if name == "lm" and not args.lm_model:
            continue
        sources = args.lm_documents if name == "lm" else args.documents
        lm_options = {"batch_size": args.lm_batch_size, "dtype": args.lm_dtype or None, "max_document_words": 120}
        (generator,) = make_generators([name], 1, args.lm_model, None, lm_options if name == "lm" else None)
        if name == "lm":
            generator._load()  # loading is a one-time cost, not part of the rate
        chosen = dict(list(documents.items())[:sources])
        started = time.perf_counter()
        made = list(generator.generate(chosen, queries, seed=0))
        seconds = time.perf_counter() - started
        rows[name] = {"queries": len(made), "seconds": seconds, "queries_per_second": len(made) / seconds}
        if name == "lm":
            rows[name]["settings"] = {**lm_options, "model": Path(args.lm_model).name}
        print(name, rows[name], flush=True)
    out = Path(args.out)
    results = load_results(out)
    results["throughput"] = {"dataset": args.dataset, "generators": rows, **provenance(sys.argv)}
    atomic_write_json(out, results)


def provenance(argv: list[str]) -> dict:
    return {
        "command": "python benchmarks/querygen.py " + " ".join(argv[1:]),
        "date": datetime.date.today().isoformat(),
        "git_commit": git_commit(),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else environment_record(())["machine"]["cpu"],
        "cpu_threads": torch.get_num_threads(),
        "versions": environment_record(("torch",))["versions"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="retention with and without generated queries")
    train.add_argument("--teacher", required=True)
    train.add_argument("--dataset", required=True, help="the dataset's name (the key in the results)")
    train.add_argument("--dataset-path", default="", help="its folder, when not found by name")
    train.add_argument("--lm-queries", required=True, help="LM-generated query file (embeddistill generate-queries)")
    train.add_argument("--sparse-fraction", type=float, default=0.0, help="also run with this fraction of labels")
    train.add_argument("--epochs", type=int, default=6)
    train.add_argument("--out", required=True)
    train.set_defaults(handler=train_dataset)
    throughput = commands.add_parser("throughput", help="queries per second of each generator")
    throughput.add_argument("--dataset", default="scifact")
    throughput.add_argument("--dataset-path", default="")
    throughput.add_argument("--documents", type=int, default=2000, help="documents for the cheap generators")
    throughput.add_argument("--lm-documents", type=int, default=48, help="documents for the LM generator")
    throughput.add_argument("--lm-model", default="", help="causal LM / doc2query model or .gguf (skip LM if empty)")
    throughput.add_argument("--lm-batch-size", type=int, default=16)
    throughput.add_argument("--lm-dtype", default="bfloat16")
    throughput.add_argument("--out", required=True)
    throughput.set_defaults(handler=measure_throughput)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.handler(args)


if __name__ == "__main__":
    main()
