"""``benchmarks/report.py``'s quality part: a table per ``quality_*.json`` (one per dataset and split), the
query encoders' sizes and speeds, and the headline over the five evaluation sets with the goal stated as met or not.
"""

from __future__ import annotations

from _report_charts import speed_cpu_encoder
from _report_format import (
    HEADLINE_METHODS,
    HEADLINE_SETS,
    QUALITY_DATASETS,
    RETENTION_CHART,
    SMALLEST_STUDENT,
    SPEED_CHART,
    fmt,
    millions,
    p_value,
    percent,
    table,
    times,
)


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
