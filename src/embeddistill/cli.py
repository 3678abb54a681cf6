"""The ``embeddistill`` command line: ``distill``, ``evaluate``, ``generate-queries``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from embeddistill.config import DistillConfig, add_config_arguments, config_from_args
from embeddistill.data import DataError

logger = logging.getLogger("embeddistill")


def _setup_logging(log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    for noisy in ("httpx", "urllib3", "sentence_transformers", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_distill(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    missing = [
        name
        for name, value in (
            ("--teacher", config.model.teacher),
            ("--dataset", config.data.dataset),
            ("--out", config.out),
        )
        if not value
    ]
    if missing:
        raise SystemExit(f"embeddistill distill: {', '.join(missing)} required (as flags or in --config)")
    _setup_logging(Path(config.out) / "distill.log")
    from embeddistill.pipeline import distill
    from embeddistill.reporting import report_table

    summary = distill(config)
    print(report_table(summary))
    print(f"\nwritten to {config.out}/ (student/, report.md, metrics.json, teacher.trec, student.trec)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _setup_logging()
    from embeddistill.data import RetrievalDataset
    from embeddistill.evaluation import evaluate_model

    summary = evaluate_model(
        args.model,
        RetrievalDataset.load(args.dataset),
        args.split,
        Path(args.out),
        args.metrics,
        k=args.top_k,
        trust_remote_code=args.trust_remote_code,
    )
    for name, value in summary["metrics"].items():
        print(f"{name}\t{value:.4f}")
    return 0


def cmd_generate_queries(args: argparse.Namespace) -> int:
    _setup_logging()
    from embeddistill.data import RetrievalDataset, write_queries_jsonl
    from embeddistill.querygen import generate_queries, make_generators

    dataset = RetrievalDataset.load(args.dataset)
    train = dataset.split_queries(args.split) if args.split else {}
    generators = make_generators(
        args.generator, args.n, lm_model=args.lm_model, cache_path=Path(args.out).with_suffix(".cache.jsonl")
    )
    made = generate_queries(generators, dataset.corpus, train, args.seed)
    write_queries_jsonl(args.out, [q.to_json() for q in made])
    print(f"{len(made)} queries written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embeddistill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    distill = commands.add_parser("distill", help="distil a teacher into a small student and evaluate both")
    distill.add_argument("--config", help="YAML config file; flags override its values")
    add_config_arguments(distill, DistillConfig())
    distill.set_defaults(handler=cmd_distill)

    evaluate = commands.add_parser("evaluate", help="evaluate any sentence-transformers model on a dataset split")
    evaluate.add_argument("model", help="model name or path (an asymmetric student uses encode_query/encode_document)")
    evaluate.add_argument("--dataset", required=True)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--out", default="runs/evaluate")
    evaluate.add_argument("--metrics", nargs="*", default=["nDCG@10", "RR@10", "R@100"])
    evaluate.add_argument("--top-k", type=int, default=100)
    evaluate.add_argument("--trust-remote-code", action="store_true")
    evaluate.set_defaults(handler=cmd_evaluate)

    generate = commands.add_parser("generate-queries", help="write unlabeled training queries generated from a corpus")
    generate.add_argument("--dataset", required=True)
    generate.add_argument("--generator", nargs="+", default=["crop"], choices=["crop", "perturb", "lm"])
    generate.add_argument("--n", type=int, default=1, help="queries per document (crop, lm) or per query (perturb)")
    generate.add_argument("--split", default="train", help="real queries to perturb ('' for none)")
    generate.add_argument("--lm-model", default="", help="causal LM / doc2query model name, path or .gguf file (lm)")
    generate.add_argument("--seed", type=int, default=42)
    generate.add_argument("--out", required=True, help="output .jsonl")
    generate.set_defaults(handler=cmd_generate_queries)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (DataError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        print(f"embeddistill: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
