"""Ablation: which parts of EmbedDistill matter, against sentence-transformers' own EmbedDistillLoss (the peer).

Same teacher, same student initialisation (``teacher:2``, asymmetric), same training queries, epochs, batch
size and seed for every row; each is evaluated on the test split in the teacher's own index.

    python benchmarks/ablation.py --teacher PATH_OR_NAME --dataset scifact \
        --out benchmarks/results/ablation_scifact.json

Rows: score distillation alone; embedding matching alone; both (EmbedDistill); both without generated queries;
the peer (``sentence_transformers.losses.EmbedDistillLoss``, L2, trained by ``SentenceTransformerTrainer`` on
the same queries with the teacher's query embeddings as labels) at its calibrated learning rate and at ours.
The peer needs the ``datasets`` package (``pip install datasets``).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
from pathlib import Path

import torch
from _common import git_commit, train_peer

from embeddistill.config import DistillConfig
from embeddistill.evaluation.metrics import score_run
from embeddistill.evaluation.significance import paired_permutation_test
from embeddistill.pipeline.dual_encoder import Prepared, evaluate_student, initialised_student, prepare, train_student
from embeddistill.runtime import environment_record
from embeddistill.storage import atomic_write_json

VARIANTS = {
    "embeddistill (score + EM + generated queries)": {},
    "score distillation only": {"query_em_weight": 0.0},
    "embedding matching only": {"score_weight": 0.0},
    "score + EM, no generated queries": {"crops_per_document": 0, "perturbations_per_query": 0},
}


def run_ours(base: dict, options: dict, out: Path) -> dict:
    config = DistillConfig.from_dict({**base, **options, "out": str(out)})
    prep = prepare(config, out)
    student, training = train_student(prep, out)
    result = evaluate_student(prep, student)
    return {
        "metrics": result.metrics,
        "per_query": result.per_query,
        "train_seconds": training["train_seconds"],
        "training_queries": prep.query_set.counts,
        "teacher": _teacher_metrics(prep),
    }


def run_peer(base: dict, learning_rate: float, out: Path) -> dict:
    """sentence-transformers' EmbedDistillLoss with its own trainer, on the very same queries and student."""
    config = DistillConfig.from_dict({**base, "out": str(out)})
    prep = prepare(config, out)
    # The query tower alone, as a plain sentence-transformers model: what the peer can train.
    student = initialised_student(prep, asymmetric=False)
    seconds = train_peer(student, prep.query_set.texts, prep.teacher_train, config.training, learning_rate, out)
    result = evaluate_student(prep, student.to("cpu"), name="peer", own_index=False)
    return {
        "metrics": result.metrics,
        "per_query": result.per_query,
        "train_seconds": seconds,
        "training_queries": prep.query_set.counts,
        "teacher": _teacher_metrics(prep),
    }


def _teacher_metrics(prep: Prepared) -> dict:
    run = prep.teacher_index.retrieve(prep.eval_ids, prep.teacher_eval, prep.config.evaluation.top_k)
    return score_run(run, prep.eval_qrels, prep.config.evaluation.metrics)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--peer-learning-rates", type=float, nargs="*", default=[2e-4, 1e-3])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = {"teacher": args.teacher, "dataset": args.dataset, "epochs": args.epochs, "latency_repeats": 1}

    rows: dict[str, dict] = {}
    peer_errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, options in VARIANTS.items():
            rows[name] = {"options": options, **run_ours(base, options, Path(scratch) / f"ours{len(rows)}")}
            print(name, rows[name]["metrics"], flush=True)
        for learning_rate in args.peer_learning_rates:
            name = f"peer: sentence-transformers EmbedDistillLoss (L2), lr {learning_rate:g}"
            try:
                peer = run_peer(base, learning_rate, Path(scratch) / f"peer{len(rows)}")
            except Exception as error:  # report a peer that cannot run here instead of losing our rows
                logging.exception("peer failed")
                peer_errors[name] = repr(error)
                continue
            rows[name] = {"options": {"learning_rate": learning_rate}, **peer}
            print(name, rows[name]["metrics"], flush=True)

    ours = rows["embeddistill (score + EM + generated queries)"]
    teacher = ours["teacher"]
    for row in rows.values():
        row["retention"] = {m: row["metrics"][m] / teacher[m] for m in teacher}
        if row is not ours:
            row["p_value_vs_embeddistill"] = {
                m: paired_permutation_test(ours["per_query"][m], row["per_query"][m]) for m in teacher
            }
    for row in rows.values():
        row.pop("per_query")
    atomic_write_json(
        args.out,
        {
            "command": "python benchmarks/ablation.py " + " ".join(sys.argv[1:]),
            "date": datetime.date.today().isoformat(),
            "git_commit": git_commit(),
            "device": (
                torch.cuda.get_device_name() if torch.cuda.is_available() else environment_record(())["machine"]["cpu"]
            ),
            "versions": environment_record(("torch",))["versions"],
            "teacher": teacher,
            "rows": rows,
            "peer_errors": peer_errors,
        },
    )


if __name__ == "__main__":
    main()
