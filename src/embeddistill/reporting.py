"""The human-readable side-by-side report of a distillation run."""

from __future__ import annotations

from pathlib import Path

from embeddistill.storage import atomic_write_text


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def _size(system: dict) -> str:
    return f"{_millions(system['query_encoder_parameters'])} ({_millions(system['query_encoder_compute_parameters'])})"


def report_table(summary: dict) -> str:
    """A Markdown table: quality, retention, CPU latency and size of teacher and student."""
    metrics = list(summary["retention"])
    teacher, student = summary["teacher"], summary["student"]
    batches = list(teacher["latency"])
    header = [
        "",
        *metrics,
        *(f"CPU ms {b.removesuffix('_ms')}" for b in batches),
        "query-encoder params (w/o embeddings)",
    ]
    ratio = teacher["query_encoder_compute_parameters"] / student["query_encoder_compute_parameters"]
    rows = [
        [name, *(f"{system[m]:.4f}" for m in metrics), *(f"{system['latency'][b]:.2f}" for b in batches), _size(system)]
        for name, system in (("teacher", teacher), ("student", student))
    ]
    rows.append(
        [
            "student / teacher",
            *(f"{100 * summary['retention'][m]:.1f}%" for m in metrics),
            *(f"{summary['speedup'][b.removesuffix('_ms')]:.2f}x faster" for b in batches),
            f"{ratio:.1f}x fewer (w/o embeddings)",
        ]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path: Path, summary: dict) -> None:
    timings = summary["timings"]
    counts = summary["training_queries"]
    dropped = counts.get("roundtrip_dropped")
    roundtrip = f" ({dropped} more dropped by the round-trip filter)" if dropped else ""
    kind = "asymmetric (teacher document tower, frozen)" if summary["student"]["asymmetric"] else "symmetric"
    text = f"""# Distillation report

Teacher `{summary["teacher"]["model"]}`, student `{summary["student"]["model"]}`, {kind}.
Evaluated on `{summary["dataset"]}` split `{summary["eval_split"]}` ({summary["eval_queries"]} queries), exact search.

{report_table(summary)}

CPU latency: median milliseconds to embed a batch of queries (tokenisation included),
{summary["environment"]["threads"]} threads.

Training queries: {counts["labelled"]} labelled, {counts["extra"]} extra unlabeled,
{counts["generated"]} generated{roundtrip}.
Training: {summary["training"]["steps"]} steps in {timings["train_seconds"]:.0f} s;
teacher caching {timings["teacher_cache_seconds"]:.0f} s;
evaluation {timings["evaluation_seconds"]:.0f} s; total {timings["total_seconds"]:.0f} s.
"""
    atomic_write_text(path, text)
