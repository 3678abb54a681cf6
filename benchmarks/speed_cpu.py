"""CPU speed (issue #5): query-encoding latency, peak memory, parameters and FLOPs of each online query encoder.

Teacher all-mpnet-base-v2 against four students built with ``embeddistill.models.students.build_student`` (weights as
built, untrained: speed does not depend on training): ``teacher:2``; all-MiniLM-L6-v2 + 384->768 projection;
2-layer MiniLM (``truncate_transformer``) + projection; symmetric all-MiniLM-L6-v2 (+ projection). Queries are the
real SciFact test queries.

* latency: ``evaluation.measure_latency`` (tokenisation included, encoders interleaved on the same batches),
  median of ``--repeats`` runs at batch 1 and 32;
* FLOPs per query: ``torch.utils.flop_counter.FlopCounterMode`` on one query of the median token length (under each
  encoder's tokenizer): matmuls, attention and other ops it counts (no elementwise work);
* peak memory: each query encoder is saved alone and loaded in a fresh Python process, which reports its resident
  set (``/proc/self/status``) after imports, its high-water mark after loading the model and embedding batches of
  32 queries, and its resident set then; growth = those minus the post-import baseline.

    python benchmarks/speed_cpu.py --out benchmarks/results/speed_cpu.json

``--smoke`` (1 repeat, batches 1 and 4) checks the script quickly.

Section ``smallest`` (``benchmarks/_speed_onnx.py``): the smallest student (``--smallest``, by default the 2-layer
MiniLM + projection as built) against the teacher in the same backend and precision (PyTorch fp32, ONNX Runtime fp32
and int8 from ``embeddistill export``), interleaved, batch 1 and 32, and the export's nDCG@10 parity check on
SciFact test for ``--parity-student`` (a trained student whose teacher's document embeddings are cached).
``--sections`` picks what runs; a section not run is kept from the existing ``--out`` file with its own command.

    python benchmarks/speed_cpu.py --sections smallest --parity-student runs/quickstart/student \
        --out benchmarks/results/speed_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import git_commit  # also sets $EMBEDDISTILL_DATA to the project's datasets

MODELS = Path.home() / ".cache" / "embeddistill-models"
MEMORY_BATCHES = 5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(MODELS / "all-mpnet-base-v2"))
    parser.add_argument("--minilm", default=str(MODELS / "all-MiniLM-L6-v2"))
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", nargs="+", default=["encoders", "smallest"], choices=["encoders", "smallest"])
    parser.add_argument("--smallest", default="", help="smallest student folder (default: built, untrained)")
    parser.add_argument("--parity-student", default="", help="trained student for the ONNX retrieval-parity check")
    parser.add_argument(
        "--keep-parity",
        action="store_true",
        help="no --parity-student: keep the parity check already in --out (its run's command and commit go with it)",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        nargs="+",
        default=[10, 1],
        help="smallest section: calls each encoder makes in a row before the next runs (the first is the headline)",
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--memory-probe", default="", help=argparse.SUPPRESS)  # internal: the child process
    parser.add_argument("--queries-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.repeats = [1, 4], 1
    return args


# -- the memory probe, run in a fresh process per model ----------------------------------------------------------


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_probe(args) -> int:
    """Child process: load one saved query encoder, embed batches of 32 queries, print RSS figures as JSON."""
    from sentence_transformers import SentenceTransformer

    from embeddistill.models.students import QueryEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    queries = json.loads(Path(args.queries_file).read_text())
    baseline = proc_status_kib("VmRSS")
    model = SentenceTransformer(args.memory_probe, device="cpu")
    encoder = QueryEncoder.of(model).eval()
    loaded = proc_status_kib("VmRSS")
    with torch.inference_mode():
        for start in range(MEMORY_BATCHES):
            encoder(encoder.tokenize(queries[start * 32 : (start + 1) * 32]))
    print(
        json.dumps(
            {
                "baseline_rss_mib": baseline / 1024,
                "rss_growth_after_load_mib": (loaded - baseline) / 1024,
                "peak_rss_growth_mib": (proc_status_kib("VmHWM") - baseline) / 1024,
                "rss_growth_after_encoding_mib": (proc_status_kib("VmRSS") - baseline) / 1024,
            }
        )
    )
    return 0


def measure_memory(encoder_folder: Path, queries_file: Path, threads: int) -> dict:
    command = [sys.executable, __file__, "--out", "-", "--memory-probe", str(encoder_folder)]
    command += ["--queries-file", str(queries_file), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the encoders ---------------------------------------------------------------------------------------------------


def build_query_models(teacher_path: str, minilm_path: str, work: Path) -> dict:
    """Name -> sentence-transformers model whose query side is the online query encoder."""
    from sentence_transformers import SentenceTransformer

    from embeddistill.models.students import build_student, truncate_transformer
    from embeddistill.models.teachers import load_sentence_transformer

    teacher = load_sentence_transformer(teacher_path).eval()
    minilm = load_sentence_transformer(minilm_path)
    two_layer = work / "minilm-2-layer"
    SentenceTransformer(modules=[truncate_transformer(minilm[0], 2), minilm[1]], device="cpu").save(str(two_layer))
    return {
        "teacher all-mpnet-base-v2": teacher,
        "teacher:2 (asymmetric)": build_student("teacher:2", teacher, asymmetric=True),
        "all-MiniLM-L6-v2 + projection (asymmetric)": build_student(minilm_path, teacher, asymmetric=True),
        "2-layer MiniLM + projection (asymmetric)": build_student(str(two_layer), teacher, asymmetric=True),
        "all-MiniLM-L6-v2 + projection (symmetric)": build_student(minilm_path, teacher, asymmetric=False),
    }


def save_query_side(model, folder: Path) -> Path:
    """The query encoder alone as a sentence-transformers model (what a query server loads)."""
    from sentence_transformers import SentenceTransformer

    from embeddistill.models.students import query_modules

    SentenceTransformer(modules=list(query_modules(model)), device="cpu").save(str(folder))
    return folder


def median_length_query(encoder, queries: list[str]) -> tuple[str, int]:
    lengths = [
        len(ids) for ids in encoder.tokenizer(queries, truncation=True, max_length=encoder.max_length)["input_ids"]
    ]
    median = int(statistics.median_low(lengths))
    return queries[lengths.index(median)], median


def flops_per_query(encoder, query: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        encoder(encoder.tokenize([query]))
    return int(counter.get_total_flops())


def describe(name: str, model, encoder, queries: list[str]) -> dict:
    from embeddistill.models.students import count_parameters, is_asymmetric

    query, tokens = median_length_query(encoder, queries)
    return {
        "asymmetric": is_asymmetric(model) if "teacher " not in name else None,
        "parameters": count_parameters(encoder.modules_),
        "parameters_without_embeddings": count_parameters(encoder.modules_, include_embeddings=False),
        "flops_per_query": flops_per_query(encoder, query),
        "flops_method": "torch.utils.flop_counter.FlopCounterMode, one query of the median token length",
        "median_query_tokens": tokens,
    }


def encoders_section(args, queries: list[str]) -> dict:
    """The original rows: five query encoders in PyTorch, latency, memory, parameters and FLOPs."""
    from embeddistill.evaluation.latency import measure_latency
    from embeddistill.models.students import QueryEncoder

    with tempfile.TemporaryDirectory(prefix="speed-cpu-") as scratch:
        work = Path(scratch)
        models = build_query_models(args.teacher, args.minilm, work)
        encoders = {name: QueryEncoder.of(model).eval() for name, model in models.items()}
        rows = {name: describe(name, models[name], encoders[name], queries) for name in models}
        print("latency ...", flush=True)
        latency = measure_latency(encoders, queries, args.batch_sizes, args.repeats)
        queries_file = work / "queries.json"
        queries_file.write_text(json.dumps(queries))
        for index, (name, model) in enumerate(models.items()):
            folder = save_query_side(model, work / f"encoder{index}")
            rows[name].update(latency[name], memory=measure_memory(folder, queries_file, args.threads))
            print(name, json.dumps(rows[name]), flush=True)
    teacher = rows["teacher all-mpnet-base-v2"]
    for row in rows.values():
        row["speedup_vs_teacher"] = {key: teacher[key] / row[key] for key in latency["teacher all-mpnet-base-v2"]}
    return {
        "latency_method": "evaluation.measure_latency: median ms per batch, tokenisation included, interleaved",
        "memory_method": "fresh process per query encoder: /proc/self/status VmRSS after imports (baseline), VmHWM "
        f"after loading and embedding {MEMORY_BATCHES} batches of 32 queries; growth over the baseline",
        "weights": "as built by build_student, untrained (projections random)",
        "encoders": rows,
    }


def smallest_models(args, work: Path) -> tuple[dict[str, str], str]:
    """``{"teacher": path, "smallest": path}`` and how the smallest student's weights came to be."""
    if args.smallest:
        return {"teacher": args.teacher, "smallest": args.smallest}, f"trained: {Path(args.smallest).parent.name}"
    from sentence_transformers import SentenceTransformer

    from embeddistill.models.students import build_student, truncate_transformer
    from embeddistill.models.teachers import load_sentence_transformer

    minilm = load_sentence_transformer(args.minilm)
    two_layer = work / "minilm-2-layer"
    SentenceTransformer(modules=[truncate_transformer(minilm[0], 2), minilm[1]], device="cpu").save(str(two_layer))
    student = build_student(str(two_layer), load_sentence_transformer(args.teacher), asymmetric=True)
    student.save(str(work / "student-smallest"))
    return {"teacher": args.teacher, "smallest": str(work / "student-smallest")}, "as built, untrained (speed only)"


