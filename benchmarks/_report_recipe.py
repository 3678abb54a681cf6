"""Sections of ``benchmarks/report.py`` about the recipe's evidence: the start-weight choice and the paper's claims."""

from __future__ import annotations

from _report_format import fmt, p_value, percent, table

CLAIM_ORDER = ("a", "b", "c", "c_like_for_like", "d")


def render_start_weight(data: dict) -> list[str]:
    """Retention per start weight on dev (which chose it), with the MS MARCO queries mixed in where measured, then
    on test; and what the label-free check would have chosen."""
    dev, test = data["dev"]["retention"], data["test"]
    mixed = data.get("dev_with_msmarco_queries", {}).get("retention", {})
    columns = [("dev mean", dev)] + ([("dev mean, MS MARCO queries mixed in", mixed)] if mixed else [])
    sets = sorted({s for w in dev.values() for s in w["per_set"]})
    body = []
    for w in sorted(set(dev) | set(test), key=float):
        label = f"{float(w):g}" + (" (chosen)" if float(w) == data["dev_choice"] else "")
        per_set = [percent(dev.get(w, {}).get("per_set", {}).get(s)) for s in sets]
        means = [percent(found.get(w, {}).get("mean")) for _, found in columns]
        body.append([label, *per_set, *means, percent(test.get(w, {}).get("retention_mean"))])
    header = ["start_weight", *(f"dev {s}" for s in sets), *(name for name, _ in columns), "test (5-set mean)"]
    choices = data["dev"]["label_free_choice"]
    picks = "; ".join(
        f"{d}: {c['agreement_nDCG@10']} (on real queries {c['agreement_nDCG@10_real']}; dev: {c['best_on_dev']})"
        for d, c in choices.items()
    )
    return table(header, body) + [
        "Retention of nDCG@10 over the teacher. Chosen on dev (held-out training queries; SQuAD's by whole article); "
        f"the test column was read only after the choice. The W the label-free check would pick per dev set: {picks}.",
        "",
    ]


def side_label(side: dict) -> str:
    if "teacher" in side:  # claim d: a student of one cross-encoder, from benchmarks/cross_encoder.py's file
        return f"`{side['row']}` (`benchmarks/results/{side['table']}`)"
    weight = f", start_weight {side['start_weight']}" if "start_weight" in side else ""
    return f"`{side['row']}` ({side['table']} tables{weight})"


def comparison_table(claim: dict) -> list[str]:
    """Each dataset's seed means of A and B, the difference, Holm-corrected p and the seeds."""
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
    return table(["dataset", "A (seed mean ± sd)", "B", "A - B", "p (Holm)", "seeds"], body)


def render_claims(data: dict) -> list[str]:
    """One table per claim: each dataset's seed means, the difference, Holm-corrected p; then the verdict. Claim d
    adds its two rerankers' nDCG@10 and its extra comparisons (outside the verdict)."""
    lines = [f"Metric: {data['metric']}; {data['significance']}.", ""]
    for name in CLAIM_ORDER:
        claim = data.get(name)
        if claim is None:
            continue
        lines += [f"**({name}) {claim['claim']}**: {claim['verdict']}. {claim['reasoning']}", ""]
        if not claim["datasets"]:
            continue
        lines += [f"A: {side_label(claim['a'])}; B: {side_label(claim['b'])}.", ""]
        lines += comparison_table(claim)
        rerankers = claim.get("rerankers", {})
        teachers = sorted({t for found in rerankers.values() for t in found})
        if teachers:
            body = [[dataset, *(fmt(found.get(t)) for t in teachers)] for dataset, found in rerankers.items()]
            lines += ["The cross-encoders as rerankers of the first stage (nDCG@10, for context):", ""]
            lines += table(["dataset", *(f"{t} CE" for t in teachers)], body)
        for extra in claim.get("extra", {}).values():
            sides = f"A: {side_label(extra['a'])}; B: {side_label(extra['b'])}"
            lines += [f"Not part of the verdict: {extra['claim']}. {sides}.", ""]
            lines += comparison_table(extra)
    return lines
