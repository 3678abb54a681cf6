"""Write BENCHMARKS.md from the result files: every number in it comes from ``benchmarks/results/*.json``.

    python benchmarks/report.py        # -> BENCHMARKS.md and benchmarks/results/*.png (pip install -e ".[bench]")

Known files get their own tables (quality_*.json, quickstart, ablation, defaults, ANN, ONNX, serving, distributed);
files whose layout this script does not know (query generation, cross-encoders, speed, anything new) are shown as
generic key/value tables, and expected files that do not exist yet are listed as "not yet measured". Each section
names the command recorded in its file. Charts (matplotlib, Agg backend): retention per dataset and method, and
quality against query-encoder speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

from _common import REPO

from embeddistill.storage import atomic_write_text

logger = logging.getLogger("report")

QUALITY_DATASETS = {
    "scifact": "SciFact",
    "nfcorpus": "NFCorpus",
    "msmarco-dl": "TREC DL19 / DL20 (MS MARCO pool)",
    "squad": "SQuAD-dev (split by article)",
}
# The five evaluation sets of the headline: (table, split).
HEADLINE_SETS = (
    ("scifact", "test"),
    ("nfcorpus", "test"),
    ("squad", "test"),
    ("msmarco-dl", "dl19"),
    ("msmarco-dl", "dl20"),
)
HEADLINE_METHODS = ("embeddistill", "embeddistill-dev", "score-only", "peer", "untrained")
SMALLEST_STUDENT = "minilm-2L-asym"
# benchmarks/speed_cpu.py's name of each quality-table student's query encoder.
SPEED_CPU_ENCODERS = {
    "mpnet-2L-asym": "teacher:2 (asymmetric)",
    "minilm-asym": "all-MiniLM-L6-v2 + projection (asymmetric)",
    "minilm-2L-asym": "2-layer MiniLM + projection (asymmetric)",
    "minilm-sym": "all-MiniLM-L6-v2 + projection (symmetric)",
}
RETENTION_CHART = "chart_retention.png"
SPEED_CHART = "chart_quality_vs_speed.png"


# -- formatting ------------------------------------------------------------------------------------------------


def fmt(value) -> str:
    """A table cell: floats at a precision that fits their size, everything else as text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e7):
            return f"{value:.3g}"
        if 0.999 < abs(value) < 1:  # agreement figures such as a cosine of 0.99998 must not read as exactly 1
            return f"{value:.6f}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, list):
        text = ", ".join(fmt(v) for v in value[:8]) + (", ..." if len(value) > 8 else "")
        return text.replace("|", "\\|")
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()).replace("|", "\\|")
    return str(value).replace("|", "\\|").replace("\n", " ")


def millions(value) -> str:
    return "" if value is None else f"{value / 1e6:.1f}M"


def times(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def p_value(value) -> str:
    return "" if value is None else f"{value:.3f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def source_line(name: str, data: dict) -> str:
    command = data.get("command") if isinstance(data, dict) else None
    made_by = f"made by `{command}`" if command else "the command is not recorded in the file"
    date = data.get("date") if isinstance(data, dict) else None
    return f"Source: `benchmarks/results/{name}`, {made_by}" + (f" ({date})." if date else ".")


# -- generic rendering (layouts this script does not know) -----------------------------------------------------


MAX_COLUMNS = 30
BULK_KEYS = ("per_query", "query_ids")  # per-query data: input to the tests, not something to read as a table


def is_bulk(key: str, value) -> bool:
    """Data too wide to show as a table (per-query values, or any dict of many keys): summarised instead."""
    if key.rsplit(".", 1)[-1] in BULK_KEYS:
        return True
    if not isinstance(value, dict):
        return False
    inner = [len(v) for v in value.values() if isinstance(v, dict)]
    return len(value) > MAX_COLUMNS and not inner or max(inner, default=0) > MAX_COLUMNS


def summary_of(value) -> str:
    size = len(value) if isinstance(value, dict | list) else 1
    return f"({size} entries, not shown)"


def flatten(value, prefix: str = "", depth: int = 3) -> dict:
    """Scalars of a nested dict under dotted keys; lists of scalars kept whole; deeper structure summarised."""
    if prefix and is_bulk(prefix.rstrip("."), value):
        return {prefix.rstrip("."): summary_of(value)}
    if isinstance(value, dict) and depth > 0:
        flat: dict = {}
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}{key}.", depth - 1))
        return flat
    if isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        return {prefix.rstrip("."): f"[{len(value)} entries]"}
    if isinstance(value, dict):
        return {prefix.rstrip("."): f"{{{len(value)} keys}}"}
    return {prefix.rstrip("."): value}


def records_table(records: list[dict], limit: int = 40) -> list[str]:
    flat = [flatten(record, depth=2) for record in records[:limit]]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    lines = table(columns, [[fmt(row.get(c)) for c in columns] for row in flat])
    if len(records) > limit:
        lines.insert(-1, f"| ... {len(records) - limit} more rows in the file |" + " |" * (len(columns) - 1))
    return lines


