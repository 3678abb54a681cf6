"""``benchmarks/report.py``'s charts (matplotlib, Agg backend): retention per dataset and method, and quality
against query-encoder speed. Each chart function returns False where matplotlib is missing or there is no data.
"""

from __future__ import annotations

from pathlib import Path

from _report_format import HEADLINE_METHODS, SPEED_CPU_ENCODERS


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


# The off-the-shelf model's query encoder is all-MiniLM-L6-v2 without a projection; its CPU speed-up is taken from
# the symmetric MiniLM student's measurement (the same six layers plus a 384x768 projection: a lower bound).
SHELF_SPEED_FROM = "minilm-sym"


def frontier_points(headline: dict | None) -> dict[str, list[tuple[str, float, float, float]]]:
    """``{"students": [(name, speed-up, retention, sd)], "off_the_shelf": [...]}`` from ``headline.json``: the
    five-set seed-mean retention against the CPU batch-1 speed-up of the query encoder."""
    if not headline:
        return {}
    general = headline.get("with_general_queries", {}).get("students", {})
    named = [*headline["students"].items(), *((f"{name} + general queries", s) for name, s in general.items())]
    students = [
        (name, s["cpu_speedup_batch1"], s["retention_mean"], s.get("retention_sd") or 0.0)
        for name, s in named
        if s.get("retention_mean") is not None and s.get("cpu_speedup_batch1")
    ]
    shelf_speed = headline["students"].get(SHELF_SPEED_FROM, {}).get("cpu_speedup_batch1")
    shelf = [("teacher (all-mpnet-base-v2)", 1.0, 1.0, 0.0)]
    if shelf_speed:
        shelf += [
            (f"{name} as it comes", shelf_speed, entry["retention_mean"], 0.0)
            for name, entry in headline["off_the_shelf"].items()
        ]
    return {"students": students, "off_the_shelf": shelf}


def chart_frontier(points: dict[str, list[tuple[str, float, float, float]]], path: Path) -> bool:
    """Students (seed mean, sd bars) beside the off-the-shelf models and their frontier: a student is worth
    using only where it lies above the frontier's step line."""
    plt = _pyplot()
    if plt is None or not points.get("students"):
        return False
    fig, axis = plt.subplots(figsize=(8, 5))
    shelf = sorted(points["off_the_shelf"], key=lambda p: p[1])
    steps_x = [p[1] for p in shelf] + [max(p[1] for p in points["students"] + shelf) * 1.1]
    steps_y = [100 * p[2] for p in shelf] + [100 * shelf[-1][2]]
    axis.step(steps_x, steps_y, where="post", color="grey", linestyle="--", label="off-the-shelf frontier")
    for label, speedup, value, _ in shelf:
        axis.scatter(speedup, 100 * value, marker="s", color="black")
        axis.annotate(label, (speedup, 100 * value), fontsize=7, xytext=(4, -10), textcoords="offset points")
    for label, speedup, value, spread in points["students"]:
        axis.errorbar(speedup, 100 * value, yerr=100 * spread, fmt="o", capsize=3)
        axis.annotate(label, (speedup, 100 * value), fontsize=8, xytext=(4, 2), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("query-encoder speed-up over the teacher (CPU, batch 1, log scale)")
    axis.set_ylabel("five-set mean nDCG@10, % of teacher")
    axis.set_title("Distilled students (library defaults, seed mean) against off-the-shelf models")
    axis.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
