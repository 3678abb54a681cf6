"""GPU speed (issue #5): teacher corpus encoding and distillation training, ours vs sentence-transformers.

Random-initialised models with the real architectures (built from the ``config.json`` + tokenizer + module configs
of the local model folders, since weights do not travel): the teacher is all-mpnet-base-v2 shaped (12-layer MPNet,
768-d), the student ``teacher:2`` (its embeddings and first 2 layers). Texts are real SciFact texts. In one call:

* ``peak``: the card's bf16 matmul rate (large square ``torch.matmul``), the yardstick for FLOP/s shares;
* ``encode``: documents/second embedding the SciFact corpus (256 tokens max), teacher weights in bf16, with
  ``SentenceTransformer.encode_document`` and with ours (:func:`embeddistill.models.encoding.encode`, the path the
  teacher cache takes; also end to end through ``EmbeddingCache.embed``, shard writes included, without the SDPA
  attention, under ``runtime.TRAINING_ATTENTION``, and through ``torch.compile`` (``--compile-teacher``; its first
  batches, which compile, are in the untimed warm-up)), interleaved repeats, plus the largest difference between
  the two paths' embeddings, ``fastest`` / ``fraction_of_peak`` / ``over_sentence_transformers``, and with
  ``--encode-profile-out`` a torch.profiler table of the plain and the compiled path;
* ``train``: queries/second of ``DistillationTrainer.step`` (EmbedDistill loss: score distillation over in-batch +
  8 hard-negative candidates, plus embedding matching) vs ``SentenceTransformerTrainer`` with
  sentence-transformers' ``EmbedDistillLoss`` (embedding matching, L2), same student, batch, queries (real SciFact
  queries, cycled), bf16 autocast, dropout off, word embeddings frozen and weight decay 0.01 in both, interleaved
  repeats;
* ``symmetric``: steps/second of ``DistillationTrainer`` with a symmetric all-MiniLM-L6-v2-shaped student (+ a
  384 -> 768 projection), which embeds each step's (up to 576) candidate passages itself (MS MARCO DL pool passages, the
  default batch of 64 queries + 8 hard negatives each), two ways, interleaved: attention through whichever kernel
  PyTorch picks (cuDNN's on Hopper), as the trainer once ran, and through ``runtime.TRAINING_ATTENTION``;
* ``dual_pooling``: a dual-pooling CE on the all-MiniLM-L6-v2 architecture (random pairs of real queries and
  passages), fine-tuning steps/second (``CrossEncoderTrainer.step``) and scoring pairs/second (``predict``), the same
  two ways of picking attention kernels;
* ``tokenization``: ms/document of the fast path's tokenisation (Rust ``encode_batch``) and of the model's own
  ``preprocess``, which it replaced;
* achieved FLOP/s of each, counted analytically from the real token counts (matmuls only, padding not counted),
  as a share of the measured peak.

    python benchmarks/speed_gpu.py --configs .device/configs --data .device/data/scifact \
        --passages .device/data/msmarco-dl-pool \
        --out benchmarks/results/speed_gpu.json

``--smoke`` shrinks models and sizes for a CPU check of the script. Needs ``datasets`` for the peer trainer.
``--sections`` picks what runs (e.g. ``--sections encode`` after a change to the encoding path); a section not run
is kept from the existing ``--out`` file, and ``section_runs`` says which command and commit each section is from.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import git_commit, same_as_ours
from torch.nn.attention import SDPBackend, sdpa_kernel

from embeddistill import runtime
from embeddistill.config import TeacherTrainingConfig, TrainingConfig
from embeddistill.losses import EmbedDistillLoss
from embeddistill.models import encoding, tokenization
from embeddistill.models.cross_encoders import DualPoolingCrossEncoder
from embeddistill.models.students import build_student, query_modules, query_tokenizer
from embeddistill.models.teachers import DOCUMENT, EmbeddingCache, TeacherIdentity
from embeddistill.runtime import environment_record
from embeddistill.training.batching import Documents, TrainingQueries
from embeddistill.training.distillation import DistillationTrainer
from embeddistill.training.teacher_finetuning import CrossEncoderTrainer, TeacherExample

TEACHER_FOLDER = "all-mpnet-base-v2"
SECTIONS = ("encode", "train", "symmetric", "dual_pooling")
SMOKE_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=".device/configs", help="folder holding all-mpnet-base-v2/ (no weights)")
    parser.add_argument("--data", default=".device/data/scifact", help="SciFact: corpus.jsonl(.gz), queries.jsonl")
    parser.add_argument("--passages", default=".device/data/msmarco-dl-pool", help="MS MARCO DL pool (symmetric)")
    parser.add_argument("--passage-count", type=int, default=5000, help="pool passages the symmetric run draws from")
    parser.add_argument("--symmetric-steps", type=int, default=30, help="timed steps per way and repeat")
    parser.add_argument("--dual-pooling-steps", type=int, default=30, help="timed CE steps per way and repeat")
    parser.add_argument("--dual-pooling-pairs", type=int, default=8192, help="pairs the CE scores per timed run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--encode-batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs of each encoder")
    parser.add_argument("--train-batch", type=int, default=256)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--hard-negatives", type=int, default=8)
    parser.add_argument("--profile-out", default="", help="write a torch.profiler table of our training step here")
    parser.add_argument("--encode-profile-out", default="", help="write torch.profiler tables of our encoding here")
    parser.add_argument("--smoke", action="store_true", help="tiny models, few texts and steps (CPU check)")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=list(SECTIONS),
        choices=list(SECTIONS),
        help="what runs; a section not run is kept from the existing --out file, with the command and commit it "
        "ran at (section_runs)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.encode_batch_sizes, args.repeats = [4], 1
        args.train_batch, args.warmup_steps, args.steps = 8, 1, 2
        args.passage_count, args.symmetric_steps = 48, 2
        args.dual_pooling_steps, args.dual_pooling_pairs = 2, 64
    return args


# -- models and texts ----------------------------------------------------------------------------------------------


def random_sentence_transformer(config_folder: Path, work: Path, device: str, smoke: bool, seed: int = 0):
    """The architecture of ``config_folder`` with random weights, as a sentence-transformers model."""
    import transformers
    from sentence_transformers import SentenceTransformer

    folder = work / config_folder.name
    shutil.copytree(config_folder, folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    if smoke:
        config.update(SMOKE_SHAPE)
        pooling = folder / "1_Pooling" / "config.json"
        pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "word_embedding_dimension": 64}))
    torch.manual_seed(seed)
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    return SentenceTransformer(str(folder), device=device)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists() and path.with_suffix(".jsonl.gz").exists():
        path = path.with_suffix(".jsonl.gz")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def beir_texts(folder: Path) -> tuple[list[str], list[str]]:
    """(documents as "title text", the BEIR convention of embeddistill.data; all query texts)."""
    corpus = read_jsonl(folder / "corpus.jsonl")
    documents = [f"{d.get('title', '').strip()} {d['text'].strip()}".strip() for d in corpus]
    queries = [q["text"].strip() for q in read_jsonl(folder / "queries.jsonl")]
    return [d for d in documents if d], queries


def token_lengths(tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    encoded = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    return np.array([len(ids) for ids in encoded["input_ids"]])


def forward_flops(config, lengths: np.ndarray) -> float:
    """Matmul FLOPs of an encoder's forward over sequences of ``lengths`` tokens (no padding, no embeddings).

    Per layer and sequence of n tokens: Q, K, V and output projections ``2 n 4 h^2``, feed-forward ``2 n 2 h i``,
    attention scores and their product with V ``2 * 2 n^2 h``.
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    n = lengths.astype(np.float64)
    return float(layers * (2 * n * (4 * h * h + 2 * h * i) + 4 * n * n * h).sum())