def _is_flat(value: dict) -> bool:
    return all(
        not isinstance(v, dict | list) or (isinstance(v, list) and not any(isinstance(i, dict | list) for i in v))
        for v in value.values()
    )


def render_generic(data, path: str = "", depth: int = 0) -> list[str]:
    """Key/value tables for scalars, a table per list or dict of flat records, nested dicts under their own path."""
    if isinstance(data, list):
        return records_table([d if isinstance(d, dict) else {"value": d} for d in data])
    lines: list[str] = []
    scalars = {
        k: v
        for k, v in data.items()
        if (not isinstance(v, dict | list) or (isinstance(v, list) and _is_flat({"": v})))
        and k not in ("command", "date")
    }
    if scalars:
        heading = [f"**{path.rstrip('.')}**", ""] if path else []
        lines += heading + table(["key", "value"], [[k, fmt(v)] for k, v in scalars.items()])
    bulky = [key for key, value in data.items() if is_bulk(key, value)]
    if bulky:
        lines += [f"Not shown: {', '.join(f'`{path}{key}`' for key in bulky)} (per-query or other bulk data).", ""]
    for key, value in data.items():
        name = f"{path}{key}"
        if key in bulky:
            continue
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            lines += [f"**{name}**", ""] + records_table(value)
        elif isinstance(value, dict) and value and all(isinstance(v, dict) and _is_flat(v) for v in value.values()):
            lines += [f"**{name}**", ""] + records_table([{"": k, **inner} for k, inner in value.items()])
        elif isinstance(value, dict) and value and depth < 3:
            lines += render_generic(value, f"{name}.", depth + 1)
        elif isinstance(value, dict) and value:
            lines += [f"**{name}**", ""] + table(["key", "value"], [[k, fmt(v)] for k, v in flatten(value).items()])
    return lines


# -- quality_*.json ---------------------------------------------------------------------------------------------


def quality_row_order(record: dict) -> list[tuple[str, str, str]]:
    """``(row key, student label, method label)`` in table order: teacher, BM25, then each student's methods; the
    student label only on its first row (a group, easier to read)."""
    rows = record["rows"]
    ordered = [(key, rows[key]["label"], "") for key in ("teacher", "bm25") if key in rows]
    for student, student_label in record["students"].items():
        keys = [(f"{student}/{m}", label) for m, label in record["methods"].items() if f"{student}/{m}" in rows]
        ordered += [(key, student_label if i == 0 else "", label) for i, (key, label) in enumerate(keys)]
    return ordered


def render_quality_split(record: dict, split: str) -> list[str]:
    metrics, rows = record["metrics"], record["rows"]
    tests = record.get("significance", {}).get(split, {})
    first = metrics[0]
    header = ["student", "method", *metrics, f"retention {first}", f"p vs EmbedDistill ({first})", "train s"]
    body = []
    several_devices = len({row.get("device") for row in rows.values() if row.get("training")}) > 1
    for key, student_label, method_label in quality_row_order(record):
        evaluation = rows[key]["evaluations"][split]
        student = rows[key].get("student")
        p = tests.get(student, {}).get(key, {}).get(first) if student else None
        train = rows[key].get("timings", {}).get("train_seconds") if rows[key].get("training") else None
        train_cell = fmt(train) + (f" ({rows[key].get('device')})" if several_devices and train is not None else "")
        body.append(
            [student_label, method_label, *(fmt(evaluation["metrics"][m]) for m in metrics)]
            + [percent(evaluation.get("retention", {}).get(first)), p_value(p), train_cell]
        )
    lines = table(header, body)
    versus = [
        [
            record["students"].get(student, student),
            rows[other]["label"],
            *(p_value(tested[other].get(m)) for m in metrics),
        ]
        for student, tested in tests.items()
        for other in ("teacher", "bm25")
        if other in tested
    ]
    if versus:
        lines += [f"EmbedDistill against the teacher and BM25 on {split} (paired permutation p):", ""]
        lines += table(["student", "against", *metrics], versus)
    return lines


def render_query_encoders(record: dict) -> list[str]:
    encoders = record.get("query_encoders", {})
    teacher = record["rows"].get("teacher", {}).get("query_encoder", {})
    body = []
    if teacher:
        body.append(
            ["teacher", millions(teacher.get("parameters")), millions(teacher.get("compute_parameters")), "", "", ""]
        )
    for student, described in encoders.items():
        latency = described.get("latency_cpu_ms", {})
        mine, theirs = latency.get("student", {}), latency.get("teacher", {})
        speedup = theirs.get("batch1_ms") / mine["batch1_ms"] if mine.get("batch1_ms") and theirs else None
        body.append(
            [
                record["students"].get(student, student),
                millions(described.get("parameters")),
                millions(described.get("compute_parameters")),
                fmt(mine.get("batch1_ms")),
                fmt(mine.get("batch32_ms")),
                times(speedup),
            ]
        )
    if not body:
        return []
    header = ["query encoder", "parameters", "w/o embeddings", "CPU ms batch 1", "CPU ms batch 32", "vs teacher b1"]
    if not any(described.get("latency_cpu_ms") for described in encoders.values()):  # trained on a GPU
        body = [row[:3] for row in body]
        return ["Query encoders (CPU latency: `speed_cpu.json`, below):", "", *table(header[:3], body)]
    return ["Query encoders (CPU latency measured next to the teacher, taking turns):", "", *table(header, body)]


