"""The quickstart: distil all-MiniLM-L6-v2 into its bottom and top layers on SciFact and print the side-by-side table.

    python benchmarks/quickstart.py            # writes runs/quickstart/ and benchmarks/results/quickstart.json
    python benchmarks/quickstart.py --epochs 2 # any further argument goes to `embeddistill distill`

Offline machines get the teacher from ``../shared/models/get-models minilm``; elsewhere the hub name is used.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time

from _common import REPO, git_commit, local_model


def main() -> int:
    teacher = local_model("minilm", "sentence-transformers/all-MiniLM-L6-v2")
    out = REPO / "runs" / "quickstart"
    command = [
        "embeddistill",
        "distill",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        "--teacher",
        teacher,
        "--out",
        str(out),
        *sys.argv[1:],
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    if {"-h", "--help"} & set(sys.argv[1:]):  # distill printed its options and trained nothing
        return 0
    wall = time.perf_counter() - started
    summary = json.loads((out / "metrics.json").read_text())
    result = {
        "command": "python benchmarks/quickstart.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "git_commit": git_commit(),
        "wall_seconds_including_teacher_cache": wall,
        **summary,
    }
    target = REPO / "benchmarks" / "results" / "quickstart.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nquickstart finished in {wall / 60:.1f} min; results in {target.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
