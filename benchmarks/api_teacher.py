"""The same distillation from a local teacher and from that teacher behind an HTTP ``/v1/embeddings`` endpoint.

    python benchmarks/api_teacher.py [--teacher-model minilm|mpnet] [EXTRA DISTILL FLAGS]
    # -> benchmarks/results/api_teacher.json

SciFact in the quickstart's setting (``configs/quickstart.yaml``): the teacher (the quickstart's all-MiniLM-L6-v2,
or all-mpnet-base-v2 with ``--teacher-model mpnet``) once loaded locally, once served by ``embeddistill serve
--model TEACHER`` (no index: embeddings only) on a loopback port and called as an API teacher. An API lends no
layers, so both runs build the student from the local all-MiniLM-L6-v2 (its first 2 layers; projected into the
teacher's 768 dimensions for mpnet). Then the HTTP run once more, into a fresh folder, with the same cache: it must
send no text (every embedding comes from the teacher cache). The teacher cache is the default one
(``$EMBEDDISTILL_CACHE``), so the local run reuses what the quickstart cached.

Extra flags go to every run and are recorded (``setting``); on 2 shared CPU cores the full quickstart schedule
does not fit, so the committed result names the shorter one it ran (e.g. ``--max-steps 300``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from _common import REPO, git_commit, local_model

PORT = 18765  # fixed, so that the endpoint's cache key (its URL) is the same from one run of this script to the next
OUT = REPO / "runs" / "api_teacher"
TEACHERS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "mpnet": "sentence-transformers/all-mpnet-base-v2"}


def distill(name: str, teacher_args: list[str], extra: list[str]) -> dict:
    student = local_model("minilm", "sentence-transformers/all-MiniLM-L6-v2")
    command = [
        sys.executable, "-m", "embeddistill.cli", "distill", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--student", student, "--student-layers", "2", "--out", str(OUT / name), "--overwrite", *teacher_args,
        *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True)
    summary = json.loads((OUT / name / "metrics.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - started
    return summary


def start_server(teacher: str) -> subprocess.Popen:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", PORT)) == 0:
            raise SystemExit(f"port {PORT} is taken: stop what listens there")
    command = [sys.executable, "-m", "embeddistill.cli", "serve", "--model", teacher, "--port", str(PORT)]
    server = subprocess.Popen([*command, "--max-queries", "256"], env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            raise SystemExit("embeddistill serve exited")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2):
                return server
        except OSError:
            if time.monotonic() > deadline:
                server.terminate()
                raise SystemExit("embeddistill serve did not come up") from None
            time.sleep(1)


def picked(summary: dict) -> dict:
    keys = ("retention", "teacher", "student", "training_queries", "timings", "wall_seconds", "teacher_api")
    return {key: summary[key] for key in keys if key in summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-model", choices=sorted(TEACHERS), default="minilm")
    parser.add_argument(
        "--reuse-local", action="store_true", help="take the local run from runs/api_teacher/local (same flags)"
    )
    args, extra = parser.parse_known_args()
    teacher = local_model(args.teacher_model, TEACHERS[args.teacher_model])
    if args.reuse_local:
        local = json.loads((OUT / "local" / "metrics.json").read_text())
    else:
        local = distill("local", ["--teacher", teacher], extra)
    server = start_server(teacher)
    try:
        url = ["--teacher", f"http://127.0.0.1:{PORT}/v1", "--teacher-api-input-type"]
        http = distill("http", url, extra)
        rerun = distill("http-rerun", url, [*extra, "--max-steps", "1"])  # only the teacher phase matters here
    finally:
        server.terminate()
        server.wait(30)
    api, again = http["teacher_api"], rerun["teacher_api"]
    result = {
        "command": "python benchmarks/api_teacher.py " + " ".join(sys.argv[1:]),
        "git_commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "setting": {
            "config": "configs/quickstart.yaml",
            "dataset": "scifact",
            "teacher": TEACHERS[args.teacher_model],
            "student": "all-MiniLM-L6-v2, first 2 layers",
            "extra_flags": extra,
            "local_run_reused": args.reuse_local,
        },  # fmt: skip
        "local": picked(local),
        "http": {
            **picked(http),
            "requests": api["requests"],
            "texts_sent": api["texts_sent"],
            "wait_seconds": api["wait_seconds"],
            "cache_hits_on_rerun": again["cache_hits"],
            "texts_sent_on_rerun": again["texts_sent"],
            "requests_on_rerun": again["requests"],
        },
        "retention_difference_points": {
            metric: 100 * (http["retention"][metric] - value) for metric, value in local["retention"].items()
        },
    }
    target = REPO / "benchmarks" / "results" / "api_teacher.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("retention_difference_points", "setting")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
