"""Throughput of data-parallel distillation and sharded teacher encoding on 1 vs 2 GPUs (torch.distributed).

Models are random-initialised from the configs of the real architectures (nothing is downloaded): the student is a
MiniLM-shaped 2-layer BERT (384-d, vocab 30522); the teacher is all-MiniLM-L6-v2 shaped (6-layer BERT, 384-d) or
all-mpnet-base-v2 shaped (12-layer MPNet, 768-d; the student then gets a 384 -> 768 projection). The tokenizer is a
BERT WordPiece tokenizer built from a generated vocabulary, and the texts are random words of that vocabulary: queries
of 16-32 tokens, documents of 256 tokens. Measured, on each world size:

* ``train``: queries/second of the real ``DistillationTrainer.step`` (asymmetric student, bf16 autocast on GPU,
  8 hard negatives per query) with the same per-GPU batch, so 2 GPUs process twice the global batch per step;
* ``encode``: documents/second of the teacher-embedding cache (``EmbeddingCache.embed``), which under torchrun
  shards the texts across ranks, writes per-rank shards and merges them after a barrier (all of that is timed).

Run each world size under torchrun; both write into the same ``--out``, and once both are there it gains
``scaling.train_2gpu_over_1gpu`` (and ``encode_2gpu_over_1gpu``)::

    torchrun --standalone --nproc_per_node 1 benchmarks/distributed_throughput.py --out OUT.json
    torchrun --standalone --nproc_per_node 2 benchmarks/distributed_throughput.py --out OUT.json

or both in one go: ``python benchmarks/distributed_throughput.py --launch --out ...``. ``--teacher-arch mpnet``
selects the larger teacher; ``--smoke`` shrinks everything for a CPU check (gloo):
``torchrun --standalone --nproc_per_node 2 benchmarks/distributed_throughput.py --smoke --out /tmp/smoke.json``.
Needs neither faiss nor ir_measures.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from _common import git_commit

from embeddistill.config import TrainingConfig
from embeddistill.losses import EmbedDistillLoss
from embeddistill.models.students import build_student, query_modules
from embeddistill.models.teachers import DOCUMENT, EmbeddingCache, TeacherIdentity, load_sentence_transformer
from embeddistill.runtime import environment_record
from embeddistill.training import distributed
from embeddistill.training.batching import Documents, TrainingQueries
from embeddistill.training.distillation import DistillationTrainer

BERT_VOCAB, MPNET_VOCAB = 30522, 30527
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file; runs of other world sizes already in it are kept")
    parser.add_argument("--teacher-arch", choices=["minilm", "mpnet"], default="minilm")
    parser.add_argument("--per-gpu-batch", type=int, default=256, help="training queries per GPU and step")
    parser.add_argument("--hard-negatives", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40, help="timed training steps")
    parser.add_argument("--docs", type=int, default=16384, help="documents the teacher encodes (timed)")
    parser.add_argument("--teacher-batch", type=int, default=128, help="teacher encoding batch size")
    parser.add_argument("--teacher-dtype", choices=["fp32", "bf16"], default="fp32", help="fp32 = what distill does")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes: a quick CPU check")
    parser.add_argument("--launch", action="store_true", help="run the 1- and 2-process torchrun commands in turn")
    parser.add_argument("--nproc", default="1,2", help="with --launch: process counts to run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.per_gpu_batch, args.warmup_steps, args.steps = min(args.per_gpu_batch, 8), 2, 3
        args.docs, args.teacher_batch = min(args.docs, 96), min(args.teacher_batch, 16)
    return args


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run this script under ``torchrun --standalone --nproc_per_node N`` for each N, into the same --out."""
    forwarded = [a for a in argv if a != "--launch"]
    if "--nproc" in forwarded:
        at = forwarded.index("--nproc")
        del forwarded[at : at + 2]
    Path(args.out).unlink(missing_ok=True)
    for count in args.nproc.split(","):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", count]
        print("$", " ".join([*command, __file__, *forwarded]), flush=True)
        subprocess.run([*command, __file__, *forwarded], check=True)
    print(json.dumps(json.loads(Path(args.out).read_text()).get("scaling", {}), indent=2))
    return 0


# -- offline models and texts ---------------------------------------------------------------------------------------


def vocabulary(size: int) -> list[str]:
    """Special tokens plus generated lowercase words (each a single WordPiece token)."""
    words = (
        "".join(letters)
        for length in itertools.count(2)
        for letters in itertools.product(string.ascii_lowercase, repeat=length)
    )
    return SPECIAL + list(itertools.islice(words, size - len(SPECIAL)))


