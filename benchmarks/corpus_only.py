"""Corpus-only distillation: a user with nothing but ``corpus.jsonl`` (no queries, no labels) runs the default command.

    python benchmarks/corpus_only.py --datasets scifact nfcorpus squad --out benchmarks/results/corpus_only.json

For each dataset this writes a folder holding only the corpus, runs ``embeddistill distill --teacher T --dataset
FOLDER`` with the library's defaults (generated queries only; ``--learning-rate auto`` and the best checkpoint
chosen by the label-free check), and only then scores teacher and student with the dataset's test qrels, which
the run never saw. SQuAD's test questions are the article split of ``benchmarks/quality.py`` (seed 42). The
student is asymmetric, so it searches the teacher's own index (the teacher cache already holds it).
Defaults: the quickstart pair, all-MiniLM-L6-v2 into ``teacher:0,-1`` (the library's default student).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

from _common import REPO, git_commit, local_model
from _splits import write_group_split
from sentence_transformers import SentenceTransformer

from embeddistill.cli import main as cli
from embeddistill.data import RetrievalDataset, load_qrels, resolve_dataset
from embeddistill.evaluation.metrics import evaluate_embeddings
from embeddistill.models.students import QueryEncoder
from embeddistill.models.teachers import DualEncoderTeacher
from embeddistill.runtime import environment_record
from embeddistill.serving.indexing import FlatIndex
from embeddistill.storage import atomic_write_json

SOURCES = {"scifact": "scifact", "nfcorpus": "nfcorpus", "squad": "squad-dev"}
METRICS = ["nDCG@10", "RR@10", "R@100"]


def labelled_folder(name: str, work: Path) -> Path:
    """The folder whose test qrels score the run (SQuAD: split by article, as the quality tables do)."""
    source = resolve_dataset(SOURCES[name])
    if name != "squad":
        return source
    write_group_split(source, work / "squad-split", split="test", train_fraction=0.5, seed=42)
    return work / "squad-split"


def corpus_only_folder(labelled: Path, work: Path) -> Path:
    folder = work / "corpus-only"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_bytes((labelled / "corpus.jsonl").read_bytes())
    return folder


def score(args, labelled: Path, student_folder: Path) -> dict:
    """Teacher and student nDCG@10 etc. on the test split: the student's queries in the teacher's index."""
    dataset = RetrievalDataset.load(labelled)
    qrels = load_qrels(labelled / "qrels" / "test.tsv")
    query_ids = sorted(q for q in qrels if q in dataset.queries)
    texts = [dataset.queries[q] for q in query_ids]
    teacher = DualEncoderTeacher.load(args.teacher, cache_dir=args.cache_dir or None, device=args.device)
    doc_ids = list(dataset.corpus)
    index = FlatIndex(teacher.embed_documents([dataset.corpus[d] for d in doc_ids]), doc_ids)
    qrels = {q: qrels[q] for q in query_ids}
    teacher_result = evaluate_embeddings("teacher", query_ids, teacher.embed_queries(texts), index, qrels, METRICS, 100)
    student = QueryEncoder.of(SentenceTransformer(str(student_folder), device=args.device)).encode(texts)
    student_result = evaluate_embeddings("student", query_ids, student, index, qrels, METRICS, 100)
    return {
        "test_queries": len(query_ids),
        "teacher": teacher_result.metrics,
        "student": student_result.metrics,
        "retention": {m: student_result.metrics[m] / teacher_result.metrics[m] for m in METRICS},
    }


def run_dataset(args, name: str) -> dict:
    work = Path(args.work) / name
    labelled = labelled_folder(name, work)
    folder, out = corpus_only_folder(labelled, work), work / "run"
    argv = ["distill", "--teacher", args.teacher, "--student", args.student, "--dataset", str(folder)]
    argv += ["--out", str(out), "--latency-repeats", "1", *args.distill_args]  # latency is not what this measures
    if args.cache_dir:
        argv += ["--cache-dir", args.cache_dir]
    started = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit(f"distill failed on {name}")
    seconds = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    training = metrics["training"]
    return {
        "distill_command": "embeddistill " + " ".join(argv),
        "distill_seconds": seconds,
        "training_queries": metrics.get("training_queries"),
        "learning_rate_search": training.get("learning_rate_search"),
        "validation": {k: v for k, v in training.get("validation", {}).items() if k != "history"},
        **score(args, labelled, out / "student"),
    }


def merged(results: list[dict]) -> dict:
    """One result file from runs of the same teacher and student on different datasets (parallel processes)."""
    pairs = {(result["teacher"], result["student"]) for result in results}
    if len(pairs) != 1:
        raise SystemExit(f"--merge: the files distil different teacher/student pairs: {sorted(pairs)}")
    first, datasets = dict(results[0]), {}
    for result in results:
        for name, row in result["datasets"].items():
            datasets[name] = {**row, "command": result["command"], "git_commit": result["git_commit"]}
    first["datasets"] = datasets
    return first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--teacher", default="")
    parser.add_argument("--student", default="teacher:0,-1")
    parser.add_argument("--work", default=str(REPO / "runs" / "corpus_only"))
    parser.add_argument("--cache-dir", default="", help="teacher embedding cache (default: the library's)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "corpus_only.json"))
    parser.add_argument("--device", default="cpu", help="where teacher and student embed the test queries")
    parser.add_argument("--merge", nargs="+", default=[], help="only join these result files (one run each) into --out")
    parser.add_argument("distill_args", nargs="*", help="more distill flags, after --")
    args = parser.parse_args(argv)
    command = "python benchmarks/corpus_only.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge:
        result = merged([json.loads(Path(path).read_text()) for path in args.merge])
        atomic_write_json(args.out, result | {"command": command})  # each dataset keeps the command that ran it
        return 0
    args.teacher = args.teacher or local_model("minilm", "sentence-transformers/all-MiniLM-L6-v2")
    result = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "git_commit": git_commit(),
        "teacher": Path(args.teacher).name,
        "student": args.student,
        "datasets": {},
        **environment_record(),
    }
    for name in args.datasets:
        result["datasets"][name] = run_dataset(args, name)
        atomic_write_json(args.out, result)  # each finished dataset is kept
    return 0


if __name__ == "__main__":
    sys.exit(main())
