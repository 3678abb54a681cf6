"""The parts of ``benchmarks/report.py`` every section uses: the names shared by sections and charts, table-cell
formatting, and generic tables for result files whose layout the report does not know.
"""

from __future__ import annotations

import math

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
    "mpnet-L0L11-asym": "teacher:2 (asymmetric)",  # the same two mpnet layers' cost, whichever two they are
    "minilm-asym": "all-MiniLM-L6-v2 + projection (asymmetric)",
    "minilm-2L-asym": "2-layer MiniLM + projection (asymmetric)",
    "minilm-L0L5-asym": "2-layer MiniLM + projection (asymmetric)",  # likewise for MiniLM's two layers
    "minilm-sym": "all-MiniLM-L6-v2 + projection (symmetric)",
}
RETENTION_CHART = "chart_retention.png"
SPEED_CHART = "chart_quality_vs_speed.png"
FRONTIER_CHART = "chart_frontier.png"


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