def architectures(teacher_arch: str, smoke: bool) -> tuple[dict, dict]:
    """(student, teacher) configs: ``{"kind": "bert" | "mpnet", **transformers config kwargs}``."""
    if smoke:
        small = {"num_attention_heads": 2, "max_position_embeddings": 128, "vocab_size": 1000}
        student = {"kind": "bert", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, **small}
        width = 64 if teacher_arch == "mpnet" else 32
        teacher = {
            "kind": "bert" if teacher_arch == "minilm" else "mpnet",
            "hidden_size": width,
            "num_hidden_layers": 2,
            "intermediate_size": 2 * width,
            **small,
        }
        return student, teacher
    minilm = {
        "kind": "bert",
        "vocab_size": BERT_VOCAB,
        "hidden_size": 384,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "max_position_embeddings": 512,
    }
    student = {**minilm, "num_hidden_layers": 2}
    if teacher_arch == "minilm":
        return student, {**minilm, "num_hidden_layers": 6}
    mpnet = {
        "kind": "mpnet",
        "vocab_size": MPNET_VOCAB,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 514,
    }
    return student, mpnet


def save_model(folder: Path, spec: dict, max_seq_length: int, normalize: bool, seed: int) -> str:
    """A random-initialised sentence-transformers model (transformer -> mean pooling [-> normalize]) in ``folder``."""
    import transformers
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # sentence-transformers 5.x
        from sentence_transformers.models import Normalize, Pooling, Transformer

    spec = dict(spec)
    kind = spec.pop("kind")
    hf = folder / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    (hf / "vocab.txt").write_text("\n".join(vocabulary(spec["vocab_size"])) + "\n")
    tokenizer = transformers.BertTokenizerFast(
        vocab_file=str(hf / "vocab.txt"), do_lower_case=True, model_input_names=["input_ids", "attention_mask"]
    )
    torch.manual_seed(seed)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(**spec), add_pooling_layer=False)
    else:  # [PAD] is id 0 here (MPNet's own tokenizer uses 1): positions count from the padding id
        model = transformers.MPNetModel(transformers.MPNetConfig(**spec, pad_token_id=0), add_pooling_layer=False)
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    transformer = Transformer(str(hf), max_seq_length=max_seq_length)
    modules = [transformer, Pooling(spec["hidden_size"], pooling_mode="mean")] + ([Normalize()] if normalize else [])
    SentenceTransformer(modules=modules, device="cpu").save(str(folder / "st"))
    return str(folder / "st")


def random_texts(count: int, low: int, high: int, vocab_words: int, seed: int) -> list[str]:
    """``count`` texts of ``low``..``high`` words drawn from the generated vocabulary (one token per word)."""
    words = np.array(vocabulary(vocab_words + len(SPECIAL))[len(SPECIAL) :])
    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high + 1, size=count)
    ids = rng.integers(0, len(words), size=int(lengths.sum()))
    texts, start = [], 0
    for length in lengths:
        texts.append(" ".join(words[ids[start : start + length]]))
        start += length
    return texts


# -- measurements ---------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    distributed.barrier()


