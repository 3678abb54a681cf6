"""The human-readable side-by-side report of a distillation run (``report.md`` and the CLI's table).

One table for both lanes, read from a :class:`~embeddistill.pipeline.summary.RunSummary`: a dual-encoder run shows
teacher and student, a cross-encoder run the first stage, the CE reranker and the student; below them, the
off-the-shelf baselines scored beside the student (``--baselines``), each with a sentence saying whether the student
beats it. Systems that were not timed (a CE reranks, it has no query encoder) show a dash.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from embeddistill.evaluation.latency import SPREAD_PERCENTILES, medians
from embeddistill.storage import atomic_write_text

if TYPE_CHECKING:  # the summary type only: evaluation never imports the pipeline at run time
    from embeddistill.pipeline.summary import RunSummary, System

_DASH = "–"


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def _size(system: System) -> str:
    if system.query_encoder_parameters is None or system.query_encoder_compute_parameters is None:
        return _DASH
    total, compute = system.query_encoder_parameters, system.query_encoder_compute_parameters
    return f"{_millions(total)} ({_millions(compute)})"


def _systems(summary: RunSummary) -> list[tuple[str, System]]:
    """The table's rows: the first stage (CE runs), the teacher and the student; a label-free run shows the student
    as it started too (its agreement before training), so the table says what training bought."""
    rows = [("first stage", summary.cross_encoder.first_stage)] if summary.cross_encoder else []
    rows.append((summary.teacher_label, summary.teacher))
    agreement = summary.agreement
    if agreement and agreement["start"]:
        start = dataclasses.replace(summary.student, metrics=agreement["start"], latency=None)
        start.query_encoder_parameters = start.query_encoder_compute_parameters = None  # the same encoder: a dash
        rows.append(("student at start", start))
    baselines = [(f"`{name}` as it comes", system) for name, system in summary.baselines.items()]
    return [*rows, (summary.student_label, summary.student), *baselines]


def _value(values: dict[str, float], metric: str) -> str:
    return f"{values[metric]:.4f}" if metric in values else _DASH


def _row(name: str, system: System, metrics: list[str], batches: list[str]) -> list[str]:
    latency = [f"{system.latency[b]:.2f}" if system.latency else _DASH for b in batches]
    return [name, *(_value(system.metrics, m) for m in metrics), *latency, _size(system)]


def _ratio_row(summary: RunSummary, metrics: list[str], batches: list[str]) -> list[str]:
    """Student over teacher: retention, speedup over the reference query encoder, and how much smaller it is."""
    reference, student = summary.latency_reference, summary.student
    label = "student / cross-encoder" if summary.cross_encoder else "student / teacher"
    sizes = reference.query_encoder_compute_parameters, student.query_encoder_compute_parameters
    speedups = [summary.speedup.get(b.removesuffix("_ms")) for b in batches]  # none for a teacher behind an API
    return [
        label,
        *(f"{100 * summary.retention[m]:.1f}%" if m in summary.retention else _DASH for m in metrics),
        *(f"{speedup:.2f}x faster" if speedup else _DASH for speedup in speedups),
        f"{sizes[0] / sizes[1]:.1f}x fewer (w/o embeddings)" if all(sizes) else _DASH,
    ]


def _spread(latency: dict | None) -> list[str]:
    """``"1: 9.80-11.02"`` per batch size whose repeats' spread (p10 and p90 ms) the result holds."""
    low, high = SPREAD_PERCENTILES
    ranges = []
    for key in medians(latency or {}):
        stem = key.removesuffix("_ms")
        if f"{stem}_p{low}_ms" in latency and f"{stem}_p{high}_ms" in latency:
            size = stem.removeprefix("batch")
            ranges.append(f"{size}: {latency[f'{stem}_p{low}_ms']:.2f}-{latency[f'{stem}_p{high}_ms']:.2f}")
    return ranges


def _spread_line(summary: RunSummary) -> str:
    """The spread of the latency repeats per system, where the run recorded it."""
    name = "first stage" if summary.cross_encoder else "teacher"
    parts = [
        f"{label} (batch {', '.join(ranges)})"
        for label, system in ((name, summary.latency_reference), ("student", summary.student))
        if (ranges := _spread(system.latency))
    ]
    low, high = SPREAD_PERCENTILES
    return f"\nSpread of the repeats, p{low}-p{high} ms: {'; '.join(parts)}." if parts else ""