# -- measurements -----------------------------------------------------------------------------------------------------


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(device: str, size: int = 8192, iterations: int = 50) -> dict:
    """bf16 TFLOP/s of a large square matmul: what this card does at best on the work transformers are made of."""
    if device != "cuda":
        return {"tflops": None, "note": "CPU: no peak measured"}
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    return {"tflops": 2 * size**3 * iterations / seconds / 1e12, "size": size, "iterations": iterations}


def timed(function) -> tuple[float, object]:
    synchronize()
    started = time.perf_counter()
    result = function()
    synchronize()
    return time.perf_counter() - started, result


def encoders(teacher, texts: list[str], batch_sizes: list[int], work: Path) -> dict:
    """Name -> zero-argument function that embeds ``texts`` as documents (fp32 numpy rows)."""
    runs = {}
    for size in batch_sizes:
        runs[f"sentence_transformers_bs{size}"] = lambda size=size: teacher.encode_document(
            texts, batch_size=size, convert_to_numpy=True, show_progress_bar=False
        )
        runs[f"ours_bs{size}"] = lambda size=size: encoding.encode(teacher, texts, DOCUMENT, batch_size=size)
    largest = max(batch_sizes)
    runs[f"ours_no_sdpa_bs{largest}"] = lambda: encoding.encode(teacher, texts, DOCUMENT, largest, sdpa=False)

    def without_cudnn():  # the kernels training uses (cuDNN's attention plans each new shape)
        with sdpa_kernel(runtime.TRAINING_ATTENTION):
            return encoding.encode(teacher, texts, DOCUMENT, batch_size=largest)

    runs[f"ours_training_attention_bs{largest}"] = without_cudnn
    for size in sorted({largest, 2 * largest}):  # torch.compile (its first batches compile: warm-up, untimed)
        runs[f"ours_compiled_bs{size}"] = lambda size=size: encoding.encode(
            teacher, texts, DOCUMENT, batch_size=size, compile=True
        )
    identity = TeacherIdentity.of("bench-teacher", teacher)  # hashing the weights is not part of encoding
    counter = iter(range(1_000_000))

    def through_cache():  # a fresh cache each time: every text is encoded and written as shards
        cache = EmbeddingCache(work / f"cache{next(counter)}", identity)
        return cache.embed(teacher, texts, DOCUMENT, batch_size=largest, desc="bench")

    runs[f"ours_teacher_cache_bs{largest}"] = through_cache
    return runs


