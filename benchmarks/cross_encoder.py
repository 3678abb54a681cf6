"""Cross-encoder teachers: a dual-pooling and a standard CE trained here, as rerankers and as teachers of a
dual-encoder student (issue 21, claim d of EmbedDistill, arXiv 2301.12005).

1. ``train-teacher``: one CE per ``--architectures`` entry (``dual-pooling``: segments pooled, it has embeddings to
   match; ``standard``: a one-logit classification head over [CLS], scores only), each fine-tuned from ``--base``
   (all-MiniLM-L6-v2 weights: no CE checkpoint can be downloaded here) on the training qrels of every ``--datasets``
   entry, hard negatives from ``--first-stage``, with the same seed and settings. They are saved under ``--work``
   (``dual-pooling-ce/``, ``standard-ce/``); ``--reuse-teachers`` loads them instead of training.
2. Per eval dataset and teacher, on the test split: the CE scores every training query's candidates once (the same
   queries, generated with ``--seed``, and the same candidates for both teachers), the first stage alone (exact
   search) and the CE reranking its top ``--rerank-depth``.
3. Per eval dataset, teacher and student seed (``--seeds``): CE -> DE distillation into a symmetric student
   (``--student``, default ``teacher:2``: the CE encoder's first 2 layers as a mean-pooling dual encoder). From the
   dual-pooling CE: score distillation only, and score distillation + embedding matching (query target: the CE
   query-segment embedding paired with the query's anchor; document target: the mean of its document-segment
   embeddings over its pairings); from the standard CE: score distillation only (it has no embeddings). Plus each
   teacher's student before distillation (seed-free). Retention is relative to the row's own CE reranker.

Per-query values of every system are kept (``query_ids`` order, 4 decimals, as ``quality.py`` writes them); the
paired tests are made by ``benchmarks/claims.py`` (claim d). Results are rewritten after every row (a run stopped
early keeps what it finished).

One call does everything:

    python benchmarks/cross_encoder.py --base PATH --first-stage PATH --datasets scifact nfcorpus squad \\
        --squad-article-split --work /tmp/ce --out benchmarks/results/cross_encoder_claims.json

or, on one GPU in parallel processes (``.device/job_ce.sh``): ``--train-teachers-only --architectures A`` once per
teacher, then one process per slice of the work (``--reuse-teachers`` and any of ``--eval-datasets``,
``--architectures``, ``--seeds``, ``--variants``, each with its own ``--out`` and ``--cache-dir``), then
``--merge PART ... --out FILE`` (one dataset's rows of one architecture must come from one CE: weight hashes are
checked).

A dataset is a name, a folder, or ``NAME=FOLDER`` (the result's key is ``NAME``, else the folder's name);
``--squad-article-split`` makes the entry ``squad`` the SQuAD-dev split by article that the quality tables use
(``_splits.write_group_split``, half the articles for training, seed 42), written once under ``--work``.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import encode_values, git_commit
from _splits import write_group_split

from embeddistill.config import DistillConfig, TeacherTrainingConfig
from embeddistill.data import resolve_dataset
from embeddistill.evaluation.significance import paired_permutation_test
from embeddistill.models.classification_cross_encoder import TRAINING_RECORD
from embeddistill.models.cross_encoders import DUAL_POOLING_CONFIG, load_cross_encoder
from embeddistill.models.students import build_student
from embeddistill.pipeline.cross_encoder import (
    evaluate_cross_encoder_student,
    evaluate_first_stage_and_reranker,
    prepare_cross_encoder,
    train_cross_encoder_student,
)
from embeddistill.runtime import environment_record, resolve_device
from embeddistill.storage import atomic_write_json

ARCHITECTURES = ("dual-pooling", "standard")
KINDS = {
    "dual-pooling": "dual-pooling (mean over segments, normalised, cosine / 0.05)",
    "standard": "standard (one-logit classification head over [CLS]; scores only)",
}
VARIANTS = {
    "score distillation only": {"query_em_weight": 0.0, "document_em_weight": 0.0},
    "score distillation + embedding matching": {},
}
SHORT_VARIANTS = {"score": "score distillation only", "em": "score distillation + embedding matching"}
NO_EMBEDDINGS = "a standard CE has no embeddings to match"
SQUAD = ("squad", "squad-dev")  # the entry --squad-article-split replaces, and its source


def teacher_folder(work: Path, architecture: str) -> Path:
    return work / f"{architecture}-ce"


def system(result, query_ids: list[str], reference=None) -> dict:
    """Aggregates and per-query values (aligned with ``query_ids``) of one evaluated system."""
    # a query the run found nothing for is missing from the per-query scores: it scored 0
    per_query = {m: encode_values(values.get(q, 0.0) for q in query_ids) for m, values in result.per_query.items()}
    row = {"metrics": result.metrics, "per_query": per_query}
    if reference is not None:
        row["retention_vs_cross_encoder"] = {
            m: result.metrics[m] / reference.metrics[m] if reference.metrics[m] else None for m in result.metrics
        }
    return row


def dataset_spec(entry: str, args, work: Path) -> tuple[str, str]:
    """``(result key, folder or name)`` of one ``--datasets`` / ``--eval-datasets`` entry."""
    name, separator, path = entry.partition("=")
    if separator and "/" not in name:
        return name, path
    if args.squad_article_split and entry == SQUAD[0]:
        return SQUAD[0], str(squad_article_split(work))
    return Path(entry).name, entry


def squad_article_split(work: Path, source: str = SQUAD[1]) -> Path:
    """SQuAD-dev split by article (half of them for training, seed 42), written under ``work`` once (under a lock:
    processes started together share it)."""
    out = work / "squad-split"
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "squad-split.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "split.json").is_file():
            write_group_split(resolve_dataset(source), out, split="test", train_fraction=0.5, seed=42)
    return out


# -- the teachers ---------------------------------------------------------------------------------------------------


def teacher_config(args, architecture: str, work: Path, cache: Path) -> TeacherTrainingConfig:
    return TeacherTrainingConfig(
        base=args.base,
        datasets=[dataset_spec(d, args, work)[1] for d in args.datasets],
        out=str(teacher_folder(work, architecture)),
        architecture=architecture,
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


def saved_training(folder: Path, architecture: str) -> dict:
    """How a saved CE was trained, from its own record (``train-teacher`` writes it)."""
    if architecture == "dual-pooling":
        return json.loads((folder / DUAL_POOLING_CONFIG).read_text(encoding="utf-8")).get("training", {})
    return json.loads((folder / TRAINING_RECORD).read_text(encoding="utf-8")).get("training", {})


def check_saved(folder: Path, architecture: str) -> None:
    """A clear error where ``--reuse-teachers`` finds no trained CE of this architecture."""
    marker = folder / (DUAL_POOLING_CONFIG if architecture == "dual-pooling" else TRAINING_RECORD)
    if not marker.is_file() or not (folder / "model.safetensors").is_file():
        raise SystemExit(
            f"--reuse-teachers: {folder} holds no trained {architecture} cross-encoder ({marker.name} or "
            "model.safetensors missing); train it first (--train-teachers-only with the same --work)"
        )


def teacher_record(args, architecture: str, work: Path, device: str) -> dict:
    """Kind, base, data, training record and weight hash of a saved CE (the hash of the folder as loaded for
    scoring, so every process that reuses it records the same one)."""
    folder = teacher_folder(work, architecture)
    check_saved(folder, architecture)
    model = load_cross_encoder(str(folder), device, args.max_length)
    weights = model.identity()["weights"]
    del model
    training = saved_training(folder, architecture)
    keep = ("steps", "train_seconds", "queries", "epochs", "batch_size", "learning_rate", "seed", "group_size")
    return {
        "kind": KINDS[architecture],
        "path": str(folder),
        "base": args.base,
        "trained_on": [f"{dataset_spec(d, args, work)[0]} train" for d in args.datasets],
        "weights_blake2b": weights,
        "training": {k: training[k] for k in keep if k in training},
    }


def train_teacher(args, architecture: str, work: Path, cache: Path, device: str) -> tuple[dict, float]:
    from embeddistill.training.teacher_finetuning import train_cross_encoder

    tick = time.perf_counter()
    model, _ = train_cross_encoder(teacher_config(args, architecture, work, cache))
    seconds = time.perf_counter() - tick
    del model
    free_memory()
    return teacher_record(args, architecture, work, device), seconds


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- one eval dataset -----------------------------------------------------------------------------------------------


def base_settings(args, dataset: str, ce_path: Path, cache: Path) -> dict:
    return {
        "cross_encoder": str(ce_path),
        "cross_encoder_max_length": args.max_length,  # both CEs score pairs of the length they were trained on
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


def other_splits(prep, config, base: dict, out: Path, splits: list[str]) -> dict:
    """The first stage and the reranker on further splits (``--reranker-splits``), aggregates only."""
    found = {}
    for split in splits:
        split_config = DistillConfig.from_dict({**base, "out": str(out), "eval_split": split})
        prep.config, prep.eval_qrels = split_config, prep.dataset.qrels(split)
        test_ids, test_eval = prep.eval_ids, prep.first_stage_eval
        prep.eval_ids = sorted(prep.eval_qrels)
        prep.first_stage_eval = prep.first_stage.embed_queries(prep.eval_texts, desc=f"{split} queries")
        split_first, split_reranker, _ = evaluate_first_stage_and_reranker(prep)
        found[f"{split}_split"] = {
            "first_stage": split_first.metrics,
            "cross_encoder_reranker": split_reranker.metrics,
            "queries": len(prep.eval_ids),
        }
        prep.config, prep.eval_qrels = config, prep.dataset.qrels(config.data.eval_split)
        prep.eval_ids, prep.first_stage_eval = test_ids, test_eval
    return found


def run_teacher(args, name: str, dataset: str, architecture: str, report: dict, save, work: Path, cache: Path):
    """One teacher on one eval dataset: prepare and rerank once, then every student row of every seed."""
    device = str(resolve_device(args.device))
    ce_path = teacher_folder(work, architecture)
    base = base_settings(args, dataset, ce_path, cache)
    # its own folder per slice of the work: processes that split one teacher's seeds or variants write apart
    out = work / "runs" / name / architecture / f"seeds{'-'.join(map(str, args.seeds))}_{'-'.join(args.variants)}"
    out.mkdir(parents=True, exist_ok=True)
    config = DistillConfig.from_dict({**base, "out": str(out)})
    tick = time.perf_counter()
    prep = prepare_cross_encoder(config, out)
    timings = {"prepare": time.perf_counter() - tick, **prep.timings}
    first, reranker, timings["rerank_test"] = evaluate_first_stage_and_reranker(prep)
    entry = report["datasets"].setdefault(name, {"source": dataset, "teachers": {}})
    query_ids = entry.setdefault("query_ids", list(prep.eval_ids))
    if query_ids != list(prep.eval_ids):
        raise ValueError(f"{name}: the {architecture} CE was evaluated on other queries than the other teacher")
    entry["eval_queries"] = len(query_ids)
    entry.setdefault("first_stage", system(first, query_ids))
    teacher = entry["teachers"][architecture] = {
        "cross_encoder": str(ce_path),
        "weights_blake2b": prep.cross_encoder.identity()["weights"],
        "training_queries": prep.query_set.counts,
        "candidates_per_query": int(prep.targets.candidates.shape[1]),
        "pairing": prep.pairing,
        "cross_encoder_reranker": system(reranker, query_ids),
        "p_value_reranker_vs_first_stage": {
            m: paired_permutation_test(reranker.per_query[m], first.per_query[m]) for m in reranker.metrics
        },
        **other_splits(prep, config, base, out, args.reranker_splits),
        "students": {},
        "timings_seconds": timings,
    }
    print(name, architecture, "first stage", first.metrics, "reranker", reranker.metrics, flush=True)
    save()

    fresh = build_student(args.student, prep.cross_encoder.encoder_view(), False, device)
    before = evaluate_cross_encoder_student(prep, fresh, name="student_before")
    teacher["student_before_distillation"] = system(before, query_ids, reranker)
    del fresh
    save()
    variants = [SHORT_VARIANTS[v] for v in args.variants]
    if not prep.has_embeddings and SHORT_VARIANTS["em"] in variants:
        teacher["skipped"] = {SHORT_VARIANTS["em"]: NO_EMBEDDINGS}
        variants.remove(SHORT_VARIANTS["em"])
    for seed in args.seeds:
        for variant in variants:
            options = VARIANTS[variant]
            run_out = out / f"seed{seed}" / variant.replace(" ", "_").replace("+", "and")
            variant_config = DistillConfig.from_dict({**base, **options, "seed": seed, "out": str(run_out)})
            student, training = train_cross_encoder_student(prep, run_out, variant_config)
            result = evaluate_cross_encoder_student(prep, student)
            teacher["students"].setdefault(variant, {})[str(seed)] = {
                "options": options,
                "seed": seed,
                "training": training,
                **system(result, query_ids, reranker),
            }
            print(name, architecture, variant, f"seed {seed}", result.metrics, flush=True)
            del student
            free_memory()
            save()
    del prep
    free_memory()


# -- result files ---------------------------------------------------------------------------------------------------


def call_record(report: dict) -> dict:
    """What one call ran (everything but its datasets and teachers)."""
    return {k: v for k, v in report.items() if k not in ("datasets", "cross_encoders", "other_cross_encoders", "calls")}


def merge_reports(parts: list[dict], command: str) -> dict:
    """One result file from several calls' files (or merged files): datasets by name, each teacher's rows by variant
    and seed, in ``VARIANTS`` order. Refuses a dataset whose rows of one architecture come from two different CEs
    (weight hashes) or from other query sets, a row given twice, and the layout before per-teacher results (``rows``
    without ``teachers``). Calls that each trained their own CEs (no ``--reuse-teachers``) may merge other datasets:
    ``cross_encoders`` then holds the first CE of each architecture and ``other_cross_encoders`` the rest."""
    merged: dict = {"command": command, "date": datetime.date.today().isoformat(), "calls": []}
    teachers: dict[str, list[dict]] = {}
    datasets: dict[str, dict] = {}
    for number, part in enumerate(parts):
        merged["calls"] += part.get("calls") or [call_record(part)]
        found = {a: [info] for a, info in part.get("cross_encoders", {}).items()}
        for architecture, infos in part.get("other_cross_encoders", {}).items():
            found.setdefault(architecture, []).extend(infos)
        for architecture, infos in found.items():
            known = teachers.setdefault(architecture, [])
            for info in infos:
                if info["weights_blake2b"] not in {k["weights_blake2b"] for k in known}:
                    known.append(info)
        for name, entry in part.get("datasets", {}).items():
            if "teachers" not in entry:
                raise ValueError(f"part {number}: {name} is in the layout before per-teacher results (no 'teachers')")
            target = datasets.setdefault(name, {k: v for k, v in entry.items() if k != "teachers"} | {"teachers": {}})
            if target["query_ids"] != entry["query_ids"]:
                raise ValueError(f"part {number}: {name} was evaluated on other queries than in an earlier part")
            for architecture, result in entry["teachers"].items():
                into = target["teachers"].setdefault(
                    architecture, {k: v for k, v in result.items() if k != "students"} | {"students": {}}
                )
                if into["weights_blake2b"] != result["weights_blake2b"]:
                    raise ValueError(f"part {number}: {name} has rows of another {architecture} CE than earlier parts")
                for variant, by_seed in result.get("students", {}).items():
                    rows = into["students"].setdefault(variant, {})
                    for seed, row in by_seed.items():
                        if seed in rows:
                            raise ValueError(f"part {number}: {name} {architecture} {variant} seed {seed} twice")
                        rows[seed] = row
                order = [*VARIANTS, *sorted(set(into["students"]) - set(VARIANTS))]
                into["students"] = {v: into["students"][v] for v in order if v in into["students"]}
    commits = sorted({str(call.get("git_commit")) for call in merged["calls"] if call.get("git_commit")})
    merged["git_commit"] = commits[0] if len(commits) == 1 else commits
    merged["cross_encoders"] = {a: infos[0] for a, infos in teachers.items()}
    others = {a: infos[1:] for a, infos in teachers.items() if len(infos) > 1}
    if others:
        merged["other_cross_encoders"] = others
    merged["datasets"] = datasets
    return merged


def read_report(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# -- the command ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="", help="encoder both CEs start from")
    parser.add_argument("--first-stage", default="", help="dual encoder: hard negatives, candidates, first stage")
    parser.add_argument("--datasets", nargs="+", default=["scifact", "nfcorpus"], help="the CEs train on all of them")
    parser.add_argument("--eval-datasets", nargs="*", default=None, help="evaluate on these (default: --datasets)")
    parser.add_argument(
        "--squad-article-split", action="store_true", help="the entry 'squad' is SQuAD-dev split by article"
    )
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44], help="student training seeds")
    parser.add_argument(
        "--variants", nargs="+", default=list(SHORT_VARIANTS), choices=list(SHORT_VARIANTS),
        help="student rows: score = score distillation only, em = + embedding matching (dual-pooling CE only)",
    )  # fmt: skip
    parser.add_argument("--train-teachers-only", action="store_true", help="train and save the CEs, then stop")
    parser.add_argument("--reuse-teachers", action="store_true", help="load the CEs saved under --work")
    parser.add_argument("--merge", nargs="+", default=[], metavar="PART", help="only merge these result files")
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
    parser.add_argument("--seed", type=int, default=42, help="teachers' seed, and the training queries' generation")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default="", help="folder for the CEs, caches and runs (default: a temporary one)")
    parser.add_argument("--cache-dir", default="", help="embedding and CE score caches (default: WORK/cache)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--merge-into", default="", help="add this call's results to an earlier result file")
    args = parser.parse_args(argv)
    if not args.merge and not (args.base and args.first_stage):
        parser.error("--base and --first-stage are needed (except with --merge)")
    if args.train_teachers_only and args.reuse_teachers:
        parser.error("--train-teachers-only and --reuse-teachers contradict each other")
    if (args.train_teachers_only or args.reuse_teachers) and not args.work:
        parser.error("--train-teachers-only and --reuse-teachers need --work (where the CEs are saved)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/cross_encoder.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge:
        atomic_write_json(args.out, merge_reports([read_report(p) for p in args.merge], command))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "sentence_transformers", "transformers", "filelock", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    device = str(resolve_device(args.device))
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else environment_record(())["machine"]["cpu"]
    report: dict = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "git_commit": git_commit(),
        "device": card,
        "machine": environment_record(())["machine"],
        "versions": environment_record()["versions"],
        "settings": vars(args),
        "timings_seconds": {},
        "cross_encoders": {},
        "datasets": {},
    }
    started = time.perf_counter()

    def save() -> None:
        report["timings_seconds"]["total"] = time.perf_counter() - started
        if not args.merge_into:
            atomic_write_json(args.out, report)
            return
        atomic_write_json(args.out, merge_reports([read_report(args.merge_into), report], report["command"]))

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        cache = Path(args.cache_dir) if args.cache_dir else work / "cache"
        for architecture in args.architectures:
            if args.reuse_teachers:
                report["cross_encoders"][architecture] = teacher_record(args, architecture, work, device)
                continue
            info, seconds = train_teacher(args, architecture, work, cache, device)
            report["cross_encoders"][architecture] = info
            report["timings_seconds"][f"train_teacher_{architecture}"] = seconds
            save()
        save()
        if args.train_teachers_only:
            return 0
        for entry in args.eval_datasets or args.datasets:
            name, dataset = dataset_spec(entry, args, work)
            for architecture in args.architectures:
                run_teacher(args, name, dataset, architecture, report, save, work, cache)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