def render_quality(name: str, record: dict) -> list[str]:
    title = QUALITY_DATASETS.get(record.get("dataset"), record.get("dataset", name))
    settings = record.get("settings", {})
    lines = [f"### {title}", "", record.get("description", ""), ""]
    commands = list(dict.fromkeys(i["command"] for i in record.get("invocations", []))) or [record.get("command")]
    lines += [f"Source: `benchmarks/results/{name}` (last row {record.get('date', '?')}), made by:", ""]
    lines += [f"    {command}" for command in commands if command] + [""]
    devices = sorted({row.get("device", "?") for row in record["rows"].values() if "device" in row})
    machines = sorted(
        {
            fmt((i.get("machine") or {}).get("gpu") or (i.get("machine") or {}).get("cpu"))
            for i in record.get("invocations", [])
        }
    )
    lines += [
        f"Teacher `{settings.get('teacher')}`, {settings.get('epochs')} epochs, seed {settings.get('seed')}, "
        f"overrides {settings.get('overrides') or 'none'}; training queries {record.get('training_queries')}; "
        f"evaluation queries {record.get('eval_queries')}; devices {', '.join(devices) or '?'} "
        f"({', '.join(machines) or '?'}).",
        "",
    ]
    for split in record.get("eval_splits", []):
        lines += [f"**{split}**", ""] + render_quality_split(record, split)
    lines += render_query_encoders(record)
    if record.get("unavailable"):
        lines += [f"Not available: {fmt(record['unavailable'])}.", ""]
    if record.get("notes"):
        lines += [f"Note: {note}." for note in record["notes"]] + [""]
    missing = [
        label
        for student, label in record["students"].items()
        if not any(key.startswith(f"{student}/") for key in record["rows"])
    ]
    if missing:
        lines += [f"Students with no row in this table yet: {', '.join(missing)}.", ""]
    if record.get("invalidated"):
        invalid = record["invalidated"]
        lines += [f"Rows left out: {invalid['reason']}. Their nDCG@10 was {fmt(invalid['rows_nDCG@10'])}.", ""]
    if record.get("errors"):
        lines += [f"Rows that failed in the last run (rerun to retry): {fmt(record['errors'])}.", ""]
    return lines


# -- the other known files ----------------------------------------------------------------------------------------


def render_quickstart(data: dict) -> list[str]:
    teacher, student = data["teacher"], data["student"]
    metrics = [m for m in ("nDCG@10", "RR@10", "R@100") if m in teacher]
    header = ["", *metrics, "CPU ms batch 1", "CPU ms batch 32", "query-encoder params"]

    def row(name: str, side: dict) -> list[str]:
        latency = side.get("latency", {})
        return [
            name,
            *(fmt(side[m]) for m in metrics),
            fmt(latency.get("batch1_ms")),
            fmt(latency.get("batch32_ms")),
            millions(side.get("query_encoder_parameters")),
        ]

    retention = data.get("retention", {})
    speedup = data.get("speedup", {})
    ratio = [
        "student / teacher",
        *(percent(retention.get(m)) for m in metrics),
        times(speedup.get("batch1")) + " faster",
        times(speedup.get("batch32")) + " faster",
        "",
    ]
    lines = [
        f"Teacher `{teacher.get('model')}`, student `{student.get('model')}` (asymmetric "
        f"{student.get('asymmetric')}), {data.get('eval_queries')} {data.get('eval_split')} queries; training "
        f"queries {data.get('training_queries')}.",
        "",
    ]
    return lines + table(header, [row("teacher", teacher), row("student", student), ratio])


def render_ablation(data: dict) -> list[str]:
    teacher = data["teacher"]
    metrics = list(teacher)
    first = metrics[0]
    body = [["teacher", *(fmt(teacher[m]) for m in metrics), "100%", ""]]
    for name, row in data["rows"].items():
        p = row.get("p_value_vs_embeddistill", {}).get(first)
        body.append([name, *(fmt(row["metrics"][m]) for m in metrics), percent(row["retention"][first]), p_value(p)])
    lines = [f"Device {data.get('device')}.", ""]
    lines += table(["method", *metrics, f"retention {first}", f"p vs EmbedDistill ({first})"], body)
    if data.get("peer_errors"):
        lines += [f"Peer errors: {fmt(data['peer_errors'])}", ""]
    return lines


