"""Choose training defaults on held-out *training* queries, never on a test split.

Each setting in the grid is a full ``distill`` run with ``dev_fraction`` of the training queries held out as
the evaluation set; the result is the student's nDCG@10 retention on those dev queries.

    python benchmarks/choose_defaults.py --teacher PATH --datasets scifact nfcorpus \
        --grid '{"learning_rate": [2e-4, 5e-4]}' --out benchmarks/results/defaults_dev.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import sys

import torch
from _common import git_commit

from embeddistill.config import DistillConfig
from embeddistill.pipeline import distill
from embeddistill.runtime import environment_record
from embeddistill.storage import atomic_write_json


def grid_points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def run_name(point: dict) -> str:
    """A folder name for one grid point, e.g. ``student=teacher_0_5``."""
    return "-".join(f"{key}={value}" for key, value in point.items()).replace(":", "_").replace(",", "_") or "base"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--datasets", nargs="+", default=["scifact"])
    parser.add_argument("--base", default="{}", help="JSON options shared by every run")
    parser.add_argument("--grid", default="{}", help="JSON {option: [values]}; every combination is run")
    parser.add_argument("--points", default="[]", help="JSON list of extra option dicts, run as given")
    parser.add_argument("--dev-fraction", type=float, default=0.2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    points = grid_points(json.loads(args.grid)) + json.loads(args.points)
    results = []
    for dataset in args.datasets:
        for point in points or [{}]:
            options = {
                "teacher": args.teacher,
                "dataset": dataset,
                "dev_fraction": args.dev_fraction,
                "latency_repeats": 3,
                "out": f"runs/choose/{dataset}/{run_name(point)}",  # a folder per run: none is overwritten
                **json.loads(args.base),
                **point,
            }
            summary = distill(DistillConfig.from_dict(options))
            row = {
                "dataset": dataset,
                "options": point,
                "teacher_nDCG@10": summary.teacher.metrics["nDCG@10"],
                "student_nDCG@10": summary.student.metrics["nDCG@10"],
                "retention_nDCG@10": summary.retention["nDCG@10"],
                "train_seconds": summary.timings["train_seconds"],
            }
            print(json.dumps(row), flush=True)
            results.append(row)
            write_results(args, results)


def write_results(args: argparse.Namespace, results: list[dict]) -> None:
    atomic_write_json(
        args.out,
        {
            "command": "python benchmarks/choose_defaults.py "
            + " ".join(f"'{a}'" if " " in a else a for a in sys.argv[1:]),
            "date": datetime.date.today().isoformat(),
            "git_commit": git_commit(),
            "device": (
                torch.cuda.get_device_name() if torch.cuda.is_available() else environment_record(())["machine"]["cpu"]
            ),
            "dev_fraction": args.dev_fraction,
            "base": json.loads(args.base),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