def kept_parity(previous: dict) -> dict | None:
    """The parity check of the previous smallest run in ``previous`` (the --out file), with that run's record."""
    smallest = previous.get("smallest", {})
    if not smallest.get("parity", {}).get("run"):
        return None
    ratios = {b: smallest[b]["nDCG@10_ratio_vs_fp32"] for b in ("onnx_fp32", "onnx_int8") if b in smallest}
    run = previous.get("smallest_run", {})
    parity = smallest["parity"] | {"kept_from": {key: run.get(key) for key in ("command", "git_commit", "date")}}
    return {"parity": parity, "ratios": ratios}


def smallest_run(args, argv, queries: list[str]) -> dict:
    from _speed_onnx import smallest_section

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="speed-onnx-") as scratch:
        models, weights = smallest_models(args, Path(scratch))
        section = smallest_section(models, queries, args, Path(scratch))
    section["smallest"]["weights"] = weights
    section["smallest_run"] = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1_5_15_before": list(load_before),
        "load_average_1_5_15_after": list(os.getloadavg()),
        "method": "benchmarks/_speed_onnx.py: six encoders interleaved on the same batches of SciFact test queries, "
        f"tokenisation included, each making {args.blocks[0]} calls in a row before the next (other_blocks: "
        f"{', '.join(map(str, args.blocks[1:])) or 'none'}); ONNX Runtime and torch with the same thread count",
        "repeats_batch1": args.repeats,
    }
    return section


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        return memory_probe(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as in serving: one request, the model's threads
    import transformers

    from embeddistill.data import RetrievalDataset
    from embeddistill.runtime import environment_record

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    queries = list(RetrievalDataset.load(args.dataset).split_queries(args.split).values())
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() and "encoders" not in args.sections else {}
    if "encoders" in args.sections:
        result.update(
            benchmark="speed_cpu",
            command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            settings={"dataset": args.dataset, "split": args.split, "queries": len(queries), "repeats": args.repeats},
            smoke=args.smoke,
        )
        result.update(encoders_section(args, queries))
    result["machine"] = environment_record(())["machine"]
    result["versions"] = environment_record(("torch", "transformers", "sentence-transformers", "onnxruntime"))[
        "versions"
    ]
    if "smallest" in args.sections:
        kept = kept_parity(result) if args.keep_parity and not args.parity_student else None
        result.update(smallest_run(args, argv, queries))
        if kept:
            result["smallest"]["parity"] = kept["parity"]
            for backend, ratio in kept["ratios"].items():
                result["smallest"][backend]["nDCG@10_ratio_vs_fp32"] = ratio
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