def render_defaults(data: dict) -> list[str]:
    lines = [fmt(data.get("purpose")) + f"; teacher {data.get('teacher')}, student {data.get('student')}.", ""]
    if data.get("summary"):  # many calls of one point each: one table of points, then the commands
        return lines + render_defaults_summary(data)
    for call in data.get("calls", []):
        lines += [f"`{call.get('command')}` ({call.get('date')}):", ""]
        body = [
            [
                Path(str(r.get("dataset"))).name,
                fmt(r.get("options") or "base"),
                fmt(r.get("teacher_nDCG@10")),
                fmt(r.get("student_nDCG@10")),
                percent(r.get("retention_nDCG@10")),
            ]
            for r in call.get("results", [])
        ]
        lines += table(["dataset", "options", "teacher nDCG@10", "student nDCG@10", "retention"], body)
    if data.get("chosen"):
        lines += [f"Chosen: {fmt(data['chosen'])}.", ""]
    return lines


def render_defaults_summary(data: dict) -> list[str]:
    datasets = sorted({dataset for point in data["summary"] for dataset in point["retention_nDCG@10"]})
    body = [
        [
            fmt(point["options"] or "base"),
            *(percent(point["retention_nDCG@10"].get(dataset)) for dataset in datasets),
            percent(point["mean_retention_nDCG@10"]),
            fmt(point["runs"]),
            ", ".join(f"{d} {percent(low)} to {percent(high)}" for d, (low, high) in point.get("spread", {}).items()),
        ]
        for point in data["summary"]
    ]
    header = ["options", *(f"{d} retention" for d in datasets), "mean", "runs", "spread of the runs"]
    lines = ["Retention of the teacher's nDCG@10 on the held-out queries (mean over runs):", ""]
    lines += table(header, body)
    if data.get("chosen") is not None:
        lines += [f"Chosen: {fmt(data['chosen'] or 'base')}.", ""]
    lines += ["Commands:", ""] + [f"    {call['command']}" for call in data.get("calls", [])] + [""]
    return lines


def render_ann(data: dict) -> list[str]:
    lines = [
        f"{data.get('documents')} documents, {data.get('queries')} queries, teacher `{data.get('teacher')}`, "
        f"k={data.get('k')}, nDCG on `{data.get('nDCG_split')}`.",
        "",
    ]
    body = [
        [
            r.get("type"),
            fmt(r.get("params") or ""),
            fmt(r.get("recall@10")),
            fmt(r.get("nDCG@10")),
            fmt(r.get("search_ms_per_query")),
            fmt(r.get("build_seconds")),
        ]
        for r in data.get("results", [])
    ]
    return lines + table(["index", "parameters", "recall@10", "nDCG@10", "search ms/query", "build s"], body)


def render_onnx(data: dict) -> list[str]:
    lines = [
        f"Max abs difference ONNX vs PyTorch {fmt(data.get('max_abs_diff'))}, identical top-10 on "
        f"{data.get('identical_top10')} of {data.get('queries')} queries.",
        "",
    ]
    body = [
        [batch, fmt(v.get("pytorch_ms")), fmt(v.get("onnxruntime_ms")), times(v.get("speedup"))]
        for batch, v in data.get("latency", {}).items()
    ]
    return lines + table(["batch", "PyTorch ms", "ONNX Runtime ms", "speed-up"], body)


def render_serve(data: dict) -> list[str]:
    body = [
        [
            name,
            fmt(r.get("query_model")),
            fmt(r.get("throughput_rps")),
            fmt(r.get("latency_ms", {}).get("p50")),
            fmt(r.get("latency_ms", {}).get("p99")),
        ]
        for name, r in data.get("results", {}).items()
    ]
    setup = data.get("setup", {})
    lines = [
        f"{setup.get('requests')} requests x {setup.get('rounds')} rounds at concurrency "
        f"{setup.get('concurrency')}, {setup.get('index_type')} index of {setup.get('documents')} documents.",
        "",
    ]
    return lines + table(["query model", "path", "requests/s", "p50 ms", "p99 ms"], body)


def render_distributed(data: dict) -> list[str]:
    body = [
        [name, fmt(r.get("train", {}).get("queries_per_second")), fmt(r.get("encode", {}).get("documents_per_second"))]
        for name, r in data.get("runs", {}).items()
    ]
    lines = [f"Device {data.get('device')}; scaling {fmt(data.get('scaling'))}.", ""]
    return lines + table(["run", "training queries/s", "teacher documents/s"], body)


def render_symmetric_documents(data: dict) -> list[str]:
    ways = {
        "padded_batch": "one padded batch, tokenized each step",
        "sorted_chunks_cached_tokens": "sorted chunks, cached",
    }
    body = [
        [
            label,
            fmt(data[key]["tokenize_seconds"]),
            fmt(data[key]["forward_backward_seconds"]),
            f"{data[key]['tokens_run']:,}",
        ]
        for key, label in ways.items()
    ]
    lengths = data["token_lengths"]
    lines = [
        f"{data['documents']} {data['dataset']} passages (mean {fmt(lengths['mean'])} tokens, longest "
        f"{lengths['max']}), {data['student']}, forward and backward on the CPU; median seconds.",
        "",
    ]
    closing = [
        f"Speed-up {times(data['speedup'])}; largest embedding difference {fmt(data['max_abs_embedding_difference'])}.",
        "",
    ]
    return lines + table(["documents", "tokenize s", "forward+backward s", "tokens run"], body) + closing


