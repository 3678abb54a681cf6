"""The ``smallest`` section of ``speed_cpu.json``: the smallest student against the teacher in the same backend.

The teacher (all-mpnet-base-v2) and the smallest student (2-layer MiniLM + projection, asymmetric) are each
exported with ``embeddistill.serving.onnx.export_onnx`` (fp32 and int8), then six query encoders (PyTorch fp32, ONNX
fp32, ONNX int8, for each model) are timed interleaved on the same batches of real queries, tokenisation included,
so all see the same machine load. Each encoder runs ``block`` calls in a row before the next one runs its own:
with a block of 1 every call follows five other encoders' (the 110M-parameter teacher's among them) and finds the
caches and idle worker threads they left; a block of 10 is what a service running one model sees, while the
encoders still alternate. Both are measured (``--blocks``); the first is the headline. Speed-ups are teacher over
student in the same backend and precision. The nDCG@10 ratios are the export's own retrieval-parity check (SciFact
test).
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import numpy as np
import torch

BACKENDS = ("pytorch_fp32", "onnx_fp32", "onnx_int8")


def timed_functions(model_path: str, onnx_dir: Path, threads: int) -> dict:
    """Backend -> ``texts -> embeddings`` (tokenisation included), each the lean path of its backend."""
    from embeddistill.serving.onnx import OnnxQueryEncoder
    from embeddistill.serving.onnx_parity import load_query_encoder

    encoder = load_query_encoder(model_path)

    def pytorch(texts):
        with torch.inference_mode():
            return encoder(encoder.tokenize(texts))

    runtimes = {p: OnnxQueryEncoder(onnx_dir, threads=threads, precision=p) for p in ("fp32", "int8")}
    return {
        "pytorch_fp32": pytorch,
        "onnx_fp32": lambda texts: runtimes["fp32"].run(runtimes["fp32"].tokenize(texts)),
        "onnx_int8": lambda texts: runtimes["int8"].run(runtimes["int8"].tokenize(texts)),
    }


def interleaved(functions: dict, queries: list[str], size: int, repeats: int, block: int = 1, warmup: int = 3) -> dict:
    """Median, p10 and p90 milliseconds per batch of each function over ``repeats`` timed calls (after ``warmup``
    untimed ones); each function runs ``block`` calls in a row, on the same batches as the others, then the next."""
    import time

    timings: dict[str, list[float]] = {name: [] for name in functions}
    calls = repeats + warmup
    for round_ in range(math.ceil(calls / block)):
        first = round_ * block
        batches = [
            (i, [queries[(i * size + j) % len(queries)] for j in range(size)])
            for i in range(first, min(first + block, calls))
        ]
        for name, function in functions.items():
            for i, batch in batches:
                start = time.perf_counter()
                function(batch)
                if i >= warmup:
                    timings[name].append((time.perf_counter() - start) * 1000)
    return {
        name: {
            "ms": statistics.median(values),
            "p10_ms": float(np.percentile(values, 10)),
            "p90_ms": float(np.percentile(values, 90)),
        }
        for name, values in timings.items()
    }


def export_both(models: dict[str, str], work: Path, parity) -> dict:
    """Role -> export info of ``models[role]`` exported to ``work/onnx-ROLE`` with int8 (parity checked where given)."""
    from embeddistill.serving.onnx import export_onnx

    return {
        role: export_onnx(path, work / f"onnx-{role}", int8=True, parity=parity.get(role))
        for role, path in models.items()
    }


def smallest_section(models: dict[str, str], queries: list[str], args, work: Path) -> dict:
    """``{"teacher": {backend: {batchN_ms ...}}, "smallest": ..., speed-ups, parity}`` (see the module doc)."""
    from embeddistill.serving.onnx import ParityCheck

    threads = torch.get_num_threads()
    parity = {}
    if args.parity_student:
        parity_info = export_both({"parity": args.parity_student}, work, {"parity": ParityCheck(args.dataset)})
        parity = parity_info["parity"]
    exports = export_both(models, work, {})
    functions = {
        f"{role}.{backend}": function
        for role in models
        for backend, function in timed_functions(models[role], work / f"onnx-{role}", threads).items()
    }
    by_block = {block: timed_rows(functions, queries, args, block) for block in args.blocks}
    rows = by_block[args.blocks[0]]
    section = rows["smallest"]
    section["speedup_vs_teacher_same_backend"] = speedups(rows, args.batch_sizes)
    section["block"] = args.blocks[0]
    section["other_blocks"] = {
        str(block): {**other, "speedup_vs_teacher_same_backend": speedups(other, args.batch_sizes)}
        for block, other in by_block.items()
        if block != args.blocks[0]
    }
    section["exports"] = {role: _export_summary(info) for role, info in exports.items()}
    section["parity"] = _parity_summary(parity, args.parity_student)
    if parity:
        ratio = parity["precisions"]["int8"].get("nDCG@10_ratio_vs_fp32")
        section["onnx_int8"]["nDCG@10_ratio_vs_fp32"] = ratio
        section["onnx_fp32"]["nDCG@10_ratio_vs_fp32"] = parity["precisions"]["fp32"].get("nDCG@10_ratio_vs_fp32")
    return {"smallest": section, "teacher_same_backend": rows["teacher"], "threads": threads}


def timed_rows(functions: dict, queries: list[str], args, block: int) -> dict:
    """``{role: {backend: {batchN_ms, batchN_p10_ms, batchN_p90_ms, batchN_repeats}}}`` with calls in blocks."""
    rows: dict = {role: {b: {} for b in BACKENDS} for role in ("teacher", "smallest")}
    for size in args.batch_sizes:
        repeats = args.repeats if size == 1 else max(3, args.repeats // 4)
        for name, timing in interleaved(functions, queries, size, repeats, block=min(block, repeats)).items():
            role, backend = name.split(".")
            rows[role][backend].update({f"batch{size}_{key}": value for key, value in timing.items()})
            rows[role][backend][f"batch{size}_repeats"] = repeats
    return rows


def speedups(rows: dict, batch_sizes: list[int]) -> dict[str, float]:
    """Teacher over smallest student per backend and batch size; ``batchN`` alone is int8 against int8."""
    found = {
        f"{backend}.batch{size}": rows["teacher"][backend][f"batch{size}_ms"]
        / rows["smallest"][backend][f"batch{size}_ms"]
        for backend in BACKENDS
        for size in batch_sizes
    }
    return found | {f"batch{size}": found[f"onnx_int8.batch{size}"] for size in batch_sizes}


def _export_summary(info: dict) -> dict:
    keys = ("source", "fused_operators", "dimension", "parity_max_abs_diff_sample", "precisions", "export_seconds")
    return {key: info.get(key) for key in keys}


def _parity_summary(info: dict, model: str) -> dict:
    if not info:
        return {"run": False, "why": "no --parity-student given"}
    return {
        "run": True,
        "model": os.path.basename(os.path.normpath(os.path.dirname(os.path.normpath(model)))) + "/student",
        "retrieval_parity": info["retrieval_parity"],
        "precisions": info["precisions"],
        "fused_operators": info["fused_operators"],
    }