def tokenization_rate(teacher, texts: list[str]) -> dict:
    """Milliseconds per document tokenising a chunk: the fast path (Rust ``encode_batch``, on all cores where
    ``TOKENIZERS_PARALLELISM`` allows) and the model's own ``preprocess`` (the fallback), in one thread and in the
    fast path's threads."""
    from concurrent.futures import ThreadPoolExecutor

    threads = tokenization.tokenizer_threads(next(teacher.parameters()).device)
    rust = tokenization.rust_tokenizer(teacher, DOCUMENT)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        tokenization.tokenize_chunk(teacher, texts, DOCUMENT, pool)  # the first chunk's fuller check, untimed
        elapsed_fast, _ = timed(lambda: tokenization.tokenize_chunk(teacher, texts, DOCUMENT, pool))
        elapsed_preprocess_threaded, _ = timed(lambda: tokenization.preprocess_chunk(teacher, texts, DOCUMENT, pool))
    elapsed_preprocess, _ = timed(lambda: tokenization.preprocess_chunk(teacher, texts, DOCUMENT))
    rust_serial = None
    if rust is not None and not rust.disabled:
        parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by Rust at each call: one core
        try:
            rust_serial, _ = timed(lambda: rust.encodings(texts))
        finally:
            if parallelism is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    per_document = 1000 / len(texts)
    return {
        "documents": len(texts),
        "fast_path": "rust encode_batch" if rust is not None and not rust.disabled else "preprocess (fallback)",
        "ms_per_document_fast_path": elapsed_fast * per_document,
        "ms_per_document_rust_encode_one_core": rust_serial * per_document if rust_serial else None,
        "ms_per_document_preprocess_one_thread": elapsed_preprocess * per_document,
        f"ms_per_document_preprocess_{threads}_threads": elapsed_preprocess_threaded * per_document,
        "cpu_count": os.cpu_count(),
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
        "rayon_parallelism": tokenization.rayon_parallelism(),
    }


