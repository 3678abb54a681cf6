"""The ``embeddistill`` command line: ``distill``, ``evaluate``, ``generate-queries``, ``train-teacher``, ..."""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
from pathlib import Path

from embeddistill.cli_serving import add_serving_commands
from embeddistill.config import DistillConfig, add_config_arguments, config_from_args, resolve_student_recipe
from embeddistill.console import VERBOSITY, add_command, at_least, common_options
from embeddistill.console import setup_logging as _setup_logging
from embeddistill.data import DataError
from embeddistill.extras import MissingExtra
from embeddistill.querygen import GENERATORS

logger = logging.getLogger("embeddistill")
DATASET_HELP = (
    "BEIR-layout folder, or a name: looked up in $EMBEDDISTILL_DATA, else on the Hugging Face hub (mteb/NAME, "
    "BeIR/NAME; converted once into ~/.cache/embeddistill/datasets/NAME)"
)
KEEP_IDENTICAL_HELP = (
    "count a document whose id is the query's own id as a hit (default: dropped, as BEIR's and MTEB's "
    "ignore_identical_ids)"
)


def cmd_distill(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    missing = [
        name
        for name, value in (
            (
                "--teacher (or --cross-encoder, or --teacher-documents)",
                config.model.teacher or config.ce.cross_encoder or config.api.teacher_documents,
            ),
            ("--dataset", config.data.dataset),
            ("--out", config.out),
        )
        if not value
    ]
    if missing:
        raise SystemExit(f"embeddistill distill: {', '.join(missing)} required (as flags or in --config)")
    from embeddistill.checks import check_distill

    check_distill(resolve_student_recipe(config))  # before anything loads (distill() checks again, and logs warnings)
    from embeddistill.training import distributed

    distributed.init_from_env(config.training.device)  # under torchrun: join the process group (else a no-op)
    main_rank = distributed.is_main()
    _setup_logging(Path(config.out) / "distill.log" if main_rank else None)
    if not main_rank:
        logging.getLogger("embeddistill").setLevel(logging.WARNING)  # rank 0 tells the story; the others warn
    from embeddistill.evaluation.report import report_table
    from embeddistill.pipeline import distill

    summary = distill(config)
    distributed.shutdown()
    if not main_rank:
        return 0
    print(report_table(summary))
    files = ", ".join(["student/", "report.md", "metrics.json", *summary.trec_runs])
    print(f"\nwritten to {config.out}/ ({files})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _setup_logging()
    from embeddistill.data import RetrievalDataset
    from embeddistill.evaluation.metrics import evaluate_model

    summary = evaluate_model(
        args.model,
        RetrievalDataset.load(args.dataset),
        args.split,
        Path(args.out),
        args.metrics,
        k=args.top_k,
        trust_remote_code=args.trust_remote_code,
        reranker=args.reranker,
        rerank_depth=args.rerank_depth,
        cache_dir=args.cache_dir,
        ignore_identical_ids=not args.keep_identical_ids,
        prompts=(args.query_prompt, args.document_prompt),
        truncate_dim=args.truncate_dim or 0,
    )
    for name, value in summary["metrics"].items():
        print(f"{name}\t{value:.4f}")
    if args.reranker:
        print(f"reranked by {args.reranker} (top {args.rerank_depth}):")
        for name, value in summary["reranker"]["metrics"].items():
            print(f"{name}\t{value:.4f}")
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from embeddistill.config import TeacherTrainingConfig, apply_arguments
    from embeddistill.training.teacher_finetuning import train_cross_encoder

    config = apply_arguments(TeacherTrainingConfig(), args)
    from embeddistill.checks import check_teacher_training

    check_teacher_training(config)
    _setup_logging(Path(config.out).parent / f"{Path(config.out).name}.log")
    _, info = train_cross_encoder(config)
    print(f"dual-pooling cross-encoder written to {config.out}/ ({info['steps']} steps, {info['train_seconds']:.0f} s)")
    return 0


def _add_train_teacher_command(commands) -> None:
    """Its flags come from :class:`TeacherTrainingConfig`'s fields, like ``distill``'s from :class:`DistillConfig`."""
    from embeddistill.config import TeacherTrainingConfig

    train = add_command(
        commands,
        "train-teacher",
        "fine-tune a dual-pooling cross-encoder teacher on labelled data (qrels + hard negatives)",
        "Fine-tune a dual-pooling cross-encoder on a dataset's labelled queries (a positive and hard negatives "
        "each), to serve as a teacher: 'distill --cross-encoder OUT'. Checkpoints go to OUT.checkpoint/.",
    )
    add_config_arguments(train, TeacherTrainingConfig())
    train.set_defaults(handler=cmd_train_teacher)


def cmd_generate_queries(args: argparse.Namespace) -> int:
    _setup_logging()
    from embeddistill.data import RetrievalDataset, write_queries_jsonl
    from embeddistill.querygen import generate_queries, make_generators

    dataset = RetrievalDataset.load(args.dataset)
    if args.split and not dataset.has_labels:  # a corpus-only folder: nothing to perturb, generate from documents
        logger.info("%s has no qrels/: no real queries to perturb (--split %s ignored)", dataset.path, args.split)
    train = dataset.split_queries(args.split) if args.split and dataset.has_labels else {}
    documents = dataset.corpus
    if 0 < args.max_documents < len(documents):  # a seeded sample: LM generation costs about a second a query
        chosen = set(random.Random(args.seed).sample(sorted(documents), args.max_documents))
        documents = {doc_id: text for doc_id, text in documents.items() if doc_id in chosen}
    lm_options = {
        "batch_size": args.lm_batch_size,
        "dtype": args.lm_dtype or None,
        "temperature": args.lm_temperature,
        "max_document_words": args.lm_max_document_words,
        "max_seconds": args.lm_max_seconds,
    }
    cache_path = Path(args.out).with_suffix(".cache.jsonl")
    generators = make_generators(args.generator, args.n, args.lm_model, cache_path, lm_options)
    made = generate_queries(generators, documents, train, args.seed)
    if "lm" in args.generator:
        from embeddistill.querygen.lm import filter_generated

        # Only LM outputs can echo the prompt or copy their document; crops are copies by design.
        lm_made = filter_generated([q for q in made if q.generator == "lm"], dataset.corpus)
        made = [q for q in made if q.generator != "lm"] + lm_made
    write_queries_jsonl(args.out, [q.to_json() for q in made])
    print(f"{len(made)} queries written to {args.out}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("embeddistill")
    except PackageNotFoundError:  # a source tree that is not installed
        from embeddistill import __version__

        return __version__


def _add_evaluate_command(commands) -> None:
    evaluate = add_command(
        commands,
        "evaluate",
        "evaluate any sentence-transformers model on a dataset split",
        "Retrieve the corpus's top documents for each query of a split with any sentence-transformers model (a "
        "student included), optionally rerank them with a cross-encoder, and score them; writes a TREC run.",
    )
    evaluate.add_argument("model", help="model name or path (an asymmetric student uses encode_query/encode_document)")
    evaluate.add_argument("--dataset", required=True, help=DATASET_HELP)
    evaluate.add_argument("--split", default="test", help="qrels split whose queries are evaluated")
    evaluate.add_argument("--out", default="runs/evaluate", help="folder for the TREC run and metrics")
    evaluate.add_argument("--metrics", nargs="*", default=["nDCG@10", "RR@10", "R@100"], help="ir_measures names")
    evaluate.add_argument("--top-k", type=at_least(1), default=100, help="documents retrieved per query")
    evaluate.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow models that execute code from their repository (off unless asked)",
    )
    evaluate.add_argument("--reranker", default="", help="cross-encoder that reranks the model's top documents")
    evaluate.add_argument(
        "--rerank-depth", type=at_least(1), default=100, help="documents per query the reranker rescores"
    )
    evaluate.add_argument(
        "--cache-dir",
        default="",
        help="embedding and score caches (default: a run's own for its student/, else ~/.cache/embeddistill)",
    )
    evaluate.add_argument("--keep-identical-ids", action="store_true", help=KEEP_IDENTICAL_HELP)
    evaluate.add_argument(
        "--query-prompt", default="", help="put before every query instead of the model's own ('none': no prompt)"
    )
    evaluate.add_argument(
        "--document-prompt", default="", help="put before every document instead of the model's own ('none': none)"
    )
    evaluate.add_argument(
        "--truncate-dim", type=at_least(1), default=None, help="Matryoshka models: keep the first N dimensions"
    )
    evaluate.set_defaults(handler=cmd_evaluate)


def _add_generate_command(commands) -> None:
    generate = add_command(
        commands,
        "generate-queries",
        "write unlabeled training queries generated from a corpus",
        "Generate unlabelled training queries from a corpus (crops, perturbations of real queries, or an LM) into "
        "a .jsonl file for 'distill --extra-queries'. LM generation resumes where it stopped.",
    )
    generate.add_argument("--dataset", required=True, help=DATASET_HELP)
    generate.add_argument(
        "--generator", nargs="+", default=["crop"], choices=list(GENERATORS), help="query generators to run"
    )
    generate.add_argument(
        "--n", type=at_least(1), default=1, help="queries per document (crop, lm) or per query (perturb)"
    )
    generate.add_argument("--split", default="train", help="real queries to perturb ('' for none)")
    generate.add_argument("--lm-model", default="", help="causal LM / doc2query model name, path or .gguf file (lm)")
    generate.add_argument(
        "--max-documents", type=at_least(0), default=0, help="generate from a seeded sample of N documents"
    )
    generate.add_argument("--lm-batch-size", type=at_least(1), default=8, help="documents per LM generation batch")
    generate.add_argument("--lm-dtype", default="", help="LM weights dtype, e.g. bfloat16 (default: fp32 on CPU)")
    generate.add_argument("--lm-temperature", type=at_least(0.0, float), default=0.7, help="LM sampling temperature")
    generate.add_argument(
        "--lm-max-document-words", type=at_least(1), default=200, help="document words in the LM prompt"
    )
    generate.add_argument(
        "--lm-max-seconds",
        type=at_least(0.0, float),
        default=0,
        help="stop LM generation after this long (0 = no limit; resumable)",
    )
    generate.add_argument("--seed", type=int, default=42, help="seed for sampling documents and generation")
    generate.add_argument("--out", required=True, help="output .jsonl")
    generate.set_defaults(handler=cmd_generate_queries)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embeddistill",
        description="Distil large embedding models into small, fast retrieval students; evaluate, index, search, "
        "export and serve them. 'embeddistill COMMAND --help' describes each command.",
        parents=[common_options()],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    distill = add_command(
        commands,
        "distill",
        "distil a teacher into a small student and evaluate both",
        "Distil a teacher (a dual encoder, or a cross-encoder with --cross-encoder) into a small student: teacher "
        "embeddings (cached), training queries, training with checkpoints (--resume continues a stopped run), then "
        "both evaluated side by side. Every option is also a key of a --config YAML file.",
    )
    distill.add_argument("--config", help="YAML config file; flags override its values")
    add_config_arguments(distill, DistillConfig())
    distill.set_defaults(handler=cmd_distill)

    _add_evaluate_command(commands)
    _add_generate_command(commands)
    add_serving_commands(commands)
    _add_train_teacher_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; an error is printed once, as ``embeddistill: error: ...`` (exit 2), never as a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    VERBOSITY["level"] = -1 if getattr(args, "quiet", False) else getattr(args, "verbose", 0)
    if VERBOSITY["level"] < 0:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it for every bar that does not say otherwise
    previous = signal.signal(signal.SIGTERM, _terminated) if _main_thread() else None
    try:
        return args.handler(args)
    except KeyboardInterrupt as stop:
        return _interrupted(stop, argv)
    except (DataError, FileNotFoundError, ValueError, MissingExtra) as error:
        if logging.getLogger().handlers:  # the run's log file keeps it; the console gets it once, below
            logger.error("%s", error, extra={"console": False})
        print(f"embeddistill: error: {error}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside training: stop like Ctrl-C (files are written atomically; nothing half-written is left)."""


def _terminated(number, frame) -> None:
    raise _Terminated


def _interrupted(stop: KeyboardInterrupt, argv: list[str]) -> int:
    """One message for a stopped command: where training stopped and the exact command that continues it."""
    terminated = isinstance(stop, _Terminated) or getattr(stop, "signal_name", "") == "SIGTERM"
    checkpoint = getattr(stop, "checkpoint", None)
    if checkpoint is not None:
        from embeddistill.checks import resume_command

        print(
            f"embeddistill: stopped by {stop.signal_name} after step {stop.step} of {stop.total}; checkpoint written "
            f"to {checkpoint}/. Continue with:\n  {resume_command(argv)}",
            file=sys.stderr,
        )
    else:
        print(
            "embeddistill: interrupted. Finished work is kept (teacher-cache shards, generated queries, the last "
            "checkpoint): rerun the same command to continue (with --resume if training had started)",
            file=sys.stderr,
        )
    return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