def render_querygen(data: dict) -> list[str]:
    runs = [*data.get("runs", {}).values(), data.get("throughput", {})]
    lines = [f"`{run['command']}` ({run.get('device')}, {run.get('date')})" for run in runs if run.get("command")]
    lines = ["Made by:", "", *(f"- {line}" for line in lines), ""]
    for dataset, section in data.items():
        if not isinstance(section, dict) or "rows" not in section:
            continue
        teacher = section["teacher"]
        lines += [f"### {dataset} (teacher nDCG@10 {fmt(teacher['nDCG@10'])})", ""]
        body = [
            [
                name,
                fmt(row["training_queries"].get("generated")),
                fmt(row["metrics"]["nDCG@10"]),
                percent(row["retention"]["nDCG@10"]),
                p_value(row.get("p_value_vs_none", {}).get("nDCG@10")),
            ]
            for name, row in section["rows"].items()
        ]
        lines += table(["training queries", "generated", "nDCG@10", "retention", "p vs none"], body)
        if section.get("sparse"):
            sparse = section["sparse"]
            lines += [
                f"Sparse ({percent(sparse['train_query_fraction'])} of the labelled queries): retention "
                f"{percent(sparse['retention_without_generated'])} without generated queries, "
                f"{percent(sparse['retention_with_generated'])} with them; generation recovers "
                f"{percent(sparse['gap_recovered'])} of the gap to the full-data run.",
                "",
            ]
    generators = data.get("throughput", {}).get("generators", {})
    if generators:
        lines += ["### Generation throughput", "", f"On {data['throughput'].get('device')}.", ""]
        body = [[name, fmt(g["queries_per_second"]), fmt(g.get("settings", ""))] for name, g in generators.items()]
        lines += table(["generator", "queries/s", "settings"], body)
    return lines


def render_cross_encoder(data: dict) -> list[str]:
    lines = [f"Device {data.get('device')}.", ""]
    for dataset, section in data["datasets"].items():
        reranker = section["cross_encoder_reranker"]["metrics"]
        body = [
            ["first stage", fmt(section["first_stage"]["metrics"]["nDCG@10"]), ""],
            ["cross-encoder reranking the top 100", fmt(reranker["nDCG@10"]), "100%"],
        ]
        body += [
            [name, fmt(row["metrics"]["nDCG@10"]), percent(row["retention_vs_cross_encoder"]["nDCG@10"])]
            for name, row in section["rows"].items()
        ]
        lines += [f"### {dataset}", ""] + table(["system", "nDCG@10", "of the reranker"], body)
    return lines


def render_speed_cpu(data: dict) -> list[str]:
    lines = [f"{fmt(data.get('machine'))}; {fmt(data.get('latency_method'))}", ""]
    header = [
        "query encoder",
        "CPU ms batch 1",
        "CPU ms batch 32",
        "GFLOP/query",
        "params (w/o embeddings)",
        "peak MiB",
    ]
    body = [
        [
            name,
            fmt(e["batch1_ms"]),
            fmt(e["batch32_ms"]),
            fmt(e["flops_per_query"] / 1e9),
            f"{millions(e['parameters'])} ({millions(e['parameters_without_embeddings'])})",
            fmt(e["memory"]["peak_rss_growth_mib"]),
        ]
        for name, e in data["encoders"].items()
    ]
    return lines + table(header, body)


def render_speed_gpu(data: dict) -> list[str]:
    lines = [
        f"Device {data.get('device')}; measured bf16 matmul peak {fmt(data['bf16_matmul_peak']['tflops'])} TFLOP/s.",
        "",
    ]
    body = [
        [name, fmt(r["documents_per_second"]), percent(r["share_of_peak"])]
        for name, r in data["encode"]["runs"].items()
    ]
    lines += table(["teacher encoding", "documents/s", "share of peak"], body)
    body = [
        [name, fmt(r["queries_per_second"]), percent(r["share_of_peak"])] for name, r in data["train"]["runs"].items()
    ]
    lines += table(["training", "queries/s", "share of peak"], body)
    symmetric = data["symmetric"]
    body = [[name, fmt(r["steps_per_second"]), fmt(r["queries_per_second"])] for name, r in symmetric["runs"].items()]
    lines += table(["symmetric training (attention kernels)", "steps/s", "queries/s"], body)
    lines += [
        f"Symmetric: {symmetric['student']}, {symmetric['batch']} queries and about "
        f"{symmetric['candidate_passages_per_step']} candidate passages a step; ours over PyTorch's kernels "
        f"{fmt(symmetric['speedup'])}x.",
        "",
    ]
    dual = data.get("dual_pooling")
    if dual:
        body = [
            [
                way,
                fmt(dual["training"][way]["steps_per_second"]),
                " / ".join(fmt(t) for t in dual["training"][way]["seconds"]),
                fmt(dual["scoring"][way]["pairs_per_second"]),
            ]
            for way in dual["training"]
        ]
        lines += table(
            ["dual-pooling CE (attention kernels)", "training steps/s", "seconds per repeat", "scoring pairs/s"], body
        )
        lines += [
            f"Model: {dual['model']}; {dual['batch']} queries x {dual['group_size']} documents a training "
            f"step ({dual['steps_per_way_and_repeat']} steps a repeat, each way's faster repeat counted), "
            f"{dual['scored_pairs']} pairs scored after an untimed warm-up.",
            "",
        ]
    return lines + [f"Ratios: {fmt(data.get('summary'))}.", ""]