def bench_encode(args, teacher, texts: list[str], flops: float, peak: float | None, work: Path) -> dict:
    runs = encoders(teacher, texts, args.encode_batch_sizes, work)
    warm = texts[: 4 * max(args.encode_batch_sizes)]
    for name, run in encoders(teacher, warm, args.encode_batch_sizes, work / "warm").items():
        run()  # CUDA kernels, cuBLAS handles, tokenizer caches
        print("warmed", name, flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    for repeat in range(args.repeats):  # interleaved: a slow moment of the machine hits every encoder alike
        for name, run in runs.items():
            elapsed, outputs[name] = timed(run)
            seconds[name].append(elapsed)
            print(f"encode {name} repeat {repeat}: {len(texts) / elapsed:.0f} docs/s", flush=True)
    results = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        results[name] = {
            "documents_per_second": len(texts) / median,
            "seconds_median": median,
            "seconds": values,
            "achieved_tflops": flops / median / 1e12,
            "share_of_peak": flops / median / 1e12 / peak if peak else None,
        }
    largest = max(args.encode_batch_sizes)
    reference = outputs[f"sentence_transformers_bs{largest}"]
    agreement = {name: embedding_agreement(reference, output) for name, output in outputs.items()}
    tokenization = tokenization_rate(teacher, texts[:2048])
    print("tokenization", tokenization, flush=True)
    if args.encode_profile_out:
        for name in (f"ours_bs{largest}", f"ours_compiled_bs{largest}"):
            profile_call(runs[name], Path(args.encode_profile_out).with_suffix(f".{name}.txt"))
    return {"runs": results, "agreement_with_sentence_transformers": agreement, "tokenization": tokenization}


def fastest_encoding(runs: dict) -> dict:
    """Our fastest way of encoding (share of the bf16 peak) and its speed over sentence-transformers' fastest."""

    def fastest(prefix: str) -> str:
        return max((n for n in runs if n.startswith(prefix)), key=lambda n: runs[n]["documents_per_second"])

    ours, peer = fastest("ours_"), fastest("sentence_transformers_")
    return {
        "fastest": ours,
        "fraction_of_peak": runs[ours]["share_of_peak"],
        "over_sentence_transformers": runs[ours]["documents_per_second"] / runs[peer]["documents_per_second"],
        "sentence_transformers_fastest": peer,
    }


def embedding_agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    cosine = (reference * other).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(other, axis=1)
    return {"max_abs_diff": float(np.abs(reference - other).max()), "min_cosine": float(cosine.min())}


def training_queries(texts: list[str], rows: int, documents: int, dim: int, depth: int = 50) -> TrainingQueries:
    """Real query texts cycled to ``rows``, random unit teacher embeddings and random anchors/negatives."""
    rng = np.random.default_rng(0)
    anchors = rng.integers(0, documents, size=rows)
    return TrainingQueries(
        [texts[i % len(texts)] for i in range(rows)],
        unit_vectors(rng, rows, dim),
        anchors,
        [[int(a)] for a in anchors],
        rng.integers(0, documents, size=(rows, depth)),
        rng.random(rows) < 0.5,
    )


def unit_vectors(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def ours_training(args, teacher, queries: TrainingQueries, documents: Documents, device: str, work: Path):
    """Our trainer, warmed up; returns a function that times its next ``args.steps`` steps (seconds)."""
    student = build_student("teacher:2", teacher, asymmetric=True, device=device)
    config = TrainingConfig(
        epochs=args.repeats + 1,
        max_steps=0,
        batch_size=args.train_batch,
        learning_rate=1e-3,
        device=device,
        precision="bf16" if device == "cuda" else "fp32",
    )
    config.checkpoint_every = 0
    trainer = DistillationTrainer(
        student, queries, documents, EmbedDistillLoss(), config, hard_negatives=args.hard_negatives, out=work
    )
    torch.manual_seed(0)
    query_modules(student).train()
    for step in range(args.warmup_steps):
        trainer.step(step)
    steps = itertools.count(args.warmup_steps)

    def run() -> float:
        elapsed, _ = timed(lambda: [trainer.step(next(steps)) for _ in range(args.steps)])
        return elapsed

    if args.profile_out:  # its next 5 steps, before the timed ones
        profile_call(lambda: [trainer.step(next(steps)) for _ in range(5)], Path(args.profile_out))
    return run


def profile_call(function, out: Path) -> None:
    """A torch.profiler table of one call of ``function`` (CPU, and CUDA kernels where there is a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        function()
        synchronize()
    out.parent.mkdir(parents=True, exist_ok=True)
    averages = profiler.key_averages()
    tables = [averages.table(sort_by=key, row_limit=30) for key in ("cpu_time_total", "self_cpu_time_total")]
    if torch.cuda.is_available():
        tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=20))
    out.write_text("\n\n".join(tables))


def peer_training(args, teacher, queries: TrainingQueries, device: str, work: Path):
    """SentenceTransformerTrainer + EmbedDistillLoss (L2) on the query tower alone, as in benchmarks/ablation.py,
    with our dropout (off) and frozen word embeddings; returns a function that runs ``warmup + steps`` steps of a
    fresh trainer and gives the seconds of the last ``args.steps``."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import EmbedDistillLoss as PeerLoss
    from transformers import TrainerCallback

    student = build_student("teacher:2", teacher, asymmetric=False, device=device)
    same_as_ours(student, None)
    rows = args.train_batch * (args.warmup_steps + args.steps)
    dataset = Dataset.from_dict({"query": queries.texts[:rows], "label": queries.teacher_embeddings[:rows].tolist()})

    def run() -> float:
        stamps: list[float] = []

        class StepClock(TrainerCallback):
            def on_step_end(self, *unused, **unused_kwargs):
                synchronize()
                stamps.append(time.perf_counter())

        training_args = SentenceTransformerTrainingArguments(
            output_dir=str(work / "peer"),
            per_device_train_batch_size=args.train_batch,
            max_steps=args.warmup_steps + args.steps,
            learning_rate=1e-4,
            weight_decay=0.01,
            bf16=device == "cuda",
            use_cpu=device != "cuda",
            save_strategy="no",
            report_to="none",
            logging_steps=10**6,
            disable_tqdm=True,
            dataloader_drop_last=True,
            seed=42,
        )
        trainer = SentenceTransformerTrainer(
            model=student,
            args=training_args,
            train_dataset=dataset,
            loss=PeerLoss(student, distance_metric="l2"),
            callbacks=[StepClock()],
        )
        trainer.train()
        return stamps[-1] - stamps[args.warmup_steps - 1]

    return run


def bench_training(args, teacher, query_texts: list[str], peak: float | None, device: str, work: Path) -> dict:
    dim = teacher.get_sentence_embedding_dimension()
    rows = args.train_batch * (args.warmup_steps + args.steps * args.repeats + 10)
    queries = training_queries(query_texts, rows, documents=5000, dim=dim)
    documents = Documents([""] * 5000, unit_vectors(np.random.default_rng(1), 5000, dim))
    trainers = {
        "ours_distillation_trainer": ours_training(args, teacher, queries, documents, device, work / "ours"),
        "sentence_transformers_trainer": peer_training(args, teacher, queries, device, work),
    }
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for repeat in range(args.repeats):  # interleaved, as the encoders
        for name, run in trainers.items():
            seconds[name].append(run())
            print(f"train {name} repeat {repeat}: {args.train_batch * args.steps / seconds[name][-1]:.0f} q/s")
    results = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        results[name] = {
            "queries_per_second": args.train_batch * args.steps / median,
            "step_ms": median / args.steps * 1000,
            "seconds": values,
        }
    # Training FLOPs ~ 3x the forward (forward, gradients of activations and of weights) of the 2-layer tower.
    student = build_student("teacher:2", teacher, asymmetric=False, device="cpu")
    tower_config = query_modules(student)[0].auto_model.config
    lengths = token_lengths(query_tokenizer(student), query_texts, args.max_seq_length)
    flops_per_query = 3 * forward_flops(tower_config, lengths) / len(lengths)
    for result in results.values():
        tflops = result["queries_per_second"] * flops_per_query / 1e12
        result.update(achieved_tflops=tflops, share_of_peak=tflops / peak if peak else None)
    return {
        "runs": results,
        "student": "teacher:2 (MPNet embeddings + 2 layers, 768-d)",
        "batch": args.train_batch,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "repeats": args.repeats,
        "same_for_both": "batch, bf16 autocast, dropout off, word embeddings frozen, weight decay 0.01, the same "
        "student and queries; timed steps after warm-up steps, interleaved repeats (median)",
        "mean_query_tokens": float(lengths.mean()),
        "train_flops_per_query": flops_per_query,
        "ours_loss": f"EmbedDistill: score distillation over the batch's anchors + {args.hard_negatives} hard "
        "negatives per query, and query embedding matching (L2)",
        "peer_loss": "sentence_transformers EmbedDistillLoss(distance_metric='l2') on the teacher's query embeddings",
    }


def attention_ways() -> dict[str, list[SDPBackend]]:
    """PyTorch's own pick of attention kernels (cuDNN's first on Hopper) and the trainer's."""
    ours = runtime.TRAINING_ATTENTION
    return {"pytorch_attention": [SDPBackend.CUDNN_ATTENTION, *ours], "training_attention": ours}


def time_attention_ways(step, warmup_steps: int, repeats: int, n: int) -> dict[str, list[float]]:
    """Seconds of ``n`` training steps (``step(i)``) under each of :func:`attention_ways`, interleaved."""
    ways, ours = attention_ways(), runtime.TRAINING_ATTENTION
    for i in range(warmup_steps):
        step(i)
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    first = warmup_steps
    try:
        for _ in range(repeats):
            for way, kernels in ways.items():
                runtime.TRAINING_ATTENTION = kernels  # read by the trainers at each step
                seconds[way].append(timed(lambda first=first: [step(i) for i in range(first, first + n)])[0])
                first += n
    finally:
        runtime.TRAINING_ATTENTION = ours
    return seconds


def bench_symmetric(args, teacher, passages: list[str], query_texts: list[str], device: str, work: Path) -> dict:
    """Steps/second of our trainer with a symmetric MiniLM-shaped student, PyTorch's attention kernels vs ours."""
    folder = Path(args.configs) / "all-MiniLM-L6-v2"
    random_sentence_transformer(folder, work, "cpu", args.smoke, seed=1)  # saved as work / folder.name
    precision = "bf16" if device == "cuda" else "fp32"
    config = TrainingConfig(epochs=1, max_steps=0, learning_rate=1e-3, device=device, precision=precision)
    config.checkpoint_every = 0
    repeats, n = 2, args.symmetric_steps
    steps = args.warmup_steps + repeats * len(attention_ways()) * n
    dim = teacher.get_sentence_embedding_dimension()
    queries = training_queries(query_texts, config.batch_size * steps, documents=len(passages), dim=dim)
    documents = Documents(passages, unit_vectors(np.random.default_rng(1), len(passages), dim))
    student = build_student(str(work / folder.name), teacher, asymmetric=False, device=device)
    trainer = DistillationTrainer(
        student, queries, documents, EmbedDistillLoss(), config, hard_negatives=args.hard_negatives, out=work / "sym"
    )
    trainer.document_tokens.of(range(len(passages)))  # tokenized once per run: after the first epoch, all are
    torch.manual_seed(0)
    query_modules(student).train()
    seconds = time_attention_ways(trainer.step, args.warmup_steps, repeats, n)
    candidates = trainer.batcher.batch(args.warmup_steps)["documents"]
    runs = {
        way: {
            "steps_per_second": n / min(times),
            "queries_per_second": config.batch_size * n / min(times),
            "seconds": times,
        }
        for way, times in seconds.items()
    }
    return {
        "runs": runs,
        "student": "all-MiniLM-L6-v2 architecture, random weights, + 384 -> 768 projection, symmetric",
        "batch": config.batch_size,
        "hard_negatives": args.hard_negatives,
        "candidate_passages_per_step": len(candidates),
        "passages": len(passages),
        "steps_per_way_and_repeat": n,
        "speedup": runs["training_attention"]["steps_per_second"] / runs["pytorch_attention"]["steps_per_second"],
    }


def bench_dual_pooling(args, passages: list[str], query_texts: list[str], device: str, work: Path) -> dict:
    """Steps/second fine-tuning a MiniLM-shaped dual-pooling CE (``CrossEncoderTrainer.step``) and pairs/second
    scoring with it (``predict``), PyTorch's attention kernels vs ``runtime.TRAINING_ATTENTION``."""
    folder = Path(args.configs) / "all-MiniLM-L6-v2"
    random_sentence_transformer(folder, work / "ce", "cpu", args.smoke, seed=2)
    model = DualPoolingCrossEncoder.from_encoder(str(work / "ce" / folder.name), device=device)
    config = TeacherTrainingConfig(device=device, out=str(work / "ce-out"), checkpoint_every=0)
    rng = np.random.default_rng(0)
    examples = []  # one random positive and group_size - 1 random negatives per query: speed needs no labels
    for i in range(40 * config.batch_size):  # whole batches only: a short last batch would be a different shape
        query = query_texts[i % len(query_texts)]
        picks = rng.choice(len(passages), config.group_size, replace=False)
        examples.append(TeacherExample(query, [passages[picks[0]]], [passages[i] for i in picks[1:]]))
    trainer = CrossEncoderTrainer(model, examples, config)
    repeats, n = 2, args.dual_pooling_steps
    model.train()
    seconds = time_attention_ways(trainer.step, args.warmup_steps, repeats, n)
    scored = examples[: args.dual_pooling_pairs // (config.group_size - 1)]
    pair_queries = [e.query for e in scored for _ in e.negatives]
    pair_documents = [d for e in scored for d in e.negatives]
    ways = attention_ways()
    scoring: dict[str, list[float]] = {way: [] for way in ways}
    for repeat in range(repeats + 1):  # the first repeat warms each way's kernels, untimed
        for way, kernels in ways.items():
            with sdpa_kernel(kernels):
                elapsed, _ = timed(lambda: model.predict(pair_queries, pair_documents, batch_size=256))
            if repeat:
                scoring[way].append(elapsed)
    return {
        "training": {way: {"steps_per_second": n / min(times), "seconds": times} for way, times in seconds.items()},
        "scoring": {way: {"pairs_per_second": len(pair_queries) / min(t), "seconds": t} for way, t in scoring.items()},
        "model": "dual-pooling CE on the all-MiniLM-L6-v2 architecture, random weights",
        "batch": config.batch_size,
        "group_size": config.group_size,
        "max_length": config.max_length,
        "steps_per_way_and_repeat": n,
        "scored_pairs": len(pair_queries),
        "training_speedup": n / min(seconds["training_attention"]) / (n / min(seconds["pytorch_attention"])),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import transformers

    transformers.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    result = kept_sections(out) if set(args.sections) != set(SECTIONS) else {}
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    stamp = {
        "command": command,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    work = Path(tempfile.mkdtemp(prefix="speed-gpu-"))
    try:
        peak = matmul_peak(device)
        print("peak", peak, flush=True)
        result.update(run_sections(args, device, peak, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(
        benchmark="speed_gpu",
        **stamp,
        device=torch.cuda.get_device_name() if device == "cuda" else environment_record(())["machine"]["cpu"],
        versions={
            **environment_record(("torch", "transformers", "sentence-transformers"))["versions"],
            "cuda": torch.version.cuda,
        },
        smoke=args.smoke,
        teacher="all-mpnet-base-v2 architecture, random weights",
        bf16_matmul_peak=peak,
    )
    result["section_runs"] = {**result.get("section_runs", {}), **{name: stamp for name in args.sections}}
    result["summary"] = summary(result, max(args.encode_batch_sizes))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"device": result["device"], **result["summary"]}, indent=2))
    return 0


def kept_sections(out: Path) -> dict:
    """The existing result, each section stamped with the run it came from (files from before ``--sections``
    carry one command and commit for all)."""
    if not out.is_file():
        return {}
    result = json.loads(out.read_text())
    stamp = {key: result.get(key) for key in ("command", "git_commit", "date")}
    result["section_runs"] = {
        **{name: stamp for name in SECTIONS if name in result},
        **result.get("section_runs", {}),
    }
    return result


def run_sections(args, device: str, peak: dict, work: Path) -> dict:
    """The sections ``args.sections`` names, each under its own key."""
    documents, query_texts = beir_texts(Path(args.data))
    passages, passage_queries = beir_texts(Path(args.passages))
    passages = passages[: args.passage_count]
    if args.smoke:
        documents, query_texts = documents[:48], query_texts[:64]
    teacher = random_sentence_transformer(Path(args.configs) / TEACHER_FOLDER, work, device, args.smoke)
    teacher.max_seq_length = args.max_seq_length
    teacher.eval()
    teacher_bf16 = teacher.to(torch.bfloat16) if device == "cuda" else teacher
    sections = {}
    if "encode" in args.sections:
        lengths = token_lengths(teacher.tokenizer, documents, args.max_seq_length)
        flops = forward_flops(teacher[0].auto_model.config, lengths)
        encode = bench_encode(args, teacher_bf16, documents, flops, peak["tflops"], work)
        encode.update(
            documents=len(documents),
            mean_document_tokens=float(lengths.mean()),
            max_seq_length=args.max_seq_length,
            teacher_dtype=str(next(teacher_bf16.parameters()).dtype),
            forward_flops_corpus=flops,
            **fastest_encoding(encode["runs"]),
        )
        sections["encode"] = encode
    if "train" in args.sections:
        sections["train"] = bench_training(args, teacher_bf16.float(), query_texts, peak["tflops"], device, work)
    if "symmetric" in args.sections:
        sections["symmetric"] = bench_symmetric(args, teacher_bf16, passages, passage_queries, device, work)
    if "dual_pooling" in args.sections:
        sections["dual_pooling"] = bench_dual_pooling(args, passages, passage_queries, device, work)
    return sections


def summary(result: dict, largest: int) -> dict:
    """The headline ratio of each section the file holds (a file of the encode section alone has one)."""
    ratios = {}
    if "encode" in result:
        runs = result["encode"]["runs"]
        ratios["encode_ours_over_sentence_transformers"] = (
            runs[f"ours_bs{largest}"]["documents_per_second"]
            / runs[f"sentence_transformers_bs{largest}"]["documents_per_second"]
        )
    if "train" in result:
        runs = result["train"]["runs"]
        ratios["train_ours_over_sentence_transformers"] = (
            runs["ours_distillation_trainer"]["queries_per_second"]
            / runs["sentence_transformers_trainer"]["queries_per_second"]
        )
    if "symmetric" in result:
        ratios["symmetric_training_attention_over_pytorch"] = result["symmetric"]["speedup"]
    if "dual_pooling" in result:
        ratios["dual_pooling_training_attention_over_pytorch"] = result["dual_pooling"]["training_speedup"]
    return ratios


if __name__ == "__main__":
    sys.exit(main())