def bench_training(args, student_path: str, teacher_path: str, device: torch.device, work: Path) -> dict:
    world = distributed.world_size()
    sizes = (
        {"queries": 4096, "docs": 2048, "depth": 16} if args.smoke else {"queries": 50000, "docs": 65536, "depth": 50}
    )
    query_tokens, vocab = ((6, 14), 900) if args.smoke else ((14, 30), BERT_VOCAB - 100)  # + [CLS] [SEP]
    teacher = load_sentence_transformer(teacher_path, device=str(device))
    student = build_student(student_path, teacher, asymmetric=True, device=str(device))
    dim = teacher.get_sentence_embedding_dimension()
    rng = np.random.default_rng(0)

    def unit(rows: int) -> np.ndarray:
        vectors = rng.standard_normal((rows, dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    n, docs = sizes["queries"], sizes["docs"]
    anchors = rng.integers(0, docs, size=n)
    queries = TrainingQueries(
        random_texts(n, *query_tokens, vocab, seed=1),
        unit(n),
        anchors,
        [[int(a)] for a in anchors],
        rng.integers(0, docs, size=(n, sizes["depth"])),
        rng.random(n) < 0.5,
    )
    documents = Documents([""] * docs, unit(docs))  # asymmetric: document texts are never embedded by the student
    config = TrainingConfig(
        epochs=1,
        max_steps=0,
        batch_size=args.per_gpu_batch * world,
        learning_rate=1e-3,
        device=args.device,
        precision="bf16" if device.type == "cuda" else "auto",
        checkpoint_every=0,
    )
    trainer = DistillationTrainer(
        student, queries, documents, EmbedDistillLoss(), config, hard_negatives=args.hard_negatives, out=work
    )
    torch.manual_seed(config.seed)
    query_modules(student).train()
    for step in range(args.warmup_steps):
        trainer.step(step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    for step in range(args.warmup_steps, args.warmup_steps + args.steps):
        trainer.step(step)
    synchronize(device)
    seconds = time.perf_counter() - started
    batcher_started = time.perf_counter()  # CPU work every rank repeats for the whole global batch
    for step in range(args.steps):
        trainer.batcher.batch(step)
    batcher_ms = (time.perf_counter() - batcher_started) / args.steps * 1000
    global_batch = args.per_gpu_batch * world
    return {
        "queries_per_second": global_batch * args.steps / seconds,
        "queries_per_second_per_gpu": global_batch * args.steps / seconds / world,
        "step_ms": seconds / args.steps * 1000,
        "global_batch": global_batch,
        "per_gpu_batch": args.per_gpu_batch,
        "steps": args.steps,
        "precision": trainer.precision,
        "batcher_ms_per_step": batcher_ms,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def bench_encoding(args, teacher_path: str, device: torch.device, work: Path) -> dict:
    doc_tokens, vocab = ((60, 80), 900) if args.smoke else ((270, 320), BERT_VOCAB - 100)  # truncated to max length
    texts = random_texts(args.docs, *doc_tokens, vocab, seed=2)
    teacher = load_sentence_transformer(teacher_path, device=str(device))
    if args.teacher_dtype == "bf16":
        teacher.to(torch.bfloat16)
    teacher.eval()
    warm = random_texts(2 * args.teacher_batch, *doc_tokens, vocab, seed=3)
    teacher.encode_document(warm, batch_size=args.teacher_batch, show_progress_bar=False)
    cache = EmbeddingCache(work / "cache", TeacherIdentity.of("bench-teacher", teacher))  # default shard size
    synchronize(device)
    started = time.perf_counter()
    embeddings = cache.embed(teacher, texts, DOCUMENT, batch_size=args.teacher_batch, desc="bench")
    synchronize(device)  # embed ends with a barrier and the merge of all ranks' shards
    seconds = time.perf_counter() - started
    assert embeddings.shape == (len(texts), teacher.get_sentence_embedding_dimension())
    return {
        "documents_per_second": len(texts) / seconds,
        "documents": len(texts),
        "seconds": seconds,
        "max_seq_length": teacher.max_seq_length,
        "batch_size": args.teacher_batch,
        "dtype": args.teacher_dtype,
        "shards": len(list((cache.dir / "shards").glob("*.json"))),
    }


def shared_workdir() -> Path:
    """A fresh temporary folder, the same on every rank (single node)."""
    holder = [tempfile.mkdtemp(prefix="embeddistill-bench-") if distributed.is_main() else None]
    if distributed.world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    return Path(holder[0])


def merge_results(path: Path, settings: dict, run: dict, world: int, meta: dict) -> dict:
    """Keep runs of other world sizes already in ``path`` when they used the same settings; add the scaling."""
    result = {}
    if path.exists():
        try:
            result = json.loads(path.read_text())
        except ValueError:
            result = {}
        if result.get("settings") != settings or result.get("device") != meta["device"]:
            result = {}
    runs = {**result.get("runs", {}), f"world_size_{world}": run}
    result = {**meta, "settings": settings, "runs": runs}
    one, two = runs.get("world_size_1"), runs.get("world_size_2")
    if one and two:
        train = two["train"]["queries_per_second"] / one["train"]["queries_per_second"]
        encode = two["encode"]["documents_per_second"] / one["encode"]["documents_per_second"]
        result["scaling"] = {
            "train_2gpu_over_1gpu": train,
            "train_efficiency": train / 2,
            "encode_2gpu_over_1gpu": encode,
            "encode_efficiency": encode / 2,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.launch:
        return launch(args, argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()  # no load reports of the random models
    device = distributed.init_from_env(args.device)
    world, main_rank = distributed.world_size(), distributed.is_main()
    if device.type == "cpu" and args.smoke:
        torch.set_num_threads(1)
    work = shared_workdir()
    try:
        student_spec, teacher_spec = architectures(args.teacher_arch, args.smoke)
        max_query, max_doc = (32, 64) if args.smoke else (64, 256)
        if main_rank:
            save_model(work / "student", student_spec, max_query, normalize=False, seed=0)
            save_model(work / "teacher", teacher_spec, max_doc, normalize=True, seed=1)
        distributed.barrier()
        student_path, teacher_path = str(work / "student" / "st"), str(work / "teacher" / "st")
        train = bench_training(args, student_path, teacher_path, device, work / "train")
        encode = bench_encoding(args, teacher_path, device, work)
    except BaseException:
        if main_rank:
            shutil.rmtree(work, ignore_errors=True)
        raise
    distributed.barrier()
    if main_rank:
        shutil.rmtree(work, ignore_errors=True)
    if main_rank:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else environment_record(())["machine"]["cpu"]
        meta = {
            "benchmark": "distributed_throughput",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "device": name,
            "device_type": device.type,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
        settings = {
            "teacher_arch": args.teacher_arch,
            "student": student_spec,
            "teacher": teacher_spec,
            "per_gpu_batch": args.per_gpu_batch,
            "hard_negatives": args.hard_negatives,
            "steps": args.steps,
            "docs": args.docs,
            "teacher_batch": args.teacher_batch,
            "teacher_dtype": args.teacher_dtype,
            "smoke": args.smoke,
        }
        backend = dist.get_backend() if distributed.is_initialized() else None
        run = {"world_size": world, "backend": backend, "train": train, "encode": encode}
        out = Path(args.out)
        result = merge_results(out, settings, run, world, meta)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({"world_size": world, "train": train, "encode": encode, **result.get("scaling", {})}))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