KNOWN: dict[str, tuple[str, Callable[[dict], list[str]]]] = {
    "quickstart.json": ("Quickstart", render_quickstart),
    "ablation_scifact.json": ("Ablation (SciFact)", render_ablation),
    "defaults_dev.json": ("Choosing the defaults (held-out training queries)", render_defaults),
    "defaults_dev_smallest.json": ("Options for the smallest student (held-out training queries)", render_defaults),
    "onnx.json": ("ONNX export", render_onnx),
    "serve.json": ("Serving", render_serve),
    "distributed.json": ("Many GPUs", render_distributed),
    "querygen.json": ("Query generation", render_querygen),
    "cross_encoder.json": ("Cross-encoder teachers", render_cross_encoder),
    "speed_cpu.json": ("Speed on CPU", render_speed_cpu),
    "speed_gpu.json": ("Speed on GPU", render_speed_gpu),
    "symmetric_documents.json": ("Symmetric training: a step's documents", render_symmetric_documents),
}
EXPECTED = ("querygen.json", "cross_encoder.json", "speed_cpu.json", "speed_gpu.json")  # said when missing


# -- charts -------------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def retention_series(quality: dict[str, dict], ablation: dict | None) -> dict[str, dict[str, dict[str, float]]]:
    """``{panel: {group: {bar: retention of the first metric}}}``: a panel per student, a group per dataset/split,
    a bar per method (and the ablation as a panel of its own)."""
    panels: dict[str, dict[str, dict[str, float]]] = {}
    for record in quality.values():
        first = record["metrics"][0]
        for row in record["rows"].values():
            if "student" not in row:
                continue
            for split, evaluation in row["evaluations"].items():
                value = evaluation.get("retention", {}).get(first)
                if value is not None:
                    group = f"{record['dataset']}/{split}" if len(record["eval_splits"]) > 1 else record["dataset"]
                    panels.setdefault(row["student"], {}).setdefault(group, {})[row["method"]] = value
        for split in record["eval_splits"]:
            bm25 = record["rows"].get("bm25", {}).get("evaluations", {}).get(split, {}).get("retention", {})
            if bm25.get(first) is not None:
                group = f"{record['dataset']}/{split}" if len(record["eval_splits"]) > 1 else record["dataset"]
                for panel in panels.values():
                    panel.setdefault(group, {})["bm25"] = bm25[first]
    if ablation:
        first = next(iter(ablation["teacher"]))
        panel = panels.setdefault("ablation: MiniLM teacher, teacher:2 student", {}).setdefault("scifact", {})
        for name, row in ablation["rows"].items():
            panel[name.split(" (")[0]] = row["retention"][first]
    return panels


def bar_rank(bar: str) -> int:
    """The table's method order in every panel of the chart; other bars (the ablation's rows) keep theirs."""
    order = [*HEADLINE_METHODS, "bm25"]
    return order.index(bar) if bar in order else len(order)