def report_table(summary: RunSummary) -> str:
    """A Markdown table: quality, retention, CPU latency and size of every system of the run."""
    metrics = list(summary.retention if summary.labelled else summary.student.metrics)
    batches = list(medians(summary.student.latency or {}))
    header = [
        "",
        *metrics,
        *(f"CPU ms {b.removesuffix('_ms')}" for b in batches),
        "query-encoder params (w/o embeddings)",
    ]
    rows = [_row(name, system, metrics, batches) for name, system in _systems(summary)]
    rows.append(_ratio_row(summary, metrics, batches))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _run_line(summary: RunSummary) -> str:
    kind = "asymmetric (teacher document tower, frozen)" if summary.student.asymmetric else "symmetric"
    if summary.cross_encoder:
        first = summary.cross_encoder.first_stage.model
        return (
            f"Cross-encoder teacher `{summary.teacher.model}` ({summary.teacher.kind}) reranking the first stage "
            f"`{first}`, student `{summary.student.model}`, {kind}."
        )
    return f"Teacher `{summary.teacher.model}`, student `{summary.student.model}`, {kind}."


def _timings_line(summary: RunSummary) -> str:
    timings = summary.timings
    if summary.cross_encoder:
        preparation = (
            f"first stage {timings['first_stage_seconds']:.0f} s; "
            f"cross-encoder scoring {timings['cross_encoder_scoring_seconds']:.0f} s"
        )
    else:
        preparation = f"teacher caching {timings['teacher_cache_seconds']:.0f} s"
    return (
        f"Training: {summary.training['steps']} steps in {timings['train_seconds']:.0f} s;\n{preparation};\n"
        f"evaluation {timings['evaluation_seconds']:.0f} s; total {timings['total_seconds']:.0f} s."
    )


def _evaluated_line(summary: RunSummary) -> str:
    if summary.labelled:
        split = f"split `{summary.eval_split}` ({summary.eval_queries} queries)"
        return f"Evaluated on `{summary.dataset}` {split}, exact search."
    agreement = summary.agreement
    if agreement is None:
        return f"`{summary.dataset}` has no relevance labels and the label-free check was off: quality not measured."
    return (
        f"`{summary.dataset}` has no relevance labels: quality is the label-free agreement with the teacher on "
        f"{agreement['queries']} held-out training queries\n(`{agreement['metric']}`: nDCG of the student's top 10 "
        "against the teacher's own; `query_cosine`: mean cosine of their query embeddings)."
    )


def _api_line(summary: RunSummary) -> str:
    """What a teacher behind an endpoint cost (black-box teachers only)."""
    api = summary.teacher_api
    if not api:
        return ""
    return (
        f"\nTeacher endpoint: {api['requests']} requests ({api['retries']} retries), {api['texts_sent']} texts sent, "
        f"{api['cache_hits']} answered by the cache, {api['wait_seconds']:.0f} s waiting on it."
    )


def _baselines_line(summary: RunSummary) -> str:
    """Whether the student beats each off-the-shelf model scored beside it (each searching its own index)."""
    sentences = [sentence for _, sentence in summary.versus_baselines()]
    return ("\n" + "\n".join(sentences) + "\n") if sentences else ""


def write_report(path: Path, summary: RunSummary) -> None:
    """``report.md``: what was distilled into what, the table, and where the time went."""
    counts = summary.training_queries
    dropped = counts.get("roundtrip_dropped")  # present only when the round-trip filter ran
    roundtrip = f" ({dropped} more dropped by the round-trip filter)" if dropped else ""
    text = f"""# Distillation report

{_run_line(summary)}
{_evaluated_line(summary)}

{report_table(summary)}
{_baselines_line(summary)}
CPU latency: median milliseconds to embed a batch of queries (tokenisation included),
{summary.environment.threads} threads.{_spread_line(summary)}

Training queries: {counts["labelled"]} labelled, {counts["extra"]} extra unlabeled,
{counts["generated"]} generated{roundtrip}.
{_timings_line(summary)}{_api_line(summary)}
"""
    atomic_write_text(path, text)
