"""Cross-encoder teachers: a dual-pooling CE trained here, as a reranker and as the teacher of a dual-encoder student.

1. ``train-teacher``: a dual-pooling CE fine-tuned from ``--base`` (all-MiniLM-L6-v2 weights: no CE checkpoint can
   be downloaded here) on the training qrels of every ``--datasets`` entry, hard negatives from ``--first-stage``.
2. Per dataset, on its test split: the first stage alone (exact search) and the CE reranking its top 100.
3. Per dataset, CE -> DE distillation into a symmetric student (``--student``, default ``teacher:2``: the CE
   encoder's first 2 layers as a mean-pooling dual encoder), same seed, queries and candidates for every row:
   the student before distillation, score distillation only, and score distillation + embedding matching
   (query target: the CE query-segment embedding paired with the query's anchor; document target: the mean of
   its document-segment embeddings over its pairings). Retention is relative to the CE reranker.

Per-query values of every system are kept; p-values are paired permutation tests (10,000 sign flips) on them.
Results are rewritten after every row (a run stopped early keeps what it finished).

    python benchmarks/cross_encoder.py --base PATH --first-stage PATH --datasets scifact nfcorpus \
        --out benchmarks/results/cross_encoder.json

(about 9 minutes on one H200; the committed result file's ``command`` is the exact call.)
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

from embeddistill.config import DistillConfig, TeacherTrainingConfig
from embeddistill.evaluation.significance import paired_permutation_test
from embeddistill.models.students import build_student
from embeddistill.pipeline.cross_encoder import (
    evaluate_cross_encoder_student,
    evaluate_first_stage_and_reranker,
    prepare_cross_encoder,
    train_cross_encoder_student,
)
from embeddistill.runtime import environment_record, resolve_device
from embeddistill.storage import atomic_write_json
from embeddistill.training.teacher_finetuning import train_dual_pooling

VARIANTS = {
    "score distillation only": {"query_em_weight": 0.0, "document_em_weight": 0.0},
    "score distillation + embedding matching": {},
}


def _system(result, reference=None) -> dict:
    row = {"metrics": result.metrics, "per_query": result.per_query}
    if reference is not None:
        row["retention_vs_cross_encoder"] = {m: result.metrics[m] / reference.metrics[m] for m in result.metrics}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="encoder the dual-pooling CE starts from")
    parser.add_argument("--first-stage", required=True, help="dual encoder: hard negatives, candidates, first stage")
    parser.add_argument("--datasets", nargs="+", default=["scifact", "nfcorpus"], help="the CE trains on all of them")
    parser.add_argument("--eval-datasets", nargs="*", default=None, help="evaluate on these (default: --datasets)")
    parser.add_argument("--reranker-splits", nargs="*", default=[], help="also rerank these splits (e.g. dev)")
    parser.add_argument("--ce-batch-size", type=int, default=256, help="pairs per CE inference batch")
    parser.add_argument("--student", default="teacher:2")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--teacher-batch-size", type=int, default=32)
    parser.add_argument("--teacher-learning-rate", type=float, default=5e-5)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--positives-in-pool", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="student epochs")
    parser.add_argument("--candidates", type=int, default=16, help="first-stage candidates per query the CE scores")
    parser.add_argument("--hard-negatives", type=int, default=4, help="of those, used per query and step")
    parser.add_argument("--random-negatives", type=int, default=2)
    parser.add_argument("--crops-per-document", type=int, default=1)
    parser.add_argument("--perturbations-per-query", type=int, default=1)
    parser.add_argument("--max-generated", type=int, default=0)
    parser.add_argument("--rerank-depth", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default="", help="folder for the CE, caches and runs (default: a temporary one)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--merge-into", default="", help="add this call's datasets to an earlier result file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "sentence_transformers", "transformers", "filelock", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    device = str(resolve_device(args.device))
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else environment_record(())["machine"]["cpu"]
    report: dict = {
        "command": "python benchmarks/cross_encoder.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "device": card,
        "machine": environment_record(())["machine"],
        "versions": environment_record()["versions"],
        "settings": vars(args),
        "timings_seconds": {},
        "datasets": {},
    }
    started = time.perf_counter()

    def save() -> None:
        report["timings_seconds"]["total"] = time.perf_counter() - started
        if not args.merge_into:
            atomic_write_json(args.out, report)
            return
        # One file for several calls (each retrains the CE with the same seed): datasets by name, calls in order.
        merged = json.loads(Path(args.merge_into).read_text())
        calls = merged.pop("calls", None) or [{k: v for k, v in merged.items() if k != "datasets"}]
        this_call = {k: v for k, v in report.items() if k != "datasets"}
        this_call["evaluated"] = sorted(report["datasets"])
        merged = {"calls": [*calls, this_call], "datasets": {**merged.get("datasets", {}), **report["datasets"]}}
        atomic_write_json(args.out, merged)

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        cache = work / "cache"
        ce_path = work / "dual-pooling-ce"
        teacher_config = TeacherTrainingConfig(
            base=args.base,
            datasets=list(args.datasets),
            out=str(ce_path),
            negatives_from=args.first_stage,
            positives_in_pool=args.positives_in_pool,
            group_size=args.group_size,
            epochs=args.teacher_epochs,
            batch_size=args.teacher_batch_size,
            learning_rate=args.teacher_learning_rate,
            max_length=args.max_length,
            seed=args.seed,
            device=args.device,
            checkpoint_every=0,
            cache_dir=str(cache),
        )
        tick = time.perf_counter()
        ce_model, teacher_info = train_dual_pooling(teacher_config)
        report["timings_seconds"]["train_teacher"] = time.perf_counter() - tick
        report["cross_encoder"] = {
            "kind": "dual-pooling (mean over segments, normalised, cosine / 0.05)",
            "base": args.base,
            "trained_on": [f"{d} {teacher_config.split}" for d in args.datasets],
            "weights_blake2b": ce_model.identity()["weights"],
            **teacher_info,
        }
        del ce_model
        save()

        for dataset in args.eval_datasets or args.datasets:
            name = Path(dataset).name
            base = {
                "cross_encoder": str(ce_path),
                "first_stage": args.first_stage,
                "student": args.student,
                "dataset": dataset,
                "epochs": args.epochs,
                "hard_negative_depth": args.candidates,
                "hard_negatives": args.hard_negatives,
                "ce_random_negatives": args.random_negatives,
                "crops_per_document": args.crops_per_document,
                "perturbations_per_query": args.perturbations_per_query,
                "max_generated": args.max_generated,
                "rerank_depth": args.rerank_depth,
                "cache_dir": str(cache),
                "seed": args.seed,
                "device": args.device,
                "checkpoint_every": 0,
                "cross_encoder_batch_size": args.ce_batch_size,
            }
            out = work / name
            out.mkdir(parents=True, exist_ok=True)
            config = DistillConfig.from_dict({**base, "out": str(out)})
            tick = time.perf_counter()
            prep = prepare_cross_encoder(config, out)
            timings = {"prepare": time.perf_counter() - tick, **prep.timings}
            first, reranker, rerank_seconds = evaluate_first_stage_and_reranker(prep)
            timings["rerank_test"] = rerank_seconds
            entry = {
                "eval_queries": len(prep.eval_ids),
                "training_queries": prep.query_set.counts,
                "candidates_per_query": int(prep.targets.candidates.shape[1]),
                "pairing": prep.pairing,
                "first_stage": _system(first, reranker),
                "cross_encoder_reranker": _system(reranker),
                "p_value_reranker_vs_first_stage": {
                    m: paired_permutation_test(reranker.per_query[m], first.per_query[m]) for m in reranker.metrics
                },
                "rows": {},
                "timings_seconds": timings,
            }
            for split in args.reranker_splits:
                split_config = DistillConfig.from_dict({**base, "out": str(out), "eval_split": split})
                prep.config, prep.eval_qrels = split_config, prep.dataset.qrels(split)
                test_ids, test_eval = prep.eval_ids, prep.first_stage_eval
                prep.eval_ids = sorted(prep.eval_qrels)
                prep.first_stage_eval = prep.first_stage.embed_queries(prep.eval_texts, desc=f"{split} queries")
                split_first, split_reranker, _ = evaluate_first_stage_and_reranker(prep)
                entry[f"{split}_split"] = {
                    "first_stage": split_first.metrics,
                    "cross_encoder_reranker": split_reranker.metrics,
                    "queries": len(prep.eval_ids),
                }
                prep.config, prep.eval_qrels = config, prep.dataset.qrels(config.data.eval_split)
                prep.eval_ids, prep.first_stage_eval = test_ids, test_eval
            report["datasets"][name] = entry
            print(name, "first stage", first.metrics, "reranker", reranker.metrics, flush=True)
            save()

            fresh = build_student(args.student, prep.cross_encoder.encoder_view(), False, device)
            before = evaluate_cross_encoder_student(prep, fresh, name="student_before")
            entry["rows"]["student before distillation"] = {"options": {}, **_system(before, reranker)}
            del fresh
            save()
            for variant, options in VARIANTS.items():
                run_out = out / variant.replace(" ", "_").replace("+", "and")
                variant_config = DistillConfig.from_dict({**base, **options, "out": str(run_out)})
                student, training = train_cross_encoder_student(prep, run_out, variant_config)
                result = evaluate_cross_encoder_student(prep, student)
                entry["rows"][variant] = {"options": options, "training": training, **_system(result, reranker)}
                print(name, variant, result.metrics, flush=True)
                del student
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
                save()
            rows = entry["rows"]
            if all(v in rows for v in VARIANTS):
                with_em, score_only = (rows[v]["per_query"] for v in reversed(list(VARIANTS)))
                entry["p_value_score_em_vs_score_only"] = {
                    m: paired_permutation_test(with_em[m], score_only[m]) for m in with_em
                }
            save()
    save()


if __name__ == "__main__":
    main()