def chart_retention(panels: dict, path: Path) -> bool:
    plt = _pyplot()
    if plt is None or not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    every_bar = list(dict.fromkeys(bar for groups in panels.values() for group in groups.values() for bar in group))
    colour = {bar: f"C{i % 10}" for i, bar in enumerate(every_bar)}  # one colour per method in every panel
    for axis, (panel, groups) in zip(axes[:, 0], panels.items(), strict=True):
        bars = sorted(dict.fromkeys(bar for group in groups.values() for bar in group), key=bar_rank)
        width = 0.8 / max(1, len(bars))
        for i, bar in enumerate(bars):
            xs = [g + i * width for g, group in enumerate(groups) if bar in groups[group]]
            ys = [100 * groups[group][bar] for group in groups if bar in groups[group]]
            axis.bar(xs, ys, width, label=bar, color=colour[bar])
        axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups))
        axis.set_ylabel("% of teacher")
        axis.axhline(100, color="grey", linewidth=0.8)
        axis.set_title(panel, fontsize=10)
        axis.legend(fontsize=7, loc="lower right")
    fig.suptitle("Retention of the teacher's first metric (nDCG@10)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def speed_cpu_encoder(student: str, speed_cpu: dict | None) -> dict | None:
    """The quality-table student's query encoder as ``speed_cpu.json`` measured it, if it did."""
    return (speed_cpu or {}).get("encoders", {}).get(SPEED_CPU_ENCODERS.get(student, ""))


def cpu_speedup(student: str, described: dict, speed_cpu: dict | None) -> float | None:
    """The student's query-encoder speed-up over the teacher at batch 1 on the CPU: measured with its table where
    it was (``--latency-repeats``), else from ``speed_cpu.json`` (tables trained on a GPU measure no CPU latency)."""
    latency = described.get("latency_cpu_ms", {})
    if latency:
        return latency["teacher"]["batch1_ms"] / latency["student"]["batch1_ms"]
    encoder = speed_cpu_encoder(student, speed_cpu)
    return encoder["speedup_vs_teacher"]["batch1_ms"] if encoder else None


def speed_points(
    quality: dict[str, dict], quickstart: dict | None, speed_cpu: dict | None = None
) -> list[tuple[str, float, float]]:
    """``(label, speed-up of the query encoder over its teacher at batch 1 on CPU, retention)`` of every distilled
    student that has both numbers."""
    points = []
    for record in quality.values():
        first = record["metrics"][0]
        for student in record.get("students", {}):
            speedup = cpu_speedup(student, record.get("query_encoders", {}).get(student, {}), speed_cpu)
            row = record["rows"].get(f"{student}/embeddistill")
            if not row or speedup is None:
                continue
            for split, evaluation in row["evaluations"].items():
                value = evaluation.get("retention", {}).get(first)
                if value is not None:
                    points.append((f"{student} {record['dataset']}/{split}", speedup, value))
    if quickstart and "speedup" in quickstart:
        points.append(
            ("quickstart (MiniLM teacher:2)", quickstart["speedup"]["batch1"], quickstart["retention"]["nDCG@10"])
        )
    return points


def chart_speed(points: list[tuple[str, float, float]], path: Path) -> bool:
    plt = _pyplot()
    if plt is None or not points:
        return False
    fig, axis = plt.subplots(figsize=(8, 5))
    for label, speedup, value in points:
        axis.scatter(speedup, 100 * value)
        axis.annotate(label, (speedup, 100 * value), fontsize=7, xytext=(4, 2), textcoords="offset points")
    axis.scatter([1.0], [100.0], marker="*", s=150, color="black")
    axis.annotate("teacher", (1.0, 100.0), fontsize=8, xytext=(4, 2), textcoords="offset points")
    axis.set_xlabel("query-encoder speed-up over its teacher (CPU, batch 1)")
    axis.set_ylabel("nDCG@10, % of teacher")
    axis.set_title("Quality against query-encoding speed (EmbedDistill students)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the document ---------------------------------------------------------------------------------------------------


def load_results(folder: Path) -> dict[str, dict]:
    results = {}
    for path in sorted(folder.glob("*.json")):
        try:
            results[path.name] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            logger.warning("%s: not valid JSON (%s); left out", path, error)
    return results


def section(title: str, name: str, data, render: Callable) -> list[str]:
    lines = [f"## {title}", "", source_line(name, data), ""]
    try:
        return lines + render(data)
    except (KeyError, TypeError, AttributeError, ValueError) as error:  # a layout that changed: still show it
        logger.warning("%s: unexpected layout (%r); shown as generic tables", name, error)
        return lines + render_generic(data)


def headline_value(quality: dict[str, dict], row: str, dataset: str, split: str) -> float | None:
    record = quality.get(f"quality_{dataset}.json")
    evaluation = record["rows"].get(row, {}).get("evaluations", {}).get(split) if record else None
    return evaluation["metrics"][record["metrics"][0]] if evaluation else None


def headline(quality: dict[str, dict], speed_cpu: dict | None) -> list[str]:
    """Every student and method measured on all five sets: nDCG@10 per set, its mean, and the mean's share of the
    teacher's mean; then the goal (the smallest student: >= 97% of the teacher's mean nDCG@10, a >= 10x cheaper
    query encoder on the CPU, above the peer and score-only), stated as met or not from these numbers."""
    sets = [f"{d}/{s}" if d == "msmarco-dl" else d for d, s in HEADLINE_SETS]
    teacher = [headline_value(quality, "teacher", d, s) for d, s in HEADLINE_SETS]
    if None in teacher:
        return []
    teacher_mean = sum(teacher) / len(teacher)
    body = [["teacher", "", *map(fmt, teacher), fmt(teacher_mean), "100.0%"]]
    incomplete = False
    means: dict[tuple[str, str], list[float]] = {}
    students = list(dict.fromkeys(s for record in quality.values() for s in record.get("students", {})))
    for student in students:
        for method in HEADLINE_METHODS:
            values = [headline_value(quality, f"{student}/{method}", d, s) for d, s in HEADLINE_SETS]
            if all(value is None for value in values):
                continue
            if None in values:  # a mean over fewer sets would not compare with the others
                incomplete = True
                body.append([student, method, *(fmt(v) if v is not None else "-" for v in values), "-", "-"])
                continue
            means[student, method] = values
            mean = sum(values) / len(values)
            body.append([student, method, *map(fmt, values), fmt(mean), percent(mean / teacher_mean)])
    lines = ["### Headline: mean nDCG@10 over the five evaluation sets", ""]
    lines += table(["student", "method", *sets, "mean", "% of teacher mean"], body)
    if incomplete:
        lines += ["A row with a set not measured (-) has no mean; the per-dataset tables below say why.", ""]
    ours = means.get((SMALLEST_STUDENT, "embeddistill"))
    if ours is None:
        return lines
    retention = sum(ours) / len(ours) / teacher_mean
    goal = [
        f"Goal, smallest student `{SMALLEST_STUDENT}` with EmbedDistill: {percent(retention)} of the teacher's "
        f"mean nDCG@10 ({'met' if retention >= 0.97 else 'not met'}: the goal is >= 97%)"
    ]
    encoder = speed_cpu_encoder(SMALLEST_STUDENT, speed_cpu)
    if encoder:
        speedup = encoder["speedup_vs_teacher"]
        goal.append(
            f"its query encoder is {times(speedup['batch1_ms'])} faster at batch 1 and {times(speedup['batch32_ms'])} "
            f"at batch 32 on the CPU (`speed_cpu.json`; goal >= 10x: "
            f"{'met' if min(speedup.values()) >= 10 else 'not met'})"
        )
    for other in ("peer", "score-only"):
        theirs = means.get((SMALLEST_STUDENT, other))
        if theirs:
            wins = sum(a > b for a, b in zip(ours, theirs, strict=True))
            goal.append(f"above {other} on {wins} of {len(ours)} sets (mean {fmt(sum(theirs) / len(theirs))})")
    return lines + ["; ".join(goal) + ".", ""]


def quality_section(results: dict[str, dict], charts: dict[str, bool]) -> list[str]:
    lines = ["## Quality: students and methods per dataset", ""]
    lines += [
        "Teacher all-mpnet-base-v2; each table is one `benchmarks/quality.py` command. Retention is the student's "
        "metric over the teacher's; p is a two-sided paired permutation test (sign flips, per query, the same "
        "queries) of the student's EmbedDistill row against that row. `train s` is wall time of training only.",
        "",
    ]
    lines += headline(
        {name: data for name, data in results.items() if name.startswith("quality_")}, results.get("speed_cpu.json")
    )
    if charts.get(RETENTION_CHART):
        lines += [f"![retention per dataset and method](benchmarks/results/{RETENTION_CHART})", ""]
    if charts.get(SPEED_CHART):
        lines += [f"![quality against speed](benchmarks/results/{SPEED_CHART})", ""]
    for dataset, title in QUALITY_DATASETS.items():
        name = f"quality_{dataset}.json"
        if name in results:
            lines += render_quality(name, results[name])
        else:
            lines += [f"### {title}", "", f"Not yet measured (`python benchmarks/quality.py --dataset {dataset}`).", ""]
    for name in sorted(results):
        dataset = name.removeprefix("quality_").removesuffix(".json")
        if name.startswith("quality_") and dataset not in QUALITY_DATASETS:
            lines += render_quality(name, results[name])
    return lines


def build_document(results: dict[str, dict], charts: dict[str, bool]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; every number below is read from "
        "those files (do not edit by hand: rerun the benchmark, then the report).",
        "",
    ]
    quickstart = ("quickstart.json", *KNOWN["quickstart.json"])
    if quickstart[0] in results:
        lines += section(quickstart[1], quickstart[0], results[quickstart[0]], quickstart[2])
    lines += quality_section(results, charts)
    for name, (title, render) in KNOWN.items():
        if name != "quickstart.json" and name in results:
            lines += section(title, name, results[name], render)
        elif name in EXPECTED and name not in results:
            lines += [f"## {title}", "", f"Not yet measured (`benchmarks/results/{name}` does not exist yet).", ""]
    for name in sorted(n for n in results if n.startswith("ann_")):
        lines += section(
            f"Approximate search ({name.removeprefix('ann_').removesuffix('.json')})", name, results[name], render_ann
        )
    handled = set(KNOWN)
    for name in sorted(results):
        if name not in handled and not name.startswith(("quality_", "ann_")):
            lines += section(name.removesuffix(".json"), name, results[name], render_generic)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    folder = Path(args.results)
    results = load_results(folder)
    quality = {name: data for name, data in results.items() if name.startswith("quality_")}
    charts = {
        RETENTION_CHART: chart_retention(
            retention_series(quality, results.get("ablation_scifact.json")), folder / RETENTION_CHART
        ),
        SPEED_CHART: chart_speed(
            speed_points(quality, results.get("quickstart.json"), results.get("speed_cpu.json")), folder / SPEED_CHART
        ),
    }
    atomic_write_text(args.out, build_document(results, charts))
    logger.info("wrote %s from %d result files; charts: %s", args.out, len(results), charts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
