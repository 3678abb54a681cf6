"""A student against the model its user would otherwise serve, in one ``distill`` run (``--baselines``).

all-mpnet-base-v2 distilled into an asymmetric all-MiniLM-L6-v2 query encoder (``--asymmetric``; the library's
defaults otherwise), or with ``--default-recipe`` into what ``--student all-MiniLM-L6-v2`` gives with no other flag
(a whole named student: symmetric, 2 crops per document, 6 epochs or at most 2000 steps, averaged with its
start). The run scores all-MiniLM-L6-v2 as it comes beside the student (``--baselines auto``: the student's own
model, searching its own index of the corpus) and says which is better on the test queries.

    python benchmarks/baselines_check.py     # SciFact; writes runs/baselines_check/ and the result file
    python benchmarks/baselines_check.py --dataset ../shared/datasets/squad-dev --group-split \
        --out benchmarks/results/baselines_squad.json
    python benchmarks/baselines_check.py --dataset ../shared/datasets/nfcorpus --out benchmarks/results/x.json
    python benchmarks/baselines_check.py --default-recipe --out benchmarks/results/baselines_scifact_default.json

Any further argument goes to ``embeddistill distill``. Offline machines get the models from
``../shared/models/get-models``; elsewhere the hub names are used.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, git_commit, local_model
from _splits import write_group_split

from embeddistill.pipeline.summary import RunSummary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "datasets" / "scifact"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "baselines_scifact.json"))
    parser.add_argument(
        "--group-split",
        action="store_true",
        help="train and test on halves of the test split's queries divided by article (SQuAD-dev; seed 42, as the "
        "quality tables do), written to runs/baselines_check_data",
    )
    parser.add_argument("--teacher", default="", help="default: all-mpnet-base-v2 (get-models, else the hub)")
    parser.add_argument("--student", default="", help="default: all-MiniLM-L6-v2 (get-models, else the hub)")
    parser.add_argument(
        "--default-recipe", action="store_true", help="no --asymmetric: the student's own recipe (symmetric for it)"
    )
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "baselines_check"), help="the distill run's folder")
    args, extra = parser.parse_known_args()
    teacher = args.teacher or local_model("mpnet", "sentence-transformers/all-mpnet-base-v2")
    student = args.student or local_model("minilm", "sentence-transformers/all-MiniLM-L6-v2")
    run = Path(args.run_dir)
    dataset = args.dataset
    if args.group_split:
        dataset = str(run.parent / "baselines_check_data")
        write_group_split(args.dataset, dataset, split="test", train_fraction=0.5, seed=42)
    command = [sys.executable, "-m", "embeddistill.cli", "distill", "--teacher", teacher, "--student", student]
    command += ([] if args.default_recipe else ["--asymmetric"]) + ["--dataset", dataset]
    command += ["--max-seq-length", "256", "--out", str(run), "--overwrite", *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    metrics = json.loads((run / "metrics.json").read_text())
    result = {
        "command": "python benchmarks/baselines_check.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "git_commit": git_commit(),
        "distill_command": " ".join(["embeddistill", *command[3:]]),
        "wall_seconds": time.perf_counter() - started,
        "verdicts": [sentence for _, sentence in RunSummary.from_dict(metrics).versus_baselines()],
        **metrics,
    }
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
