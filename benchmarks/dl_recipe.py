"""Which recipe suits a corpus of short passages with many real queries (MS MARCO DL), chosen without labels.

    python benchmarks/dl_recipe.py --out benchmarks/results/dl_recipe_cpu.json

On the GPU, the library's defaults then (24 crops per document and 2 epochs; the crop budget gives the DL pool's
30,005 passages 5 each) lowered two of three asymmetric students on DL19/DL20 against the earlier recipe (2 crops, 6
epochs). This runs that comparison at CPU scale, and adds those defaults with at most 4 generated queries per real
one (about the earlier recipe's share of real queries, with their crops and epochs). Each recipe names its epochs:
the library's default has been 3 since.

* teacher all-MiniLM-L6-v2, student ``teacher:0,5`` (its bottom and top layers), asymmetric, learning rate pinned
  at 1e-3 (what ``auto`` chose for ``teacher:N`` students, without its trial runs);
* training queries: the 13,817 real MS MARCO dev-small and eval-small queries (no labels) less 500 held out
  (seeded), plus each recipe's crops and perturbations;
* **the choice**: label-free agreement on the 500 held-out real queries. The teacher's top 10 over the whole pool
  are graded judgements, and the student's query embeddings are searched in the teacher's index;
* DL19 and DL20 nDCG@10 (official qrels) are read after the choice: scores only.

A recipe whose run folder already holds ``metrics.json`` is not run again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from pathlib import Path

from _common import REPO, git_commit, local_model
from sentence_transformers import SentenceTransformer

from embeddistill.cli import main as cli
from embeddistill.data import RetrievalDataset, load_qrels
from embeddistill.evaluation.agreement import agreement_ndcg, teacher_judgements
from embeddistill.evaluation.metrics import evaluate_embeddings
from embeddistill.models.students import QueryEncoder
from embeddistill.models.teachers import DualEncoderTeacher
from embeddistill.runtime import environment_record
from embeddistill.serving.indexing import FlatIndex
from embeddistill.storage import atomic_write_json

QUERY_FILES = ("msmarco-passage.dev-small.queries.tsv", "msmarco-passage.eval-small.queries.tsv")
RECIPES = {
    "c24e2": ("the defaults then: 24 crops per document (5 a passage, the budget), 2 epochs", ["--epochs", "2"]),
    "c24e2g4": (
        "the defaults then, at most 4 generated queries per real one",
        ["--epochs", "2", "--generated-per-real", "4"],
    ),
    "c2e6": ("the earlier defaults: 2 crops per document, 6 epochs", ["--crops-per-document", "2", "--epochs", "6"]),
}
HELD_OUT = 500
AGREEMENT_DEPTH = 10


def split_queries(pool: Path, work: Path) -> tuple[Path, list[str]]:
    """The real queries less ``HELD_OUT`` (seed 42), as a training file; and the held-out query texts."""
    rows = []
    for name in QUERY_FILES:
        rows += [line for line in (pool / "extra_queries" / name).read_text(encoding="utf-8").splitlines() if line]
    order = list(range(len(rows)))
    random.Random(42).shuffle(order)
    held = set(order[:HELD_OUT])
    train = work / "train_queries.tsv"
    train.write_text("\n".join(rows[i] for i in range(len(rows)) if i not in held) + "\n", encoding="utf-8")
    return train, [rows[i].split("\t", 1)[1] for i in sorted(held)]


def distill(args, name: str, train: Path) -> dict:
    out = Path(args.work) / name
    argv = ["distill", "--teacher", args.teacher, "--dataset", args.pool, "--train-split=", "--eval-split", "dl19"]
    argv += ["--extra-queries", str(train), "--student", "teacher:0,5", "--asymmetric", "--learning-rate", "1e-3"]
    argv += ["--cache-dir", args.cache_dir, "--device", "cpu", "--seed", "42", "--out", str(out), *RECIPES[name][1]]
    if not (out / "metrics.json").exists() and cli(argv) != 0:
        raise SystemExit(f"distill failed for {name}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "recipe": RECIPES[name][0],
        "distill_command": "embeddistill " + " ".join(argv),
        "training_queries": metrics.get("training_queries"),
        "steps": metrics["training"].get("steps"),
        "train_seconds": metrics["training"].get("train_seconds"),
    }


def dl_splits(pool: RetrievalDataset, folder: Path) -> dict[str, tuple[list[str], dict]]:
    """DL19 and DL20: their judged query ids (in the pool) and qrels."""
    splits = {}
    for split in ("dl19", "dl20"):
        qrels = load_qrels(folder / "qrels" / f"{split}.tsv")
        ids = sorted(q for q in qrels if q in pool.queries)
        splits[split] = ids, {q: qrels[q] for q in ids}
    return splits


def dl_scores(index: FlatIndex, pool: RetrievalDataset, splits: dict, encode) -> dict[str, float]:
    scores = {}
    for split, (ids, qrels) in splits.items():
        embeddings = encode([pool.queries[q] for q in ids])
        scores[split] = evaluate_embeddings(split, ids, embeddings, index, qrels, ["nDCG@10"], 100).metrics["nDCG@10"]
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default=str(REPO.parent / "shared" / "datasets" / "msmarco-dl-pool"))
    parser.add_argument("--teacher", default="")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--work", default=str(REPO / "runs" / "dlcpu"))
    parser.add_argument("--cache-dir", default=str(REPO / "runs" / "dlcpu" / "cache"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dl_recipe_cpu.json"))
    args = parser.parse_args(argv)
    args.teacher = args.teacher or local_model("minilm", "sentence-transformers/all-MiniLM-L6-v2")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    train, held_out = split_queries(Path(args.pool), Path(args.work))
    runs = {name: distill(args, name, train) for name in args.recipes}
    pool = RetrievalDataset.load(args.pool)
    teacher = DualEncoderTeacher.load(args.teacher, cache_dir=args.cache_dir)
    doc_ids = list(pool.corpus)
    documents = teacher.embed_documents([pool.corpus[d] for d in doc_ids])
    index = FlatIndex(documents, doc_ids)
    splits = dl_splits(pool, Path(args.pool))
    # The teacher's graded top 10 of each held-out query: the same for every run.
    judged = teacher_judgements(teacher.embed_queries(held_out) @ documents.T, AGREEMENT_DEPTH)
    for name, run in runs.items():
        student = QueryEncoder.of(SentenceTransformer(str(Path(args.work) / name / "student"), device="cpu"))
        agreement = agreement_ndcg(student.encode(held_out) @ documents.T, judged)
        run["agreement_nDCG@10_held_out_real"] = float(agreement.mean())
        run["nDCG@10_after_the_choice"] = dl_scores(index, pool, splits, student.encode)
    chosen = max(runs, key=lambda name: runs[name]["agreement_nDCG@10_held_out_real"])
    result = {
        "benchmark": "dl_recipe",
        "command": "python benchmarks/dl_recipe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(),
        "git_commit": git_commit(),
        "teacher": Path(args.teacher).name,
        "student": "teacher:0,5",
        "held_out_real_queries": len(held_out),
        "teacher_nDCG@10": dl_scores(index, pool, splits, teacher.embed_queries),
        "runs": runs,
        "chosen_by_label_free_agreement": chosen,
        **environment_record(),
    }
    atomic_write_json(args.out, result)
    print(json.dumps({name: {k: run[k] for k in list(run)[-2:]} for name, run in runs.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
