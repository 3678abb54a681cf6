"""Sections of ``benchmarks/report.py`` about the recipe's evidence: the start-weight choice and the paper's claims."""

from __future__ import annotations

from _report_format import fmt, p_value, percent, table

CLAIM_ORDER = ("a", "b", "c", "c_like_for_like", "d")


def render_start_weight(data: dict) -> list[str]:
    """Retention per start weight: on dev (which chose it), with the MS MARCO queries mixed in, then on test."""
    dev, test = data["dev"]["retention"], data["test"]
    mixed = data.get("dev_with_msmarco_queries", {}).get("retention", {})
    weights = sorted(set(dev) | set(test), key=float)
    sets = sorted({s for w in dev.values() for s in w["per_set"]})
    body = []
    for w in weights:
        on_dev = dev.get(w, {})
        body.append(
            [f"{float(w):g}" + (" (chosen)" if float(w) == data["dev_choice"] else "")]
            + [percent(on_dev.get("per_set", {}).get(s)) for s in sets]
            + [
                percent(on_dev.get("mean")),
                percent(mixed.get(w, {}).get("mean")),
                percent(test.get(w, {}).get("retention_mean")),
            ]
        )
    header = [
        "start_weight",
        *(f"dev {s}" for s in sets),
        "dev mean",
        "dev mean, MS MARCO queries mixed in",
        "test (5-set)",
    ]
    choices = data["dev"]["label_free_choice"]
    lines = table(header, body)
    lines += [
        "Chosen on dev (held-out training queries; the test column is read only after the choice). What the "
        "label-free check would have chosen per dev set, without labels: "
        + "; ".join(f"{d}: {fmt(c)}" for d, c in choices.items())
        + ".",
        "",
    ]
    return lines


def render_claims(data: dict) -> list[str]:
    """One table per claim: each dataset's seed means, the difference, Holm-corrected p; then the verdict."""
    lines = [f"Metric: {data['metric']}; {data['significance']}.", ""]
    for name in CLAIM_ORDER:
        claim = data.get(name)
        if claim is None:
            continue
        lines += [f"**({name}) {claim['claim']}**: {claim['verdict']}. {claim['reasoning']}", ""]
        if not claim["datasets"]:
            continue
        lines += [
            f"A: `{claim['a']['row']}` ({claim['a']['table']}); B: `{claim['b']['row']}` ({claim['b']['table']}).",
            "",
        ]
        body = [
            [
                dataset,
                f"{fmt(r['a_mean'])} ± {fmt(r['a_sd'])}",
                f"{fmt(r['b_mean'])} ± {fmt(r['b_sd'])}",
                f"{r['difference']:+.4f}",
                p_value(r["p_holm"]),
                str(len(r["seeds"])),
            ]
            for dataset, r in claim["datasets"].items()
        ]
        lines += table(["dataset", "A (seed mean ± sd)", "B", "A - B", "p (Holm)", "seeds"], body)
    return lines
